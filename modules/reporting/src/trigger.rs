//! Change capture from an embedded SQLite source (R2, R3; issue 15 item 6).
//!
//! SQLite has no WAL decoding. Triggers on each captured table append every change, as a
//! JSON array of the row, to the change log `bulwark_cdc_log` in the source database, inside
//! the writer's own transaction: a change is logged exactly when it commits. The reader
//! publishes the log in id order as the same [`Batch`]es the PostgreSQL capture sends (the log
//! id stands in for the commit LSN, so the sink's per-row guard orders them), and deletes what
//! the bus acknowledged, which keeps the log as small as the unpublished backlog.
//!
//! Snapshot and hand-over: creating a table's triggers and copying its rows into the log (as
//! `r` changes) happen in one write transaction, so no change falls between the copy and the
//! triggers, and none is logged twice. When a captured table's columns change (an added or
//! renamed column), the next read sees the new `PRAGMA schema_version`, creates the triggers
//! again with the new column list and copies the table once more, in one transaction: rows
//! written between the `ALTER` and that moment were logged without the new column, and the
//! copy, logged after them, carries it.
//!
//! docs/reporting.md ("Embedded capture") compares this with the slot capture.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::bus::Bus;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait, Value as DbValue,
};
use tokio::sync::Mutex;

use crate::capture::{CaptureError, ChangeSource, ReadOutcome, publish_batch, quote};
use crate::config::{ReportingConfig, TableConfig};
use crate::event::{Batch, Change, ColumnType, Op};

type Result<T> = std::result::Result<T, CaptureError>;

/// The change log the triggers append to.
pub const LOG_TABLE: &str = "bulwark_cdc_log";
/// Each captured table's column layouts, numbered; a log row names the layout it was written
/// with, so rows logged before a column was added still decode.
pub const LAYOUT_TABLE: &str = "bulwark_cdc_layouts";

/// PostgreSQL type OIDs the sink maps to Arrow types (sink::arrow_type).
const OID_BOOL: u32 = 16;
const OID_INT8: u32 = 20;
const OID_TEXT: u32 = 25;
const OID_FLOAT8: u32 = 701;

/// The PostgreSQL type standing for a SQLite declared type, by SQLite's affinity rules
/// (<https://sqlite.org/datatype3.html>, 3.1): INT → bigint, CHAR/CLOB/TEXT → text,
/// REAL/FLOA/DOUB and NUMERIC → double precision, BOOL → boolean; anything else (BLOB, none,
/// dates kept as text) stays text. A BLOB value travels as hex text.
pub fn type_oid(declared: &str) -> u32 {
    let t = declared.to_ascii_uppercase();
    if t.contains("BOOL") {
        OID_BOOL
    } else if t.contains("INT") {
        OID_INT8
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        OID_TEXT
    } else if t.contains("REAL")
        || t.contains("FLOA")
        || t.contains("DOUB")
        || t.contains("NUMERIC")
        || t.contains("DECIMAL")
    {
        OID_FLOAT8
    } else {
        OID_TEXT
    }
}

fn stmt(sql: &str, values: Vec<DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
}

/// A captured table as SQLite describes it.
#[derive(Debug, Clone)]
struct Table {
    /// `schema.table` as events name it (`public.t` unless the config says `main.t`), so the
    /// warehouse table and the shipped reports are the same on both sources.
    full: String,
    name: String,
    columns: Vec<ColumnType>,
}

impl Table {
    fn trigger(&self, op: char) -> String {
        trigger_name(&self.name, op)
    }

