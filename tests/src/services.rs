//! Isolated backing services for one test.

use std::time::Duration;

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

/// Are real services mandatory in this run?
pub fn require_services() -> bool {
    std::env::var("BULWARK_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                !require_services(),
                "{var} is not set but BULWARK_TEST_REQUIRE_SERVICES=1"
            );
            eprintln!("note: {var} not set; the real-service half of this test is skipped");
            None
        }
    }
}

/// Admin URL of the test PostgreSQL server, if configured.
pub fn postgres_admin_url() -> Option<String> {
    service_url("BULWARK_TEST_POSTGRES_URL")
}

/// URL of the test Redis, if configured.
pub fn redis_url() -> Option<String> {
    service_url("BULWARK_TEST_REDIS_URL")
}

/// URL of the test NATS (with JetStream), if configured.
pub fn nats_url() -> Option<String> {
    service_url("BULWARK_TEST_NATS_URL")
}

/// Are PostgreSQL, Redis and NATS all configured? Prints a note for each one that is not;
/// with `BULWARK_TEST_REQUIRE_SERVICES=1` a missing one fails the test instead.
pub fn real_services() -> bool {
    // Ask about all three, so every missing variable is named.
    let configured = [postgres_admin_url(), redis_url(), nats_url()];
    configured.iter().all(Option::is_some)
}

/// A short unique token for names (database, key prefix, stream prefix).
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..12])
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    /// Keeps a SQLite file's directory alive for the test's duration.
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}/bulwark.db", dir.path().display());
        Ok(Self {
            url,
            _dir: Some(dir),
        })
    }

    /// A database another test application created (and keeps alive).
    pub fn borrowed(url: String) -> Self {
        Self { url, _dir: None }
    }

    /// A fresh PostgreSQL database on the test server; `None` when no server is configured.
    pub async fn postgres() -> anyhow::Result<Option<Self>> {
        let Some(admin) = postgres_admin_url() else {
            return Ok(None);
        };
        let name = unique("bulwark_t_");
        let conn = Database::connect(admin.clone())
            .await
            .context("connect to the test PostgreSQL")?;
        conn.execute(Statement::from_string(
            conn.get_database_backend(),
            format!("CREATE DATABASE {name}"),
        ))
        .await
        .context("create the test database")?;
        conn.close().await.ok();
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin);
        Ok(Some(Self {
            url: format!("{base}/{name}"),
            _dir: None,
        }))
    }

    /// Connect with the kernel's pool settings and apply every compiled-in migration.
    pub async fn connect_migrated(&self) -> anyhow::Result<DatabaseConnection> {
        let cfg = default_settings().kernel.database;
        let db = bulwark_kernel::db::connect_url(&self.url, &cfg).await?;
        for set in bulwark_migrations::sets() {
            set.up(&db)
                .await
                .with_context(|| format!("migrate {}", set.module()))?;
        }
        Ok(db)
    }
}

/// The compiled-in defaults, as a test starting point.
pub fn default_settings() -> bulwark_kernel::config::Settings {
    bulwark_kernel::config::Settings::from_figment(figment_defaults()).expect("defaults are valid")
}

/// The defaults as a figment, to layer test values on.
pub fn figment_defaults() -> bulwark_kernel::config::Figment {
    use bulwark_kernel::config::{Figment, Format, Toml};
    Figment::from(Toml::string(bulwark_kernel::config::DEFAULT_TOML))
}

/// Poll `f` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
