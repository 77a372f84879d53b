//! The built `bulwark` binary as a child process: another instance of a test application's
//! deployment ([`crate::TestApp::process`]) or a standalone one ([`ProcessBuilder::standalone`]),
//! for what an in-process application cannot show (SIGKILL, SIGTERM, exit codes, several
//! processes with their own metrics).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bulwark_kernel::config::{Figment, Format as _, Serialized, Settings, Toml};
use bulwark_kernel::module::ProcessRole;
use serde::Serialize;

use crate::http::Http;
use crate::procs::{Proc, bulwark_binary, free_port};
use crate::services::figment_defaults;

/// How long [`ProcessBuilder::spawn`] waits for `/readyz` 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What to start; [`spawn`](Self::spawn) starts it.
pub struct ProcessBuilder {
    role: ProcessRole,
    /// The configuration to share; `None` runs on the binary's own defaults.
    base: Option<Figment>,
    overrides: Vec<Figment>,
    env: Vec<(String, String)>,
}

impl ProcessBuilder {
    /// A process with the binary's own defaults (embedded, SQLite and a generated secret under
    /// its directory) plus what [`set`](Self::set)/[`env`](Self::env) add.
    pub fn standalone() -> Self {
        Self {
            role: ProcessRole::All,
            base: None,
            overrides: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A process running on `figment` (a whole configuration, as [`crate::TestApp::figment`]).
    pub fn sharing(figment: Figment) -> Self {
        Self {
            base: Some(figment),
            ..Self::standalone()
        }
    }

    pub fn role(mut self, role: ProcessRole) -> Self {
        self.role = role;
        self
    }

    /// Override a config key for this process only (`"auction.ack_wait"`, `"2s"`).
    pub fn set<T: Serialize>(mut self, key: &str, value: T) -> Self {
        self.overrides
            .push(Figment::from(Serialized::default(key, value)));
        self
    }

    /// Merge a TOML snippet (`[cache.namespaces.reports] ...`) over the configuration.
    pub fn toml(mut self, text: &str) -> Self {
        self.overrides.push(Figment::from(Toml::string(text)));
        self
    }

    /// An environment variable for the process (`BULWARK__...` ones win over the file).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Start `bulwark [--config bulwark.toml] serve --role <role>` in a fresh directory on a
    /// free port, JSON logs (level `info` unless set) to `<dir>/log`, and wait until `/readyz`
    /// answers 200. Panics, showing the end of the log, if it is not ready in [`READY_TIMEOUT`].
    pub async fn spawn(self) -> TestProcess {
        let p = self.spawn_unready();
        p.assert_ready().await;
        p
    }

    /// `n` such processes, started together, each ready.
    pub async fn spawn_many(self, n: usize) -> Vec<TestProcess> {
        let procs: Vec<TestProcess> = (0..n).map(|_| self.start()).collect();
        for p in &procs {
            p.assert_ready().await;
        }
        procs
    }

    /// Start it without waiting for readiness.
    pub fn spawn_unready(self) -> TestProcess {
        self.start()
    }

    fn start(&self) -> TestProcess {
        let dir = tempfile::tempdir().expect("process directory");
        let port = free_port();
        let shared = self.base.is_some();
        let has_config = shared || !self.overrides.is_empty();
        let mut figment = self.base.clone().unwrap_or_default();
        if shared {
            figment = figment
                .merge(Serialized::default(
                    "data_dir",
                    dir.path().join("data").display().to_string(),
                ))
                .merge(Serialized::default("telemetry.log_level", "info"));
        }
        for o in &self.overrides {
            figment = figment.merge(o.clone());
        }
        // A metrics listener on port 0 would be a port nobody knows: pick one.
        let metrics_listen = figment
            .find_value("server.metrics_listen")
            .ok()
            .and_then(|v| v.into_string());
        let metrics_addr = metrics_listen.map(|l| {
            if l.ends_with(":0") {
                std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
            } else {
                l.parse().expect("server.metrics_listen is an address")
            }
        });
        if let Some(a) = metrics_addr {
            figment = figment.merge(Serialized::default("server.metrics_listen", a.to_string()));
        }
        let mut cmd = Command::new(bulwark_binary());
        if has_config {
            let value: toml::Value = figment.extract().expect("configuration as TOML");
            std::fs::write(
                dir.path().join("bulwark.toml"),
                toml::to_string(&value).expect("serialize the configuration"),
            )
            .expect("write bulwark.toml");
            cmd.args(["--config", "bulwark.toml"]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("log"))
            .expect("log file");
        let log2 = log.try_clone().expect("log file");
        cmd.args(["serve", "--role", self.role.as_str()])
            .current_dir(dir.path())
            .env("BULWARK__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("BULWARK__TELEMETRY__LOG_FORMAT", "json")
            .stdout(log)
            .stderr(log2);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn bulwark");
        // Tokens need the configured secret (a standalone process generates its own).
        let settings = Settings::from_figment(figment_defaults().merge(figment.clone())).ok();
        let auth = settings
            .as_ref()
            .map(|s| s.kernel.auth.clone())
            .unwrap_or_else(|| crate::services::default_settings().kernel.auth);
        let secret = settings
            .as_ref()
            .and_then(|s| s.kernel.auth.hs256_secret.as_ref())
            .map(|s| s.expose().as_bytes().to_vec());
        let http = Http::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_addr,
            auth,
            secret,
        )
        .expect("HTTP client");
        TestProcess {
            proc: Proc { child },
            http,
            dir,
        }
    }
}

/// A running `bulwark serve` child process, killed (SIGKILL) on drop. Dereferences to [`Http`].
pub struct TestProcess {
    proc: Proc,
    http: Http,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for TestProcess {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.http
    }
}

impl TestProcess {
    /// Wait for `/readyz` 200; panic, showing the log, if it does not come in
    /// [`READY_TIMEOUT`].
    pub async fn assert_ready(&self) {
        if !self.wait_ready(READY_TIMEOUT).await {
            panic!(
                "bulwark process (pid {}) not ready in {READY_TIMEOUT:?}; log:\n{}",
                self.pid(),
                self.log_tail(40)
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM (the drain).
    pub fn term(&self) {
        self.proc.term();
    }

    /// Send `signal` (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        self.proc.signal(signal);
    }

    /// Wait up to `timeout` for the process to exit; its exit code if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its working directory (config file, `log`, `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything it logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("log")).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Run `bulwark <args>` to completion in `dir` with extra environment: (exit code, stdout,
/// stderr). For commands that do not serve (`--version`, `config check`, `migrate`, ...).
pub fn run_bulwark(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bulwark_binary());
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bulwark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