    /// `json_array(...)` of `side` (`NEW` or `OLD`): every column, a BLOB as hex text (JSON
    /// holds no BLOB, and a failing trigger would fail the user's write).
    fn json_row(&self, side: &str) -> String {
        let cols = self
            .columns
            .iter()
            .map(|c| {
                let v = if side.is_empty() {
                    quote(&c.name)
                } else {
                    format!("{side}.{}", quote(&c.name))
                };
                format!("CASE WHEN typeof({v}) = 'blob' THEN hex({v}) ELSE {v} END")
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("json_array({cols})")
    }
}

/// The trigger of `table` for `op` (`i`, `u` or `d`).
fn trigger_name(table: &str, op: char) -> String {
    format!("bulwark_cdc_{table}_{op}")
}

/// Unix microseconds in SQLite's SQL (julianday has millisecond precision).
const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/// Look `t` up in SQLite: it must be a table of the main database with a primary key, or a
/// declared key whose columns exist.
async fn describe<C: ConnectionTrait>(db: &C, t: &TableConfig, i: usize) -> Result<Table> {
    let field = format!("reporting.tables[{i}]");
    let (schema, name) = t.qualified();
    if schema != "public" && schema != "main" {
        return Err(CaptureError::Setup(format!(
            "{field}.name: a SQLite source has one schema: name the table `{name}` (or \
             `main.{name}`), not `{schema}.{name}`"
        )));
    }
    let exists = db
        .query_one(stmt(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
            vec![name.clone().into()],
        ))
        .await?
        .is_some();
    if !exists {
        return Err(CaptureError::Setup(format!(
            "{field}.name: the source has no table `{name}`"
        )));
    }
    let rows = db
        .query_all(stmt(
            &format!("PRAGMA table_info({})", quote(&name)),
            vec![],
        ))
        .await?;
    let mut columns = Vec::new();
    for r in &rows {
        let cname: String = r.try_get("", "name")?;
        let declared: String = r.try_get::<Option<String>>("", "type")?.unwrap_or_default();
        let pk: i64 = r.try_get("", "pk")?;
        let key = if t.key.is_empty() {
            pk > 0
        } else {
            t.key.contains(&cname)
        };
        columns.push(ColumnType {
            name: cname,
            type_oid: type_oid(&declared),
            type_modifier: -1,
            key,
        });
    }
    for k in &t.key {
        if !columns.iter().any(|c| &c.name == k) {
            return Err(CaptureError::Setup(format!(
                "{field}.key: `{name}` has no column `{k}`"
            )));
        }
    }
    if !columns.iter().any(|c| c.key) {
        return Err(CaptureError::Setup(format!(
            "{field}: `{name}` has no primary key, so its updates and deletes cannot be \
             matched: add a primary key, or declare `key = [\"col\", …]` for it"
        )));
    }
    Ok(Table {
        full: t.full_name(),
        name,
        columns,
    })
}

/// The trigger capture of a SQLite source.
pub struct TriggerCapture {
    cfg: ReportingConfig,
    source: DatabaseConnection,
    bus: Arc<dyn Bus>,
    /// The source's `PRAGMA schema_version` when the triggers were last checked.
    schema_version: Mutex<Option<i64>>,
    /// Layouts by (table, layout number), loaded as log rows name them.
    layouts: Mutex<HashMap<(String, i64), Vec<ColumnType>>>,
}

impl TriggerCapture {
    /// Check every configured table (exists, has a key) and create the log; the triggers and
    /// the snapshot come with the first [`ChangeSource::snapshot_missing`].
    pub async fn prepare(
        cfg: ReportingConfig,
        source: DatabaseConnection,
        bus: Arc<dyn Bus>,
    ) -> Result<Self> {
        if source.get_database_backend() != DbBackend::Sqlite {
            return Err(CaptureError::Setup(
                "reporting.source_url: the trigger capture reads a SQLite database".into(),
            ));
        }
        for (i, t) in cfg.tables.iter().enumerate() {
            describe(&source, t, i).await?;
        }
        source
            .execute_unprepared(&format!(
                "CREATE TABLE IF NOT EXISTS {LOG_TABLE} (\
                   id INTEGER PRIMARY KEY AUTOINCREMENT, \
                   tbl TEXT NOT NULL, layout INTEGER NOT NULL, op TEXT NOT NULL, \
                   row TEXT NOT NULL, old TEXT, at_us INTEGER NOT NULL); \
                 CREATE TABLE IF NOT EXISTS {LAYOUT_TABLE} (\
                   tbl TEXT NOT NULL, layout INTEGER NOT NULL, columns TEXT NOT NULL, \
                   PRIMARY KEY (tbl, layout))"
            ))
            .await?;
        Ok(Self {
            cfg,
            source,
            bus,
            schema_version: Mutex::new(None),
            layouts: Mutex::new(HashMap::new()),
        })
    }

    async fn schema_version(&self) -> Result<i64> {
        Ok(self
            .source
            .query_one(stmt("PRAGMA schema_version", vec![]))
            .await?
            .and_then(|r| r.try_get_by_index::<i64>(0).ok())
            .unwrap_or(0))
    }

    /// Bring every configured table's triggers to its current columns, copying the table into
    /// the log where they were (re)created; drop the triggers of tables no longer configured.
    /// One write transaction, so the copy and the triggers meet exactly. Returns the rows copied.
    pub async fn ensure_triggers(&self) -> Result<u64> {
        let txn = self.source.begin().await?;
        // A write first: the transaction holds SQLite's write lock from here on, so no writer
        // commits between reading the columns and creating the triggers.
        txn.execute(stmt(
            &format!("DELETE FROM {LAYOUT_TABLE} WHERE tbl = ''"),
            vec![],
        ))
        .await?;
        let mut copied = 0u64;
        let mut configured = Vec::new();
        for (i, t) in self.cfg.tables.iter().enumerate() {
            let table = describe(&txn, t, i).await?;
            configured.push(table.full.clone());
            let current = txn
                .query_one(stmt(
                    &format!(
                        "SELECT layout, columns FROM {LAYOUT_TABLE} WHERE tbl = ? \
                         ORDER BY layout DESC LIMIT 1"
                    ),
                    vec![table.full.clone().into()],
                ))
                .await?;
            let (last, same) = match current {
                Some(r) => {
                    let layout: i64 = r.try_get_by_index(0)?;
                    let cols: String = r.try_get_by_index(1)?;
                    let held: Vec<ColumnType> = serde_json::from_str(&cols).unwrap_or_default();
                    (layout, held == table.columns)
                }
                None => (0, false),
            };
            let triggers = txn
                .query_one(stmt(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? \
                     AND name IN (?, ?, ?)",
                    vec![
                        table.name.clone().into(),
                        table.trigger('i').into(),
                        table.trigger('u').into(),
                        table.trigger('d').into(),
                    ],
                ))
                .await?
                .and_then(|r| r.try_get_by_index::<i64>(0).ok())
                .unwrap_or(0);
            if same && triggers == 3 {
                continue;
            }
            let layout = last + 1;
            let columns = serde_json::to_string(&table.columns)
                .map_err(|e| CaptureError::Setup(format!("layout of {}: {e}", table.full)))?;
            txn.execute(stmt(
                &format!("INSERT INTO {LAYOUT_TABLE} (tbl, layout, columns) VALUES (?, ?, ?)"),
                vec![table.full.clone().into(), layout.into(), columns.into()],
            ))
            .await?;
            let log = |op: &str, row: &str, old: &str| {
                format!(
                    "INSERT INTO {LOG_TABLE} (tbl, layout, op, row, old, at_us) VALUES \
                     ('{}', {layout}, '{op}', {row}, {old}, {NOW_US});",
                    table.full
                )
            };
            let on = quote(&table.name);
            for (op, event, body) in [
                ('i', "INSERT", log("c", &table.json_row("NEW"), "NULL")),
                (
                    'u',
                    "UPDATE",
                    log("u", &table.json_row("NEW"), &table.json_row("OLD")),
                ),
                ('d', "DELETE", log("d", &table.json_row("OLD"), "NULL")),
            ] {
                let name = quote(&table.trigger(op));
                txn.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {name}"))
                    .await?;
                txn.execute_unprepared(&format!(
                    "CREATE TRIGGER {name} AFTER {event} ON {on} BEGIN {body} END"
                ))
                .await?;
            }
            let n = txn
                .execute(stmt(
                    &format!(
                        "INSERT INTO {LOG_TABLE} (tbl, layout, op, row, old, at_us) \
                         SELECT ?, ?, 'r', {}, NULL, {NOW_US} FROM {on}",
                        table.json_row("")
                    ),
                    vec![table.full.clone().into(), layout.into()],
                ))
                .await?
                .rows_affected();
            copied += n;
            metrics::counter!("bulwark_reporting_snapshot_rows_total", "table" => table.full.clone())
                .increment(n);
            tracing::info!(message = "Created the change triggers and copied the table into the change log.", table = %table.full, layout, rows = n, columns_changed = last > 0);
            // Layouts no log row names any more.
            txn.execute(stmt(
                &format!(
                    "DELETE FROM {LAYOUT_TABLE} WHERE tbl = ? AND layout < ? AND NOT EXISTS \
                     (SELECT 1 FROM {LOG_TABLE} l WHERE l.tbl = {LAYOUT_TABLE}.tbl \
                      AND l.layout = {LAYOUT_TABLE}.layout)"
                ),
                vec![table.full.clone().into(), layout.into()],
            ))
            .await?;
        }
        // Tables no longer configured: their triggers go, and their unpublished changes.
        let held = txn
            .query_all(stmt(
                &format!("SELECT DISTINCT tbl FROM {LAYOUT_TABLE}"),
                vec![],
            ))
            .await?;
        for r in held {
            let full: String = r.try_get_by_index(0)?;
            if configured.contains(&full) {
                continue;
            }
            let name = full.split_once('.').map_or(full.as_str(), |(_, n)| n);
            for op in ['i', 'u', 'd'] {
                txn.execute_unprepared(&format!(
                    "DROP TRIGGER IF EXISTS {}",
                    quote(&trigger_name(name, op))
                ))
                .await?;
            }
            for t in [LOG_TABLE, LAYOUT_TABLE] {
                txn.execute(stmt(
                    &format!("DELETE FROM {t} WHERE tbl = ?"),
                    vec![full.clone().into()],
                ))
                .await?;
            }
            tracing::info!(message = "Stopped capturing a table no longer configured.", table = %full);
        }
        txn.commit().await?;
        *self.schema_version.lock().await = Some(self.schema_version().await?);
        Ok(copied)
    }

    async fn layout(&self, table: &str, layout: i64) -> Result<Vec<ColumnType>> {
        let mut cache = self.layouts.lock().await;
        if let Some(c) = cache.get(&(table.to_owned(), layout)) {
            return Ok(c.clone());
        }
        let cols: Option<String> = self
            .source
            .query_one(stmt(
                &format!("SELECT columns FROM {LAYOUT_TABLE} WHERE tbl = ? AND layout = ?"),
                vec![table.to_owned().into(), layout.into()],
            ))
            .await?
            .map(|r| r.try_get_by_index(0))
            .transpose()?;
        let cols = cols.ok_or_else(|| {
            CaptureError::Setup(format!(
                "{LOG_TABLE} names layout {layout} of {table}, which {LAYOUT_TABLE} does not hold"
            ))
        })?;
        let columns: Vec<ColumnType> = serde_json::from_str(&cols)
            .map_err(|e| CaptureError::Setup(format!("layout {layout} of {table}: {e}")))?;
        cache.insert((table.to_owned(), layout), columns.clone());
        Ok(columns)
    }
}

/// A JSON array the triggers wrote, as the text values events carry.
fn text_values(json: &str, columns: &[ColumnType]) -> Result<Vec<Option<String>>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| CaptureError::Setup(format!("{LOG_TABLE}: a row is not a JSON array: {e}")))?;
    if values.len() != columns.len() {
        return Err(CaptureError::Setup(format!(
            "{LOG_TABLE}: a row has {} values for {} columns",
            values.len(),
            columns.len()
        )));
    }
    Ok(values
        .into_iter()
        .zip(columns)
        .map(|(v, c)| {
            let text = match v {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            // SQLite keeps booleans as 0 and 1; the sink reads PostgreSQL's t and f.
            Some(if c.type_oid == OID_BOOL {
                match text.as_str() {
                    "0" => "f".to_owned(),
                    "1" => "t".to_owned(),
                    _ => text,
                }
            } else {
                text
            })
        })
        .collect())
}

#[async_trait::async_trait]
impl ChangeSource for TriggerCapture {
    async fn snapshot_missing(&self) -> Result<u64> {
        self.ensure_triggers().await
    }

