//! sea-orm entities of the module's tables (migrations/src/annotation). Locks and counters are
//! written with SQL in [`crate::store`], where the queries need more than an entity gives.

pub mod project {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "annotation_projects")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub instructions: String,
        /// JSON array of class names.
        pub labels: String,
        pub multi_label: bool,
        pub overlap: i32,
        pub lock_ttl_ms: i64,
        pub version: i64,
        pub created_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod item {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "annotation_items")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub project_id: i64,
        pub external_id: String,
        pub uri: Option<String>,
        /// JSON text.
        pub payload: Option<String>,
        /// JSON text.
        pub metadata: Option<String>,
        pub priority: i32,
        pub version: i64,
        pub annotation_count: i32,
        pub done: bool,
        pub created_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod annotation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "annotation_annotations")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub project_id: i64,
        pub item_id: i64,
        pub annotator: String,
        /// JSON array of class names.
        pub labels: String,
        pub supersedes: Option<i64>,
        pub request_id: String,
        pub lead_time_ms: Option<i64>,
        pub created_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod review {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "annotation_reviews")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub annotation_id: i64,
        pub project_id: i64,
        pub reviewer: String,
        /// `accept` or `reject`.
        pub verdict: String,
        pub comment: String,
        pub created_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod export {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "annotation_exports")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub project_id: i64,
        /// The dataset spec, JSON text.
        pub spec: String,
        pub format: String,
        /// `pending`, `running`, `done` or `failed`.
        pub state: String,
        pub rows_done: i64,
        pub rows_total: Option<i64>,
        pub path: Option<String>,
        pub sha256: Option<String>,
        /// The manifest, JSON text.
        pub manifest: Option<String>,
        pub error: Option<String>,
        pub created_by: String,
        pub created_at_ms: i64,
        pub started_at_ms: Option<i64>,
        pub finished_at_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
