//! sea-orm entities of the auction tables (schema: migrations/src/auction).

pub mod auction {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "auction_auctions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub title: String,
        pub starts_at_ms: i64,
        /// Current end, moved by soft-close extensions.
        pub ends_at_ms: i64,
        /// The end as created, before extensions.
        pub scheduled_end_ms: i64,
        pub start_price: i64,
        pub reserve: Option<i64>,
        pub min_increment: i64,
        pub soft_close_window_ms: i64,
        pub soft_close_extension_ms: i64,
        /// `open` or `closed`.
        pub status: String,
        /// Bumped by every write; writers compare-and-set on it.
        pub version: i64,
        /// Last room sequence number handed out.
        pub seq: i64,
        pub highest_amount: Option<i64>,
        pub highest_bidder: Option<String>,
        pub highest_bid_id: Option<i64>,
        pub bid_count: i64,
        pub created_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod bid {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "auction_bids")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub auction_id: i64,
        pub bidder: String,
        pub client_bid_id: String,
        pub amount: i64,
        pub received_at_ms: i64,
        pub processed_at_ms: i64,
        pub outcome: String,
        pub reason: Option<String>,
        /// Room sequence of the `bid_placed` message (accepted bids only).
        pub seq: Option<i64>,
        pub stream_seq: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod result {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "auction_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub auction_id: i64,
        pub winner: Option<String>,
        pub amount: Option<i64>,
        pub bid_id: Option<i64>,
        pub reserve_met: bool,
        pub closed_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod partition_owner {
    use sea_orm::entity::prelude::*;

    /// The fencing row of a bid partition: the token of its current owner.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "auction_partition_owners")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition_id: i32,
        pub token: i64,
        pub owner: String,
        pub claimed_at_ms: i64,
        /// Set when the owner stopped with nothing in flight; cleared by the next claim.
        pub released_at_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