    async fn read_once(&self) -> Result<ReadOutcome> {
        // A schema change (an added or renamed column) re-creates the triggers first.
        let version = self.schema_version().await?;
        if *self.schema_version.lock().await != Some(version) {
            self.ensure_triggers().await?;
        }
        let limit = i64::from(self.cfg.max_changes_per_read);
        let rows = self
            .source
            .query_all(stmt(
                &format!(
                    "SELECT id, tbl, layout, op, row, old, at_us FROM {LOG_TABLE} \
                     ORDER BY id LIMIT ?"
                ),
                vec![limit.into()],
            ))
            .await?;
        let mut pending: Vec<(i64, Batch)> = Vec::new();
        let mut last_id = None;
        for r in &rows {
            let id: i64 = r.try_get_by_index(0)?;
            let table: String = r.try_get_by_index(1)?;
            let layout: i64 = r.try_get_by_index(2)?;
            let op: String = r.try_get_by_index(3)?;
            let row: String = r.try_get_by_index(4)?;
            let old: Option<String> = r.try_get_by_index(5)?;
            let at_us: i64 = r.try_get_by_index(6)?;
            let columns = self.layout(&table, layout).await?;
            let op = match op.as_str() {
                "r" => Op::Read,
                "c" => Op::Insert,
                "u" => Op::Update,
                "d" => Op::Delete,
                other => {
                    return Err(CaptureError::Setup(format!(
                        "{LOG_TABLE} row {id}: unknown operation `{other}`"
                    )));
                }
            };
            let change = Change {
                op,
                lsn: u64::try_from(id).unwrap_or(0),
                seq: 1,
                xid: 0,
                commit_time_us: at_us,
                after: text_values(&row, &columns)?,
                unchanged: Vec::new(),
                before: old.map(|o| text_values(&o, &columns)).transpose()?,
            };
            last_id = Some(id);
            match pending.last_mut() {
                Some((l, b))
                    if *l == layout
                        && b.table == table
                        && b.changes.len() < self.cfg.changes_per_message =>
                {
                    b.changes.push(change);
                }
                _ => pending.push((
                    layout,
                    Batch {
                        table,
                        columns,
                        changes: vec![change],
                    },
                )),
            }
        }
        let mut out = ReadOutcome::default();
        for (_, b) in &pending {
            publish_batch(self.bus.as_ref(), b, &b.message_id()).await?;
            out.changes += b.changes.len() as u64;
            out.messages += 1;
            metrics::counter!("bulwark_reporting_changes_captured_total", "table" => b.table.clone())
                .increment(b.changes.len() as u64);
        }
        if let Some(last) = pending.last().and_then(|(_, b)| b.changes.last()) {
            let age = chrono::Utc::now().timestamp_micros() - last.commit_time_us;
            metrics::gauge!("bulwark_reporting_capture_lag_seconds").set(age.max(0) as f64 / 1e6);
        } else {
            metrics::gauge!("bulwark_reporting_capture_lag_seconds").set(0.0);
        }
        // Published and acknowledged by the bus: the log lets go of it. A crash before this
        // publishes the same messages again, which the stream's duplicate window drops.
        if let Some(id) = last_id {
            self.source
                .execute(stmt(
                    &format!("DELETE FROM {LOG_TABLE} WHERE id <= ?"),
                    vec![id.into()],
                ))
                .await?;
            out.advanced_to = u64::try_from(id).ok();
        }
        Ok(out)
    }

