//! The `[reporting]` config section (R2, R3, R6).

use std::time::Duration;

use bulwark_kernel::config::{ConfigError, SecretUrl};
use serde::{Deserialize, Serialize};

/// One captured source table: `[[reporting.tables]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `schema.table`, or `table` in `public`.
    pub name: String,
    /// Key columns for a table without a primary key. The capture then sets the table's
    /// `REPLICA IDENTITY FULL`, without which PostgreSQL refuses UPDATE and DELETE on a
    /// published table.
    #[serde(default)]
    pub key: Vec<String>,
    /// The warehouse (Delta) table written; default `cdc_<schema>_<table>`.
    #[serde(default)]
    pub target: Option<String>,
    /// The column a backfill's `--from`/`--to` range applies to (a timestamp or date, or Unix
    /// milliseconds in a bigint); `bulwark reporting backfill --column` overrides it.
    #[serde(default)]
    pub time_column: Option<String>,
}

impl TableConfig {
    /// `(schema, table)`.
    pub fn qualified(&self) -> (String, String) {
        match self.name.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), self.name.clone()),
        }
    }

    /// The canonical `schema.table`, as events and records name it.
    pub fn full_name(&self) -> String {
        let (s, t) = self.qualified();
        format!("{s}.{t}")
    }

    pub fn target_table(&self) -> String {
        self.target.clone().unwrap_or_else(|| {
            let (s, t) = self.qualified();
            target_name(&s, &t)
        })
    }
}

/// `cdc_<schema>_<table>`, lower-cased, anything else than letters and digits as `_`.
pub fn target_name(schema: &str, table: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    format!("cdc_{}_{}", clean(schema), clean(table))
}

/// How a report's time column counts time; its day is the UTC date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Unix milliseconds (Bulwark's own `*_at_ms` columns).
    #[default]
    Ms,
    /// Unix seconds.
    S,
    /// Unix microseconds.
    Us,
    /// A timestamp column.
    Timestamp,
    /// A date column.
    Date,
}

/// One report: `[reporting.reports.<name>]` (R4). Its summary holds, per UTC day of
/// `time_column` and per `group_by` values, each of `metrics` (an SQL aggregate over the
/// warehouse table's live rows).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    #[serde(default)]
    pub description: String,
    /// The warehouse table summarised (a CDC table is `cdc_<schema>_<table>`).
    pub table: String,
    pub time_column: String,
    #[serde(default)]
    pub time_unit: TimeUnit,
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Output name → aggregate expression (`count(*)`, `sum(amount)`, `avg(price)`).
    pub metrics: std::collections::BTreeMap<String, String>,
}

/// How the PostgreSQL slot is read (`reporting.capture_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    Stream,
    Poll,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportingConfig {
    /// The PostgreSQL whose changes are captured (the production primary). Unset: no
    /// capture runs. Needs `wal_level = logical` and a user with the REPLICATION attribute.
    pub source_url: Option<SecretUrl>,
    /// A streaming replica of the source, the only database `bulwark reporting backfill` reads
    /// (it refuses a primary).
    pub replica_url: Option<SecretUrl>,
    /// The logical replication slot (pgoutput) the capture reads and advances.
    pub slot: String,
    /// The publication naming the captured tables; created and kept in step with `tables`.
    pub publication: String,
    pub tables: Vec<TableConfig>,
    /// How a PostgreSQL source's slot is read: `stream` (the replication protocol, one
    /// long-lived session; the default) or `poll` (`pg_logical_slot_peek_binary_changes`
    /// and `pg_replication_slot_advance` over an ordinary connection, for a source that
    /// refuses replication connections). docs/benchmarks.md compares their cost on the primary.
    pub capture_mode: CaptureMode,
    /// `poll`: how often the slot is read when the last read found nothing. `stream`: how long
    /// one read waits for changes before it publishes what it has.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `stream`: while nothing of ours changes, a logical message is emitted on the source
    /// this often, so the slot can confirm past WAL written to other tables.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Changes decoded per slot read, at most (whole transactions: a read may end past it).
    pub max_changes_per_read: u32,
    /// Changes per bus message, at most.
    pub changes_per_message: usize,
    /// Rows per keyset chunk of the initial snapshot.
    pub snapshot_chunk: u32,
    /// Bus messages the sink applies in one Delta commit per table, at most.
    pub sink_batch: usize,
    /// How long a fetched message may stay unacknowledged before the bus redelivers it: the
    /// longest one apply may take, and how long a sink restarted after a crash waits for the
    /// messages the dead one held.
    #[serde(with = "humantime_serde")]
    pub sink_ack_wait: Duration,
    /// The reports served at `/api/reporting/reports/<name>`.
    pub reports: std::collections::BTreeMap<String, ReportConfig>,
    /// How often the summary DAG (`reporting_summaries`) folds new changes into the summaries:
    /// the bound on both their staleness and their cost.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
    /// The cache namespace (`[cache.namespaces.<name>]`) reports are served through.
    pub cache_namespace: String,
    /// The longest `from`..`to` range one report request may ask for, in days.
    pub max_report_days: u32,
}

