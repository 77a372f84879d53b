//! Database connection (K5): SQLite file as the embedded default, PostgreSQL in production.

use std::path::Path;
use std::time::{Duration, Instant};

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
};

use crate::config::DatabaseConfig;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unreachable after {waited:?} ({url}): {source}")]
    Unreachable {
        url: String,
        waited: Duration,
        source: DbErr,
    },
    #[error("cannot create the database directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// Connect to `url`, retrying with exponential backoff for `cfg.connect_timeout`.
pub async fn connect_url(url: &str, cfg: &DatabaseConfig) -> Result<DatabaseConnection, DbError> {
    if let Some(path) = sqlite_path(url)
        && let Some(dir) = Path::new(&path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| DbError::Directory {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(cfg.max_connections)
        .min_connections(cfg.min_connections)
        .connect_timeout(cfg.connect_timeout.min(Duration::from_secs(10)))
        .acquire_timeout(cfg.acquire_timeout)
        .idle_timeout(cfg.idle_timeout)
        .sqlx_logging(false);
    let busy = cfg.sqlite_busy_timeout;
    opts.map_sqlx_sqlite_opts(move |o| {
        o.create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy)
            .foreign_keys(true)
    });
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match Database::connect(opts.clone()).await {
            Ok(db) => return Ok(db),
            Err(err) => {
                let waited = started.elapsed();
                if waited + delay > cfg.connect_timeout {
                    return Err(DbError::Unreachable {
                        url: crate::config::SecretUrl::new(url).redacted(),
                        waited,
                        source: err,
                    });
                }
                tracing::warn!(message = "Database unreachable; retrying.", error = %err, retry_in = ?delay);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Connect the primary database.
pub async fn connect(cfg: &DatabaseConfig) -> Result<DatabaseConnection, DbError> {
    connect_url(cfg.url.expose(), cfg).await
}

/// Connect the read-only connection (the replica when `database.read_url` is set).
pub async fn connect_read(
    cfg: &DatabaseConfig,
    primary: &DatabaseConnection,
) -> Result<DatabaseConnection, DbError> {
    match &cfg.read_url {
        Some(url) => connect_url(url.expose(), cfg).await,
        None => Ok(primary.clone()),
    }
}

/// `SELECT 1` for readiness.
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    db.execute(Statement::from_string(backend, "SELECT 1"))
        .await
        .map(|_| ())
}

/// The file path of a `sqlite:` URL, if it is one with a file.
pub fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(path.to_owned())
    }
}

/// Record the pool's size, idle connections and configured maximum as
/// `bulwark_db_pool_connections{pool, state="in_use|idle"}` and `bulwark_db_pool_max_connections{pool}`.
/// `pool` is `primary` or `read`.
pub fn record_pool_metrics(db: &DatabaseConnection, pool: &'static str, max: u32) {
    let (size, idle) = match db.get_database_backend() {
        DbBackend::Postgres => {
            let p = db.get_postgres_connection_pool();
            (p.size(), p.num_idle())
        }
        DbBackend::Sqlite => {
            let p = db.get_sqlite_connection_pool();
            (p.size(), p.num_idle())
        }
        _ => return,
    };
    let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
    metrics::gauge!("bulwark_db_pool_connections", "pool" => pool, "state" => "idle")
        .set(f64::from(idle));
    metrics::gauge!("bulwark_db_pool_connections", "pool" => pool, "state" => "in_use")
        .set(f64::from(size - idle));
    metrics::gauge!("bulwark_db_pool_max_connections", "pool" => pool).set(f64::from(max));
}

/// Is this connection SQLite?
pub fn is_sqlite(db: &DatabaseConnection) -> bool {
    db.get_database_backend() == DbBackend::Sqlite
}

/// Call first in a transaction that reads before it writes. On SQLite a deferred transaction
/// that has read cannot wait for the writer lock: its first write fails at once with "database
/// is locked" (or a stale-snapshot error) when another connection writes meanwhile. A write
/// statement first takes the lock up front, waiting up to the busy timeout like any write; it
/// changes nothing (no row matches). PostgreSQL needs nothing.
pub async fn lock_for_write(tx: &impl ConnectionTrait) -> Result<(), DbErr> {
    if tx.get_database_backend() == DbBackend::Sqlite {
        tx.execute(Statement::from_string(
            DbBackend::Sqlite,
            "DELETE FROM bulwark_migrations_kernel WHERE 1 = 0",
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://data/bulwark.db").as_deref(),
            Some("data/bulwark.db")
        );
        assert_eq!(
            sqlite_path("sqlite://data/b.db?mode=rwc").as_deref(),
            Some("data/b.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x/y"), None);
    }
}
