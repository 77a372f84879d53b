//! Spawn the real application for one test: in process on port 0 (fast, most tests) or as the
//! built binary (kill -9, signals, cold start).

use std::path::{Path, PathBuf};

use bulwark::Application;
use bulwark_kernel::config::{Figment, Serialized, Settings};
use bulwark_kernel::module::ProcessRole;
use bulwark_kernel::shutdown::Shutdown;
use serde::Serialize;

use crate::http::Http;
use crate::process::{ProcessBuilder, TestProcess};
use crate::services::{TestDatabase, figment_defaults, nats_url, redis_url, unique};

/// The HS256 secret test applications use, so tests can mint tokens.
pub const TEST_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

/// Which backing services the application uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file, embedded bus, in-process store.
    Embedded,
    /// Fresh PostgreSQL database, NATS with a unique prefix, Redis with a unique key prefix.
    Real,
}

/// Builder for a test application.
pub struct TestAppBuilder {
    backend: Backend,
    role: ProcessRole,
    figment: Figment,
    modules: Vec<std::sync::Arc<dyn bulwark_kernel::module::Module>>,
    /// Applied last, over what the backend chose.
    overrides: Vec<Figment>,
    /// The database of the instance this one shares with.
    shared_db: Option<String>,
}

impl TestAppBuilder {
    pub fn new(backend: Backend) -> Self {
        let figment = figment_defaults()
            .merge(Serialized::default("server.listen", "127.0.0.1:0"))
            .merge(Serialized::default("auth.hs256_secret", TEST_SECRET))
            .merge(Serialized::default("drain.grace", "0s"))
            .merge(Serialized::default("drain.timeout", "5s"))
            .merge(Serialized::default("telemetry.log_level", "warn"));
        Self {
            backend,
            role: ProcessRole::All,
            figment,
            modules: Vec::new(),
            overrides: Vec::new(),
            shared_db: None,
        }
    }

    /// Override a config key (`"server.body_limit_bytes"`, 1024).
    pub fn set<T: Serialize>(mut self, key: &str, value: T) -> Self {
        self.overrides
            .push(Figment::from(Serialized::default(key, value)));
        self
    }

    /// Add a test module (routes, workers) next to the compiled-in ones.
    pub fn module(mut self, m: std::sync::Arc<dyn bulwark_kernel::module::Module>) -> Self {
        self.modules.push(m);
        self
    }

    /// Use the same database, bus and key-value store (with the same prefixes) as `other`:
    /// a second instance of one deployment.
    pub fn share(mut self, other: &TestApp) -> Self {
        let k = &other.settings.kernel;
        self.shared_db = Some(k.database.url.expose().to_owned());
        let mut f = Figment::new()
            .merge(Serialized::default(
                "redis.key_prefix",
                k.redis.key_prefix.clone(),
            ))
            .merge(Serialized::default("bus.prefix", k.bus.prefix.clone()));
        if let Some(u) = &k.redis.url {
            f = f.merge(Serialized::default("redis.url", u.expose().to_owned()));
        }
        if let Some(u) = &k.bus.url {
            f = f.merge(Serialized::default("bus.url", u.expose().to_owned()));
        }
        self.overrides.insert(0, f);
        self
    }

    pub fn role(mut self, role: ProcessRole) -> Self {
        self.role = role;
        self
    }

