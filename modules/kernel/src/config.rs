//! Layered configuration (K2): compiled-in `config/default.toml` < a file given by `--config`
//! or `BULWARK_CONFIG` < environment variables `BULWARK__SECTION__KEY`.
//!
//! The kernel owns the sections below; each module owns the section named after it and
//! extracts it itself with [`Settings::section`]. Every struct denies unknown fields, and an
//! error always names the key's full path (`server.listen`), so a typo fails at start.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use figment::Figment;
use figment::providers::Env;
pub use figment::providers::{Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

/// The embedded defaults, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Sections owned by the kernel.
pub const KERNEL_SECTIONS: &[&str] = &[
    "mode",
    "data_dir",
    "server",
    "telemetry",
    "database",
    "bus",
    "redis",
    "auth",
    "drain",
    "modules",
];

/// A configuration error, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Full dotted path of the offending key (`server.listen`).
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    fn from_figment(prefix: &[&str], err: figment::Error) -> Self {
        use figment::error::Kind;
        let mut path: Vec<String> = prefix.iter().map(|s| (*s).to_owned()).collect();
        path.extend(err.path.iter().cloned());
        let source = err
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(src) => format!(" (from {} {src})", m.name),
                None => format!(" (from {})", m.name),
            })
            .unwrap_or_default();
        let message = match &err.kind {
            Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                if expected.is_empty() {
                    "unknown key; this section accepts no keys yet".to_owned()
                } else {
                    format!("unknown key; expected one of: {}", expected.join(", "))
                }
            }
            Kind::MissingField(field) => {
                if path.last().map(String::as_str) != Some(field.as_ref()) {
                    path.push(field.to_string());
                }
                "missing required key".to_owned()
            }
            other => other.to_string(),
        };
        Self {
            key: path.join("."),
            message: format!("{message}{source}"),
        }
    }
}

/// A secret string: deserializes from a plain string, never prints or serializes its value.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret value. Call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// A URL that may carry credentials (`postgres://user:pass@host/db`): printed with the
/// password replaced.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `[redacted]`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