impl Default for ReportingConfig {
    fn default() -> Self {
        Self {
            source_url: None,
            replica_url: None,
            slot: "bulwark_reporting".into(),
            publication: "bulwark_reporting".into(),
            tables: Vec::new(),
            capture_mode: CaptureMode::Stream,
            poll_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_secs(10),
            max_changes_per_read: 20_000,
            changes_per_message: 1000,
            snapshot_chunk: 5000,
            sink_batch: 200,
            sink_ack_wait: Duration::from_secs(60),
            reports: std::collections::BTreeMap::new(),
            summary_interval: Duration::from_secs(300),
            cache_namespace: "reporting".into(),
            max_report_days: 1000,
        }
    }
}

/// A PostgreSQL identifier the capture writes into SQL unquoted-safe: letters, digits, `_`.
fn plain_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl bulwark_kernel::config::ModuleConfig for ReportingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: String| Err(ConfigError::new(format!("reporting.{key}"), message));
        for (key, v) in [("slot", &self.slot), ("publication", &self.publication)] {
            if !plain_ident(v) || v.chars().any(|c| c.is_ascii_uppercase()) {
                return bad(
                    key,
                    format!(
                        "`{v}` is not a valid name: lower-case letters, digits and `_`, at most \
                         63, not starting with a digit"
                    ),
                );
            }
        }
        if self.poll_interval < Duration::from_millis(10) {
            return bad("poll_interval", "must be at least 10ms".into());
        }
        if self.heartbeat_interval < Duration::from_secs(1) {
            return bad("heartbeat_interval", "must be at least 1s".into());
        }
        if self.max_changes_per_read == 0 {
            return bad("max_changes_per_read", "must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.changes_per_message) {
            return bad("changes_per_message", "must be 1 to 10000".into());
        }
        if self.snapshot_chunk == 0 {
            return bad("snapshot_chunk", "must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.sink_batch) {
            return bad("sink_batch", "must be 1 to 10000".into());
        }
        if self.sink_ack_wait < Duration::from_secs(1) {
            return bad("sink_ack_wait", "must be at least 1s".into());
        }
        if self.summary_interval < Duration::from_secs(1) {
            return bad("summary_interval", "must be at least 1s".into());
        }
        if !(1..=10_000).contains(&self.max_report_days) {
            return bad("max_report_days", "must be 1 to 10000".into());
        }
        for (name, r) in &self.reports {
            let key = |k: &str| format!("reports.{name}.{k}");
            if !plain_ident(name) || name.chars().any(|c| c.is_ascii_uppercase()) {
                return bad(
                    &format!("reports.{name}"),
                    "a report name is lower-case letters, digits and `_`".into(),
                );
            }
            if let Err(m) = bulwark_pipeline::data::valid_name(&r.table) {
                return bad(&key("table"), m);
            }
            for (k, c) in std::iter::once(("time_column", &r.time_column))
                .chain(r.group_by.iter().map(|g| ("group_by", g)))
            {
                if !plain_ident(c) {
                    return bad(&key(k), format!("`{c}` is not a plain column name"));
                }
            }
            if r.metrics.is_empty() {
                return bad(
                    &key("metrics"),
                    "at least one metric, e.g. `n = \"count(*)\"`".into(),
                );
            }
            for (m, expr) in &r.metrics {
                if !plain_ident(m) || r.group_by.contains(m) || m == "day" {
                    return bad(
                        &key(&format!("metrics.{m}")),
                        "a metric name is a plain name, not `day` nor a group_by column".into(),
                    );
                }
                if expr.trim().is_empty() || expr.contains(';') || expr.contains("--") {
                    return bad(
                        &key(&format!("metrics.{m}")),
                        format!("`{expr}` is not one aggregate expression"),
                    );
                }
            }
        }
        let scheme = |u: &SecretUrl| {
            u.expose()
                .split_once(':')
                .map(|(s, _)| s.to_ascii_lowercase())
                .unwrap_or_default()
        };
        let sqlite_source = self.source_url.as_ref().map(scheme).as_deref() == Some("sqlite");
        if let Some(u) = &self.source_url
            && !matches!(scheme(u).as_str(), "postgres" | "postgresql" | "sqlite")
        {
            return bad(
                "source_url",
                format!(
                    "`{}` is neither a PostgreSQL URL (postgres://…, captured from a logical \
                     slot) nor a SQLite one (sqlite://…, captured by triggers)",
                    u.redacted()
                ),
            );
        }
        if let Some(u) = &self.source_url
            && !sqlite_source
            && self.capture_mode == CaptureMode::Stream
            && let Err(m) =
                crate::stream::replication_config(u.expose(), &self.slot, &self.publication)
        {
            return bad(
                "source_url",
                format!(
                    "`{}` {m}; capture_mode = \"stream\" opens a replication connection with it",
                    u.redacted()
                ),
            );
        }
        if let Some(u) = &self.replica_url
            && !matches!(scheme(u).as_str(), "postgres" | "postgresql")
        {
            return bad(
                "replica_url",
                format!(
                    "`{}` is not a PostgreSQL URL: a backfill reads a streaming replica",
                    u.redacted()
                ),
            );
        }
        if self.source_url.is_some() && self.tables.is_empty() {
            return bad(
                "tables",
                "`source_url` is set but no table is captured: add [[reporting.tables]] entries"
                    .into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut targets = std::collections::BTreeSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let (s, n) = t.qualified();
            if !plain_ident(&s) || !plain_ident(&n) || n.contains('.') {
                return bad(
                    &format!("tables[{i}].name"),
                    format!(
                        "`{}` is not `schema.table` of plain names (letters, digits, `_`)",
                        t.name
                    ),
                );
            }
            if sqlite_source && s != "public" && s != "main" {
                return bad(
                    &format!("tables[{i}].name"),
                    format!(
                        "`{}`: a SQLite source has one schema; name the table `{n}` or `main.{n}`",
                        t.name
                    ),
                );
            }
            if !seen.insert(t.full_name()) {
                return bad(
                    &format!("tables[{i}].name"),
                    format!("`{}` is listed twice", t.full_name()),
                );
            }
            for k in t.key.iter().chain(t.time_column.iter()) {
                if !plain_ident(k) {
                    return bad(
                        &format!("tables[{i}].key"),
                        format!("`{k}` is not a plain column name"),
                    );
                }
            }
            let target = t.target_table();
            if let Err(m) = bulwark_pipeline::data::valid_name(&target) {
                return bad(&format!("tables[{i}].target"), m);
            }
            if !targets.insert(target.clone()) {
                return bad(
                    &format!("tables[{i}].target"),
                    format!("two tables write `{target}`"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_kernel::config::ModuleConfig;

    fn with_tables(names: &[&str]) -> ReportingConfig {
        ReportingConfig {
            source_url: Some(SecretUrl::new("postgres://x@localhost/db")),
            tables: names
                .iter()
                .map(|n| TableConfig {
                    name: (*n).into(),
                    key: vec![],
                    target: None,
                    time_column: None,
                })
                .collect(),
            ..ReportingConfig::default()
        }
    }

    #[test]
    fn names_and_targets() {
        let t = TableConfig {
            name: "Sales.Orders".into(),
            key: vec![],
            target: None,
            time_column: None,
        };
        assert_eq!(t.full_name(), "Sales.Orders");
        assert_eq!(t.target_table(), "cdc_sales_orders");
        let p = TableConfig {
            name: "bids".into(),
            key: vec![],
            target: None,
            time_column: None,
        };
        assert_eq!(p.full_name(), "public.bids");
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(ReportingConfig::default().validate().is_ok());
        assert!(with_tables(&["public.bids", "auctions"]).validate().is_ok());
        let e = with_tables(&[]).validate().expect_err("must be refused");
        assert!(e.to_string().contains("reporting.tables"), "{e}");
        let e = with_tables(&["bids; drop table x"])
            .validate()
            .expect_err("must be refused");
        assert!(e.to_string().contains("reporting.tables[0].name"), "{e}");
        let e = with_tables(&["bids", "public.bids"])
            .validate()
            .expect_err("must be refused");
        assert!(e.to_string().contains("listed twice"), "{e}");
        let mut c = with_tables(&["bids"]);
        c.slot = "Bad-Slot".into();
        assert!(
            c.validate()
                .expect_err("must be refused")
                .to_string()
                .contains("reporting.slot")
        );
        let mut c = with_tables(&["bids"]);
        c.tables[0].key = vec!["a b".into()];
        assert!(
            c.validate()
                .expect_err("must be refused")
                .to_string()
                .contains("tables[0].key")
        );
    }

    /// R2: the source's scheme picks the capture; anything else is named.
    #[test]
    fn source_and_replica_urls_are_checked() {
        let mut c = with_tables(&["bids"]);
        c.source_url = Some(SecretUrl::new("sqlite://data/bulwark.db"));
        assert!(c.validate().is_ok());
        c.tables[0].name = "main.bids".into();
        assert!(c.validate().is_ok());
        c.tables[0].name = "sales.bids".into();
        let e = c.validate().expect_err("SQLite has one schema");
        assert!(e.to_string().contains("reporting.tables[0].name"), "{e}");
        c.tables[0].name = "bids".into();
        c.source_url = Some(SecretUrl::new("mysql://u:pw@db/x"));
        let e = c.validate().expect_err("unknown scheme");
        assert!(e.to_string().contains("reporting.source_url"), "{e}");
        assert!(
            !e.to_string().contains("pw"),
            "the password is redacted: {e}"
        );
        c.source_url = Some(SecretUrl::new("postgres://db.example/x"));
        let e = c.validate().expect_err("streaming needs a user");
        assert!(e.to_string().contains("reporting.source_url"), "{e}");
        assert!(e.to_string().contains("names no user"), "{e}");
        c.capture_mode = CaptureMode::Poll;
        assert!(
            c.validate().is_ok(),
            "an ordinary connection may take the default user"
        );
        let mut c = with_tables(&["bids"]);
        c.heartbeat_interval = Duration::from_millis(10);
        let e = c.validate().expect_err("too frequent");
        assert!(
            e.to_string().contains("reporting.heartbeat_interval"),
            "{e}"
        );
        let e = serde_json::from_str::<ReportingConfig>(r#"{"capture_mode": "sometimes"}"#)
            .expect_err("unknown mode");
        assert!(
            e.to_string().contains("stream") && e.to_string().contains("poll"),
            "{e}"
        );
        let mut c = with_tables(&["bids"]);
        c.replica_url = Some(SecretUrl::new("sqlite://replica.db"));
        let e = c.validate().expect_err("a backfill reads PostgreSQL");
        assert!(e.to_string().contains("reporting.replica_url"), "{e}");
    }
}
