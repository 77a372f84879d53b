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

/// A streaming replica of the test PostgreSQL server on a free loopback port (R5's backfill
/// reads only from one): `pg_basebackup -R` of the whole cluster into a fresh folder under /tmp,
/// started with `pg_ctl` as the `postgres` user (when run as root), hot standby. Stopped and
/// removed on drop. `None` when no test server is configured.
pub struct Replica {
    pub port: u16,
    dir: std::path::PathBuf,
    base: String,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> std::process::Command {
    // PostgreSQL refuses to run as root; the Debian cluster's files belong to `postgres`.
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        std::process::Command::new(program)
    }
}

/// Write (or `append` to) a file in a server folder that belongs to `postgres`.
fn write_as_postgres(path: &std::path::Path, text: &str, append: bool) -> anyhow::Result<()> {
    let mut tee = as_postgres("tee");
    if append {
        tee.arg("-a");
    }
    let mut w = tee
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("write {}", path.display()))?;
    if let Some(stdin) = w.stdin.as_mut() {
        use std::io::Write as _;
        stdin.write_all(text.as_bytes())?;
    }
    anyhow::ensure!(w.wait()?.success(), "writing {} failed", path.display());
    Ok(())
}

impl Replica {
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let Some(admin) = postgres_admin_url() else {
            return Ok(None);
        };
        let u = reqwest::Url::parse(&admin).context("BULWARK_TEST_POSTGRES_URL")?;
        let (host, port) = (
            u.host_str().unwrap_or("127.0.0.1").to_owned(),
            u.port().unwrap_or(5432),
        );
        let (user, password) = (
            u.username().to_owned(),
            u.password().unwrap_or("").to_owned(),
        );
        // Hot standby needs these at least as high as on the primary.
        let primary = Database::connect(admin.clone()).await?;
        let mut settings = String::new();
        for name in [
            "max_connections",
            "max_worker_processes",
            "max_wal_senders",
            "max_prepared_transactions",
            "max_locks_per_transaction",
        ] {
            let v = primary
                .query_one(Statement::from_string(
                    primary.get_database_backend(),
                    format!("SELECT current_setting('{name}')"),
                ))
                .await?
                .and_then(|r| r.try_get_by_index::<String>(0).ok())
                .unwrap_or_default();
            settings.push_str(&format!("{name} = {v}\n"));
        }
        primary.close().await.ok();
        let replica_port = crate::procs::free_port();
        let dir = std::env::temp_dir().join(unique("bulwark-replica-"));
        let out = as_postgres(&format!("{PG_BIN}/pg_basebackup"))
            .args([
                "-h",
                &host,
                "-p",
                &port.to_string(),
                "-U",
                &user,
                "-X",
                "stream",
                "-R",
            ])
            .args(["-c", "fast", "-D"])
            .arg(&dir)
            .env("PGPASSWORD", &password)
            .output()
            .context("run pg_basebackup")?;
        anyhow::ensure!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The Debian cluster keeps its configuration in /etc: the copy has none of its own.
        let conf = format!(
            "port = {replica_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = \
             '/tmp'\nhot_standby = on\n{settings}"
        );
        let hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
        for (name, text) in [("postgresql.conf", conf.as_str()), ("pg_hba.conf", hba)] {
            write_as_postgres(&dir.join(name), text, false)?;
        }
        let replica = Self {
            port: replica_port,
            dir: dir.clone(),
            base: format!("postgres://{user}:{password}@127.0.0.1:{replica_port}"),
        };
        let out = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&dir)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .context("run pg_ctl start")?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        Ok(Some(replica))
    }

    /// The URL of database `db` on the replica.
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.base)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = as_postgres("rm").arg("-rf").arg(&self.dir).output();
    }
}

/// A PostgreSQL server of the test's own — `initdb` into a fresh folder under /tmp, on a free
/// loopback port, trust authentication — for a test that stops and restarts its database
/// (issue 14, item 4), which the server every other test shares must never do. Stopped and
/// removed on drop.
pub struct PrivatePostgres {
    pub port: u16,
    dir: std::path::PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> anyhow::Result<Self> {
        let port = crate::procs::free_port();
        let dir = std::env::temp_dir().join(unique("bulwark-pg-"));
        let out = as_postgres(&format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("run initdb")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '/tmp'\n\
             fsync = off\nmax_connections = 100\n"
        );
        write_as_postgres(&dir.join("postgresql.conf"), &conf, true)?;
        let pg = Self { port, dir };
        pg.resume()?;
        Ok(pg)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres:postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(args)
            .output()
            .context("run pg_ctl")?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl {args:?}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
        Ok(())
    }

    /// An outage: a fast shutdown, which ends every connection.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    /// Start (again) and wait until it accepts connections.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-w", "-t", "60", "start"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = as_postgres("rm").arg("-rf").arg(&self.dir).output();
    }
}