fn redact_url(url: &str) -> String {
    // scheme://user:password@host... -> scheme://user:[redacted]@host...
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let redacted = if userinfo.contains(':') {
                format!("{user}:[redacted]")
            } else if user.is_empty() {
                String::new()
            } else {
                "[redacted]".to_owned()
            };
            format!("{}://{}@{}", &url[..scheme_end], redacted, &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Serialize a duration as humantime (`250ms`, `5s`).
pub mod duration {
    pub use humantime_serde::deserialize;
    pub use humantime_serde::serialize;
    /// For `Option<Duration>` fields.
    pub mod option {
        pub use humantime_serde::option::{deserialize, serialize};
    }
}

/// How the process runs: `embedded` fills in what is missing (a generated JWT secret, the
/// in-process bus and store); `production` refuses to start without the real services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Embedded,
    Production,
}

/// Everything the kernel reads. Module sections are read by their modules. (Unknown top-level
/// sections are refused by [`Settings::from_figment`]; every section below denies unknown keys.)
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KernelConfig {
    /// `embedded` (default) or `production`.
    pub mode: Mode,
    /// Directory for the embedded database, the generated JWT secret and local state.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub telemetry: TelemetryConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub drain: DrainConfig,
    pub modules: ModulesConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds (`127.0.0.1:8080`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// Separate address for `/metrics`; unset serves it on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest accepted request body, in bytes.
    pub body_limit_bytes: usize,
    /// Requests taking longer are answered 408 (WebSockets are exempt once upgraded).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Origins allowed by CORS; empty disables CORS headers, `*` allows any.
    pub cors_allowed_origins: Vec<String>,
    /// Compress responses (gzip) when the client accepts it.
    pub compression: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `auto`, `json` or `pretty`.
    pub log_format: LogFormat,
    /// tracing filter directive (`info`, `bulwark_kernel=debug,info`); `RUST_LOG` overrides.
    pub log_level: String,
    /// OTLP/HTTP endpoint for traces (`http://otel-collector:4318`); unset disables export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported traces.
    pub service_name: String,
    /// Fraction of root traces sampled (0.0–1.0); parents' decisions are honoured.
    pub trace_sample_ratio: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://data/bulwark.db` (embedded) or `postgres://user:pass@host/db`.
    pub url: SecretUrl,
    /// Read-only connection for expensive reads (a replica in production); unset uses `url`.
    pub read_url: Option<SecretUrl>,
    pub max_connections: u32,
    pub min_connections: u32,
    /// How long start-up keeps retrying an unreachable database before exiting 1.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// How long a request waits for a pooled connection.
    #[serde(with = "duration")]
    pub acquire_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// SQLite only: how long a writer waits for the lock.
    #[serde(with = "duration")]
    pub sqlite_busy_timeout: Duration,
    /// `serve` applies pending migrations at start.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// `nats://host:4222`; unset uses the embedded bus in the database.
    pub url: Option<SecretUrl>,
    /// Prefix for stream names and subjects (isolates tenants and tests on one NATS).
    pub prefix: String,
    /// Default duplicate window of streams (JetStream's default is 2 minutes).
    #[serde(with = "duration")]
    pub duplicate_window: Duration,
    /// Timeout of one bus request (publish ack, fetch, stream declaration).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Embedded bus: how often idle consumers look for new or due messages.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`, `redis-sentinel://...`, `redis-cluster://...`; unset uses the
    /// in-process store.
    pub url: Option<SecretUrl>,
    /// Prefix of every key and channel (isolates tenants and tests on one Redis).
    pub key_prefix: String,
    /// Timeout of one command.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 signing secret. Embedded mode generates one into `<data_dir>/jwt-secret` when unset.
    pub hs256_secret: Option<Secret>,
    /// JWKS URL of an identity provider (RS256/ES256); when set, tokens are verified against it.
    pub jwks_url: Option<String>,
    /// How often the JWKS is refreshed (it is also refetched on an unknown `kid`).
    #[serde(with = "duration")]
    pub jwks_refresh: Duration,
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// Claim that holds the role (`role`; a string or an array of strings).
    pub role_claim: String,
    /// Allowed clock skew for `exp`/`nbf`.
    #[serde(with = "duration")]
    pub leeway: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// After SIGTERM, keep serving (readiness 503) this long so load balancers stop routing.
    #[serde(with = "duration")]
    pub grace: Duration,
    /// Then at most this long for in-flight requests, sockets and bus handlers to finish.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModulesConfig {
    /// Compiled-in modules this process runs; `["*"]` runs all of them.
    pub enabled: Vec<String>,
}

/// A module's config section type: every field has a default (a missing section reads as an
/// empty table) and `validate` checks what serde cannot, naming the full key.
pub trait ModuleConfig: DeserializeOwned + Serialize {
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// A module's section, read by [`Settings::module_section`].
#[derive(Debug, Clone)]
pub struct Section<T> {
    pub value: T,
    /// The section as effective config (JSON; secrets redacted).
    pub effective: serde_json::Value,
}

/// The merged configuration: the kernel's typed part plus the raw figment for module sections.
#[derive(Clone)]
pub struct Settings {
    figment: Figment,
    pub kernel: KernelConfig,
    /// Top-level sections that are not the kernel's: checked against the app's module list by
    /// [`Settings::check_modules`].
    other_sections: Vec<String>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Defaults < `file` (or `BULWARK_CONFIG`) < environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os("BULWARK_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = &file {
            if !path.exists() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("BULWARK__").split("__"));
        Self::from_figment(figment)
    }

    /// Build from an explicit figment (tests layer their own values this way).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let top: BTreeMap<String, figment::value::Value> = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(&[], e))?;
        let other_sections = top
            .into_keys()
            .filter(|key| !KERNEL_SECTIONS.contains(&key.as_str()))
            .collect();
        let kernel: KernelConfig = figment
            .extract()
            .map_err(|e| ConfigError::from_figment(&[], e))?;
        let settings = Self {
            figment,
            kernel,
            other_sections,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Check the sections and `modules.enabled` against the modules the app knows: `known`
    /// are all module names of the codebase, `compiled` those in this binary. The kernel keeps
    /// no list of modules; the app hands it its own. Returns the sections that belong to a
    /// known module that is not compiled in (ignored; the caller warns about them).
    pub fn check_modules(
        &self,
        known: &[&str],
        compiled: &[&str],
    ) -> Result<Vec<String>, ConfigError> {
        let is_module = |name: &str| known.contains(&name) || compiled.contains(&name);
        let mut ignored = Vec::new();
        for key in &self.other_sections {
            if !is_module(key) {
                return Err(ConfigError::new(
                    key.clone(),
                    format!(
                        "unknown section; expected one of: {}, {}",
                        KERNEL_SECTIONS.join(", "),
                        known.join(", ")
                    ),
                ));
            }
            if !compiled.contains(&key.as_str()) {
                ignored.push(key.clone());
            }
        }
        for name in &self.kernel.modules.enabled {
            if name != "*" && !is_module(name) {
                return Err(ConfigError::new(
                    "modules.enabled",
                    format!(
                        "unknown module `{name}`; expected `*` or some of: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(ignored)
    }

    /// Read, validate and render a module's section in one step: the typed value for `start`
    /// and the effective config (secrets redacted by their types) for `check_config`, the
    /// status route and `config check`.
    pub fn module_section<T: ModuleConfig>(&self, name: &str) -> Result<Section<T>, ConfigError> {
        let value: T = self.section(name)?;
        value.validate()?;
        let effective =
            serde_json::to_value(&value).map_err(|e| ConfigError::new(name, e.to_string()))?;
        Ok(Section { value, effective })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kernel;
        if !(0.0..=1.0).contains(&k.telemetry.trace_sample_ratio) {
            return Err(ConfigError::new(
                "telemetry.trace_sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        let db = k.database.url.expose();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        if k.database.max_connections == 0
            || k.database.min_connections > k.database.max_connections
        {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1 and at least database.min_connections",
            ));
        }
        if let Some(url) = &k.bus.url
            && !(url.expose().starts_with("nats://") || url.expose().starts_with("tls://"))
        {
            return Err(ConfigError::new(
                "bus.url",
                "must start with nats:// or tls://",
            ));
        }
        if let Some(url) = &k.redis.url
            && !url.expose().starts_with("redis")
            && !url.expose().starts_with("rediss")
        {
            return Err(ConfigError::new(
                "redis.url",
                "must be a redis://, rediss://, redis-sentinel:// or redis-cluster:// URL",
            ));
        }
        if k.server.body_limit_bytes == 0 {
            return Err(ConfigError::new(
                "server.body_limit_bytes",
                "must be greater than 0",
            ));
        }
        if k.mode == Mode::Production {
            if k.auth.hs256_secret.is_none() && k.auth.jwks_url.is_none() {
                return Err(ConfigError::new(
                    "auth.hs256_secret",
                    "production mode needs auth.hs256_secret or auth.jwks_url",
                ));
            }
            if k.bus.url.is_none() {
                return Err(ConfigError::new(
                    "bus.url",
                    "production mode needs a NATS URL",
                ));
            }
            if k.redis.url.is_none() {
                return Err(ConfigError::new(
                    "redis.url",
                    "production mode needs a Redis URL",
                ));
            }
            if db.starts_with("sqlite:") {
                return Err(ConfigError::new(
                    "database.url",
                    "production mode needs PostgreSQL",
                ));
            }
        }
        if let Some(s) = &k.auth.hs256_secret
            && s.expose().len() < 32
        {
            return Err(ConfigError::new(
                "auth.hs256_secret",
                "must be at least 32 characters",
            ));
        }
        Ok(())
    }

    /// Extract a module's section (named after the module). A missing section deserializes from an empty
    /// table, so modules give every field a default.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, ConfigError> {
        let sub = if self.figment.contains(name) {
            self.figment.focus(name)
        } else {
            Figment::new()
        };
        sub.extract()
            .map_err(|e| ConfigError::from_figment(&[name], e))
    }

    /// Whether a section is present at all.
    pub fn has_section(&self, name: &str) -> bool {
        self.figment.contains(name)
    }

    /// Is this compiled-in module enabled by `modules.enabled`?
    pub fn module_enabled(&self, name: &str) -> bool {
        self.kernel
            .modules
            .enabled
            .iter()
            .any(|m| m == "*" || m == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() {
        let s = Settings::from_figment(Figment::from(Toml::string(DEFAULT_TOML)))
            .expect("defaults are valid");
        assert_eq!(s.kernel.mode, Mode::Embedded);
        assert_eq!(s.kernel.server.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_kernel_key_is_named() {
        let f = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("server.listn", "x"));
        let err = Settings::from_figment(f).expect_err("unknown key");
        assert_eq!(err.key, "server.listn");
    }

    /// The module sections config/default.toml itself declares, read from the defaults so the
    /// kernel's tests never spell a module's name: known to every test below, like the app's
    /// compiled-in modules.
    fn default_modules() -> Vec<String> {
        Settings::from_figment(Figment::from(Toml::string(DEFAULT_TOML)))
            .expect("defaults are valid")
            .other_sections
    }

    /// `extra` followed by the default module sections, as the `&str` list `check_modules` takes.
    fn with_defaults<'a>(extra: &[&'a str], defaults: &'a [String]) -> Vec<&'a str> {
        extra
            .iter()
            .copied()
            .chain(defaults.iter().map(String::as_str))
            .collect()
    }

    #[test]
    fn unknown_section_is_named() {
        let f = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("serverr.listen", "x"))
            .merge(Serialized::default("cash.x", 1));
        let s = Settings::from_figment(f).expect("kernel sections are valid");
        let defaults = default_modules();
        let err = s
            .check_modules(&with_defaults(&["cash"], &defaults), &[])
            .expect_err("unknown section");
        assert_eq!(err.key, "serverr");
    }

    #[test]
    fn sections_of_modules_not_compiled_in_are_ignored() {
        let f = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default("m2.x", 1));
        let s = Settings::from_figment(f).expect("valid");
        let defaults = default_modules();
        let both = with_defaults(&["m1", "m2"], &defaults);
        assert_eq!(
            s.check_modules(&both, &with_defaults(&["m1"], &defaults))
                .expect("known"),
            vec!["m2".to_owned()]
        );
        assert!(s.check_modules(&both, &both).expect("known").is_empty());
    }

    #[test]
    fn unknown_enabled_module_is_named() {
        let f = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("modules.enabled", vec!["m1", "m3"]));
        let s = Settings::from_figment(f).expect("kernel part is valid");
        let defaults = default_modules();
        let known = with_defaults(&["m1"], &defaults);
        let err = s.check_modules(&known, &known).expect_err("m3 is unknown");
        assert_eq!(err.key, "modules.enabled");
        assert!(err.message.contains("`m3`"), "{}", err.message);
    }

    #[test]
    fn bad_duration_is_named() {
        let f = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("drain.grace", "soon"));
        let err = Settings::from_figment(f).expect_err("bad duration");
        assert_eq!(err.key, "drain.grace");
    }

    #[test]
    fn production_requires_services_and_secret() {
        let f = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("mode", "production"));
        let err = Settings::from_figment(f).expect_err("production needs a secret");
        assert_eq!(err.key, "auth.hs256_secret");
    }

    #[test]
    fn secrets_are_redacted() {
        let url = SecretUrl::new("postgres://app:hunter2@db:5432/bulwark");
        assert_eq!(url.redacted(), "postgres://app:[redacted]@db:5432/bulwark");
        assert!(!format!("{url:?}").contains("hunter2"));
        let s = Secret::new("topsecret");
        assert_eq!(
            serde_json::to_string(&s).expect("serialize"),
            "\"[redacted]\""
        );
        assert_eq!(
            SecretUrl::new("sqlite://data/x.db").redacted(),
            "sqlite://data/x.db"
        );
    }
}