    /// Build and start. `Ok(None)` when the real services are not configured (and not required).
    pub async fn spawn(self) -> anyhow::Result<Option<TestApp>> {
        let data_dir = tempfile::tempdir()?;
        let mut figment = self.figment.merge(Serialized::default(
            "data_dir",
            data_dir.path().display().to_string(),
        ));
        let db = match (self.backend, self.shared_db) {
            (_, Some(url)) => TestDatabase::borrowed(url),
            (Backend::Embedded, None) => TestDatabase::sqlite()?,
            (Backend::Real, None) => {
                let (Some(db), Some(redis), Some(nats)) =
                    (TestDatabase::postgres().await?, redis_url(), nats_url())
                else {
                    return Ok(None);
                };
                let prefix = unique("t");
                figment = figment
                    .merge(Serialized::default("redis.url", redis))
                    .merge(Serialized::default(
                        "redis.key_prefix",
                        format!("{prefix}:"),
                    ))
                    .merge(Serialized::default("bus.url", nats))
                    .merge(Serialized::default("bus.prefix", prefix));
                db
            }
        };
        figment = figment.merge(Serialized::default("database.url", db.url.clone()));
        for o in self.overrides {
            figment = figment.merge(o);
        }
        let settings = Settings::from_figment(figment.clone())?;
        let mut modules = bulwark::modules::compiled();
        modules.extend(self.modules);
        let app = Application::build_with_modules(settings.clone(), self.role, modules).await?;
        let http = Http::new(
            app.local_addr(),
            app.metrics_addr(),
            settings.kernel.auth.clone(),
            Some(TEST_SECRET.as_bytes().to_vec()),
        )?;
        let shutdown = app.shutdown_handle();
        let handle = tokio::spawn(app.run_until_stopped());
        Ok(Some(TestApp {
            http,
            shutdown,
            settings,
            figment,
            handle: Some(handle),
            db,
            _data_dir: data_dir,
        }))
    }

    /// [`spawn`](Self::spawn), for when the backend is known to be there: embedded, or real
    /// inside [`each_backend!`](crate::each_backend) (which skips the real half when the
    /// services are not configured). Panics if the application does not start.
    pub async fn start(self) -> TestApp {
        let backend = self.backend;
        self.spawn()
            .await
            .expect("spawn the application")
            .unwrap_or_else(|| panic!("{backend:?} services are not configured"))
    }
}

/// A running application, in this process. Dereferences to [`Http`] (`url`, `get`,
/// `post_json`, `token_for`, `metrics_text`, ...).
pub struct TestApp {
    http: Http,
    pub shutdown: Shutdown,
    pub settings: Settings,
    /// The complete configuration it runs with; [`TestApp::process`] starts processes on it.
    pub figment: Figment,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub db: TestDatabase,
    _data_dir: tempfile::TempDir,
}

impl std::ops::Deref for TestApp {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.http
    }
}

/// An embedded-mode application with test defaults.
pub async fn spawn_app() -> TestApp {
    TestAppBuilder::new(Backend::Embedded).start().await
}

impl TestApp {
    /// Begin the drain and wait for the application to stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        if let Some(h) = self.handle.take() {
            h.await??;
        }
        Ok(())
    }

    /// A `bulwark serve --role <role>` process of the same deployment: this app's database,
    /// bus (URL and prefix), Redis (URL and key prefix), secret and every other setting.
    /// Adjust it with [`ProcessBuilder`]'s methods, then `spawn()`.
    pub fn process(&self, role: ProcessRole) -> ProcessBuilder {
        ProcessBuilder::sharing(self.figment.clone()).role(role)
    }

    /// [`process(role)`](Self::process)`.spawn()`: started and ready (`/readyz` 200).
    pub async fn spawn_process(&self, role: ProcessRole) -> TestProcess {
        self.process(role).spawn().await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// The `bulwark` binary beside the running test (or bench) executable: `target/<profile>/`
/// when run from `target/<profile>/deps/`, whatever the target directory. Falls back to
/// `$CARGO_TARGET_DIR/debug/bulwark` (or `<workspace>/target/debug/bulwark`). Cargo does not
/// build another package's binary for `cargo test -p bulwark-tests`; `scripts/test` builds it
/// first (`cargo build -p bulwark -p bulwark-tests --bin bulwark ...`).
pub fn binary_path() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        let dir = if dir.ends_with("deps") {
            dir.parent()?
        } else {
            dir
        };
        Some(dir.join("bulwark"))
    });
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/bulwark")
}
