//! K5: the embedded SQLite database is created on first use with WAL, a busy timeout and
//! foreign keys on; PostgreSQL works from a URL; every compiled-in migration set applies and
//! rolls back.

use sea_orm::{ConnectionTrait, Statement};

use bulwark_tests::Backend;
use bulwark_tests::services::{TestDatabase, default_settings};

async fn pragma(db: &sea_orm::DatabaseConnection, name: &str) -> String {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            format!("PRAGMA {name}"),
        ))
        .await
        .expect("pragma")
        .expect("row");
    row.try_get_by_index::<String>(0)
        .or_else(|_| row.try_get_by_index::<i64>(0).map(|v| v.to_string()))
        .expect("value")
}

#[tokio::test]
async fn sqlite_is_created_with_wal_busy_timeout_and_foreign_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("nested/dir/bulwark.db");
    let url = format!("sqlite://{}", path.display());
    let mut cfg = default_settings().kernel.database;
    cfg.sqlite_busy_timeout = std::time::Duration::from_millis(1234);
    let db = bulwark_kernel::db::connect_url(&url, &cfg)
        .await
        .expect("connect creates the file");
    assert!(path.exists(), "database file created, with its directories");
    assert_eq!(pragma(&db, "journal_mode").await, "wal");
    assert_eq!(pragma(&db, "foreign_keys").await, "1");
    assert_eq!(pragma(&db, "busy_timeout").await, "1234");
    bulwark_kernel::db::ping(&db).await.expect("ping");
}

/// On SQLite (embedded) and PostgreSQL (real).
async fn migrations_apply_and_roll_back(backend: Backend) {
    let tdb = match backend {
        Backend::Embedded => TestDatabase::sqlite().expect("sqlite"),
        Backend::Real => TestDatabase::postgres()
            .await
            .expect("postgres")
            .expect("each_backend! checked"),
    };
    let db = tdb.connect_migrated().await.expect("migrate up");
    for set in bulwark_migrations::sets() {
        let status = set.status(&db).await.expect("status");
        assert!(
            status.iter().all(|(_, applied)| *applied),
            "{}: {status:?}",
            set.module()
        );
    }
    let kernel = bulwark_migrations::sets()
        .into_iter()
        .find(|s| s.module() == "kernel")
        .expect("kernel set");
    kernel.down(&db, 1).await.expect("down");
    assert!(
        kernel
            .status(&db)
            .await
            .expect("status")
            .iter()
            .any(|(_, applied)| !applied)
    );
    kernel.up(&db).await.expect("up again");
    assert!(
        kernel
            .status(&db)
            .await
            .expect("status")
            .iter()
            .all(|(_, applied)| *applied)
    );
}

bulwark_tests::each_backend!(migrations_apply_and_roll_back);

#[tokio::test]
async fn a_bad_database_url_is_refused_by_config() {
    let f = bulwark_tests::services::figment_defaults().merge(
        bulwark_kernel::config::Serialized::default("database.url", "mysql://x/y"),
    );
    let err =
        bulwark_kernel::config::Settings::from_figment(f).expect_err("mysql is not supported");
    assert_eq!(err.key, "database.url");
}

#[tokio::test]
async fn replicas_starting_together_migrate_one_at_a_time() {
    // Without the advisory lock, concurrent CREATE TABLEs on PostgreSQL collide
    // (duplicate key in pg_type) and all but one replica fail to start.
    let Some(tdb) = TestDatabase::postgres().await.expect("postgres") else {
        return;
    };
    let mut cfg = default_settings().kernel.database;
    cfg.url = bulwark_kernel::config::SecretUrl::new(tdb.url.clone());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let db = bulwark_kernel::db::connect(&cfg).await.expect("connect");
            bulwark::migrate_up(&db, &cfg).await
        }));
    }
    for t in tasks {
        t.await
            .expect("join")
            .expect("every replica migrates (or finds nothing pending)");
    }
}