    /// The log's backlog in bytes, twice: what is not yet published is all it retains.
    async fn slot_lag(&self) -> Result<Option<(i64, i64)>> {
        let bytes = self
            .source
            .query_one(stmt(
                &format!(
                    "SELECT coalesce(sum(length(row) + coalesce(length(old), 0)), 0) \
                     FROM {LOG_TABLE}"
                ),
                vec![],
            ))
            .await?
            .and_then(|r| r.try_get_by_index::<i64>(0).ok())
            .unwrap_or(0);
        Ok(Some((bytes, bytes)))
    }

    fn poll_interval(&self) -> Duration {
        self.cfg.poll_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_follow_sqlite_affinity() {
        assert_eq!(type_oid("INTEGER"), OID_INT8);
        assert_eq!(type_oid("bigint"), OID_INT8);
        assert_eq!(type_oid("VARCHAR(20)"), OID_TEXT);
        assert_eq!(type_oid("double precision"), OID_FLOAT8);
        assert_eq!(type_oid("NUMERIC(10,2)"), OID_FLOAT8);
        assert_eq!(type_oid("BOOLEAN"), OID_BOOL);
        assert_eq!(type_oid("BLOB"), OID_TEXT);
        assert_eq!(type_oid(""), OID_TEXT);
        assert_eq!(type_oid("DATETIME"), OID_TEXT);
    }

    fn cols(types: &[u32]) -> Vec<ColumnType> {
        types
            .iter()
            .enumerate()
            .map(|(i, t)| ColumnType {
                name: format!("c{i}"),
                type_oid: *t,
                type_modifier: -1,
                key: i == 0,
            })
            .collect()
    }

    #[test]
    fn json_rows_become_text_values() {
        let c = cols(&[OID_INT8, OID_TEXT, OID_FLOAT8, OID_BOOL, OID_TEXT]);
        let v = text_values(r#"[7, "a \"b\"", 1.25, 1, null]"#, &c).expect("decodes");
        assert_eq!(
            v,
            vec![
                Some("7".to_owned()),
                Some("a \"b\"".to_owned()),
                Some("1.25".to_owned()),
                Some("t".to_owned()),
                None
            ]
        );
    }

    #[test]
    fn a_row_that_does_not_fit_its_layout_is_refused() {
        let c = cols(&[OID_INT8, OID_TEXT]);
        let err = text_values("[1]", &c).expect_err("too short");
        assert!(err.to_string().contains("1 values for 2 columns"), "{err}");
        let err = text_values("{}", &c).expect_err("not an array");
        assert!(err.to_string().contains("not a JSON array"), "{err}");
    }
}
