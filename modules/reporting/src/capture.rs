//! Change capture from a PostgreSQL primary (R2, R3): a publication and a logical replication
//! slot (pgoutput), read by polling `pg_logical_slot_peek_binary_changes` and advanced only
//! after the bus acknowledged every message of the read.
//!
//! * **No loss**: the slot is advanced past a read only once its changes are stored on the
//!   `CDC` stream. A crash in between re-reads them; the stream's duplicate window and the
//!   sink's LSN guard make the replay harmless.
//! * **Bounded WAL**: each read is bounded by `pg_current_wal_lsn()` taken just before it;
//!   when the read reached that bound the slot is advanced to it even if nothing of ours was
//!   in between, so writes to other tables (or databases) never pile up behind an idle slot.
//! * **Snapshot, then stream**: the slot and the publication exist before a table's first
//!   snapshot is read, so every change after the read is in the slot, and changes between slot
//!   and read are applied again over the snapshot rows, which the LSN guard orders (a snapshot
//!   row has LSN 0 and never overwrites a streamed one).
//! * **One reader**: PostgreSQL lets one session use a slot at a time; a second capture
//!   process finds it active and waits for its turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::bus::{Bus, Headers};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value as DbValue};
use thiserror::Error;

use crate::config::{ReportingConfig, TableConfig};
use crate::event::{Batch, Change, ColumnType, Op, subject};
use crate::pgoutput::{self, Message, Relation, Value, format_lsn, parse_lsn};

#[derive(Debug, Error)]
pub enum CaptureError {
    /// A problem with the source or the config that a retry will not fix.
    #[error("{0}")]
    Setup(String),
    #[error("source database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("bus: {0}")]
    Bus(#[from] bulwark_kernel::bus::BusError),
    /// The replication session failed or ended; the next read opens a new one.
    #[error("replication stream: {0}")]
    Stream(String),
    #[error("bulwark database: {0}")]
    State(sea_orm::DbErr),
}

type Result<T> = std::result::Result<T, CaptureError>;

fn stmt(sql: &str, values: Vec<DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Store one change batch on the `CDC` stream under message id `id`; returns once the bus
/// acknowledged it. Both sources publish this way.
pub(crate) async fn publish_batch(bus: &dyn Bus, batch: &Batch, id: &str) -> Result<()> {
    let payload = serde_json::to_vec(batch)
        .map_err(|e| CaptureError::Setup(format!("encoding a change batch: {e}")))?;
    let mut headers = Headers::new();
    headers.insert("Content-Type".into(), "application/json".into());
    bus.publish(&subject(&batch.table), Some(id), headers, payload.into())
        .await?;
    Ok(())
}

/// Where changes come from: the PostgreSQL slot ([`Capture`]) or, on an embedded SQLite
/// source, the trigger-fed change log ([`crate::trigger::TriggerCapture`]). [`run`] drives
/// either the same way.
#[async_trait::async_trait]
pub trait ChangeSource: Send + Sync {
    /// Snapshot every table that has none yet; the rows copied.
    async fn snapshot_missing(&self) -> Result<u64>;
    /// Read what is new once, publish it, and only then let the source forget it.
    async fn read_once(&self) -> Result<ReadOutcome>;
    /// (bytes not yet confirmed, bytes the source retains for the capture).
    async fn slot_lag(&self) -> Result<Option<(i64, i64)>>;
    /// How long to wait after a read that found nothing.
    fn poll_interval(&self) -> Duration;
}

#[async_trait::async_trait]
impl ChangeSource for Capture {
    async fn snapshot_missing(&self) -> Result<u64> {
        Capture::snapshot_missing(self).await
    }
    async fn read_once(&self) -> Result<ReadOutcome> {
        Capture::read_once(self).await
    }
    async fn slot_lag(&self) -> Result<Option<(i64, i64)>> {
        Capture::slot_lag(self).await
    }
    fn poll_interval(&self) -> Duration {
        self.cfg.poll_interval
    }
}

/// A captured table as the source describes it.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub cfg: TableConfig,
    pub schema: String,
    pub name: String,
    /// Columns in attribute order, with their SQL type text for keyset casts.
    pub columns: Vec<(ColumnType, String)>,
}

impl SourceTable {
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
    pub(crate) fn sql_name(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
    /// The key columns' values of a row (in column order).
    pub(crate) fn key_of(&self, row: &[Option<String>]) -> Vec<Option<String>> {
        self.columns
            .iter()
            .zip(row)
            .filter(|((c, _), _)| c.key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub(crate) fn column_types(&self) -> Vec<ColumnType> {
        self.columns.iter().map(|(c, _)| c.clone()).collect()
    }
}

/// The capture's connections and what it learnt at start.
pub struct Capture {
    pub cfg: ReportingConfig,
    pub source: DatabaseConnection,
    /// Bulwark's own database: the slot and snapshot records.
    pub state: DatabaseConnection,
    pub bus: Arc<dyn Bus>,
    pub tables: Vec<SourceTable>,
}

/// What one read of the slot did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadOutcome {
    pub changes: u64,
    pub messages: u64,
    /// Where the slot now stands.
    pub advanced_to: Option<u64>,
}

impl Capture {
    /// Check the source and the tables, create the publication and the slot as needed.
    pub async fn prepare(
        cfg: ReportingConfig,
        source: DatabaseConnection,
        state: DatabaseConnection,
        bus: Arc<dyn Bus>,
    ) -> Result<Self> {
        let wal_level = one_text(&source, "SELECT current_setting('wal_level')", vec![]).await?;
        if wal_level.as_deref() != Some("logical") {
            return Err(CaptureError::Setup(format!(
                "reporting.source_url: the source's wal_level is `{}`; change capture needs \
                 `wal_level = logical` (postgresql.conf, then a restart)",
                wal_level.unwrap_or_default()
            )));
        }
        let mut tables = Vec::new();
        for (i, t) in cfg.tables.iter().enumerate() {
            tables.push(describe(&source, t, i, true).await?);
        }
        let capture = Self {
            cfg,
            source,
            state,
            bus,
            tables,
        };
        capture.ensure_publication().await?;
        capture.ensure_slot().await?;
        Ok(capture)
    }

    async fn ensure_publication(&self) -> Result<()> {
        let name = &self.cfg.publication;
        let exists = one_text(
            &self.source,
            "SELECT pubname::text FROM pg_publication WHERE pubname = $1",
            vec![name.clone().into()],
        )
        .await?
        .is_some();
        let list = self
            .tables
            .iter()
            .map(SourceTable::sql_name)
            .collect::<Vec<_>>()
            .join(", ");
        if !exists {
            self.source
                .execute_unprepared(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {list}",
                    quote(name)
                ))
                .await?;
            return Ok(());
        }
        let rows = self
            .source
            .query_all(stmt(
                "SELECT schemaname::text || '.' || tablename::text AS t FROM pg_publication_tables \
                 WHERE pubname = $1",
                vec![name.clone().into()],
            ))
            .await?;
        let have: std::collections::BTreeSet<String> = rows
            .iter()
            .filter_map(|r| r.try_get_by_index::<String>(0).ok())
            .collect();
        let missing: Vec<String> = self
            .tables
            .iter()
            .filter(|t| !have.contains(&t.full_name()))
            .map(SourceTable::sql_name)
            .collect();
        if !missing.is_empty() {
            self.source
                .execute_unprepared(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote(name),
                    missing.join(", ")
                ))
                .await?;
        }
        Ok(())
    }

    async fn ensure_slot(&self) -> Result<()> {
        let slot = &self.cfg.slot;
        let row = self
            .source
            .query_one(stmt(
                "SELECT plugin::text, slot_type::text, database::text, \
                 coalesce(wal_status, '')::text, current_database()::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                vec![slot.clone().into()],
            ))
            .await?;
        let recorded = self
            .state
            .query_one(self.state_stmt(
                "SELECT slot FROM reporting_slots WHERE slot = $1",
                vec![slot.clone().into()],
            ))
            .await
            .map_err(CaptureError::State)?
            .is_some();
        let Some(row) = row else {
            let lsn = one_text(
                &self.source,
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                vec![slot.clone().into()],
            )
            .await?
            .unwrap_or_default();
            // A slot re-created after being lost starts a new history: every table is
            // snapshotted again.
            self.exec_state(
                "DELETE FROM reporting_tables WHERE slot = $1",
                vec![slot.clone().into()],
            )
            .await?;
            self.exec_state(
                "DELETE FROM reporting_slots WHERE slot = $1",
                vec![slot.clone().into()],
            )
            .await?;
            self.exec_state(
                "INSERT INTO reporting_slots (slot, publication, created_lsn, created_at_ms) \
                 VALUES ($1, $2, $3, $4)",
                vec![
                    slot.clone().into(),
                    self.cfg.publication.clone().into(),
                    lsn.clone().into(),
                    now_ms().into(),
                ],
            )
            .await?;
            tracing::info!(message = "Created the replication slot.", slot = %slot, lsn = %lsn);
            return Ok(());
        };
        let get = |i: usize| row.try_get_by_index::<String>(i).unwrap_or_default();
        let (plugin, kind, database, wal_status, current) =
            (get(0), get(1), get(2), get(3), get(4));
        if kind != "logical" || plugin != "pgoutput" || database != current || !recorded {
            return Err(CaptureError::Setup(format!(
                "reporting.slot: a replication slot `{slot}` exists ({kind}, plugin `{plugin}`, \
                 database `{database}`) and this Bulwark did not create it; it belongs to \
                 someone else: choose another `reporting.slot`, or drop that slot if it is \
                 abandoned"
            )));
        }
        if wal_status == "lost" {
            return Err(CaptureError::Setup(format!(
                "reporting.slot: the replication slot `{slot}` was invalidated (the WAL it \
                 needed was removed, max_slot_wal_keep_size); drop it with \
                 `SELECT pg_drop_replication_slot('{slot}')` and restart: the capture creates it \
                 again and snapshots every table (docs/runbooks/reporting.md)"
            )));
        }
        Ok(())
    }

    /// A statement on Bulwark's own database (SQLite or PostgreSQL).
    fn state_stmt(&self, sql: &str, values: Vec<DbValue>) -> Statement {
        Statement::from_sql_and_values(self.state.get_database_backend(), sql, values)
    }

    async fn exec_state(&self, sql: &str, values: Vec<DbValue>) -> Result<()> {
        self.state
            .execute(self.state_stmt(sql, values))
            .await
            .map_err(CaptureError::State)?;
        Ok(())
    }

    /// Publish the initial snapshot of every table that has none yet.
    pub async fn snapshot_missing(&self) -> Result<u64> {
        let mut total = 0;
        for t in &self.tables {
            let done = self
                .state
                .query_one(self.state_stmt(
                    "SELECT source_table FROM reporting_tables WHERE source_table = $1",
                    vec![t.full_name().into()],
                ))
                .await
                .map_err(CaptureError::State)?
                .is_some();
            if !done {
                total += self.snapshot(t).await?;
            }
        }
        Ok(total)
    }

    /// Read `t` in keyset chunks and publish it as `r` changes.
    async fn snapshot(&self, t: &SourceTable) -> Result<u64> {
        let at = one_text(&self.source, "SELECT pg_current_wal_lsn()::text", vec![])
            .await?
            .unwrap_or_default();
        tracing::info!(message = "Snapshotting a table.", table = %t.full_name(), lsn = %at);
        let mut last: Option<Vec<Option<String>>> = None;
        let mut rows_total = 0u64;
        let mut chunk_no = 0u64;
        let columns = t.column_types();
        loop {
            let rows = keyset_page(
                &self.source,
                t,
                None,
                last.as_deref(),
                self.cfg.snapshot_chunk,
            )
            .await?;
            if rows.is_empty() {
                break;
            }
            let read_at = chrono::Utc::now().timestamp_micros();
            let mut changes = Vec::with_capacity(rows.len());
            for after in rows.iter().cloned() {
                changes.push(Change {
                    op: Op::Read,
                    lsn: 0,
                    seq: 0,
                    xid: 0,
                    commit_time_us: read_at,
                    after,
                    unchanged: vec![],
                    before: None,
                });
            }
            last = changes.last().map(|c| t.key_of(&c.after));
            for part in changes.chunks(self.cfg.changes_per_message) {
                let batch = Batch {
                    table: t.full_name(),
                    columns: columns.clone(),
                    changes: part.to_vec(),
                };
                let id = format!("{}:snapshot:{at}:{chunk_no}", t.full_name());
                chunk_no += 1;
                self.publish(&batch, &id).await?;
            }
            rows_total += rows.len() as u64;
            metrics::counter!("bulwark_reporting_snapshot_rows_total", "table" => t.full_name())
                .increment(rows.len() as u64);
            if rows.len() < self.cfg.snapshot_chunk as usize {
                break;
            }
        }
        self.exec_state(
            "INSERT INTO reporting_tables (source_table, slot, snapshot_lsn, snapshot_rows, \
             snapshot_at_ms) VALUES ($1, $2, $3, $4, $5)",
            vec![
                t.full_name().into(),
                self.cfg.slot.clone().into(),
                at.into(),
                i64::try_from(rows_total).unwrap_or(i64::MAX).into(),
                now_ms().into(),
            ],
        )
        .await?;
        tracing::info!(message = "Snapshot published.", table = %t.full_name(), rows = rows_total);
        Ok(rows_total)
    }

    async fn publish(&self, batch: &Batch, id: &str) -> Result<()> {
        publish_batch(self.bus.as_ref(), batch, id).await
    }

    /// Read the slot once up to the current WAL position, publish, advance.
    pub async fn read_once(&self) -> Result<ReadOutcome> {
        let upto = one_text(&self.source, "SELECT pg_current_wal_lsn()::text", vec![])
            .await?
            .and_then(|s| parse_lsn(&s))
            .ok_or_else(|| CaptureError::Setup("pg_current_wal_lsn() returned nothing".into()))?;
        let rows = self
            .source
            .query_all(stmt(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, CAST($2 AS pg_lsn), $3, \
                 'proto_version', '1', 'publication_names', $4)",
                vec![
                    self.cfg.slot.clone().into(),
                    format_lsn(upto).into(),
                    i32::try_from(self.cfg.max_changes_per_read)
                        .unwrap_or(i32::MAX)
                        .into(),
                    self.cfg.publication.clone().into(),
                ],
            ))
            .await?;
        let exhausted = (rows.len() as u64) < u64::from(self.cfg.max_changes_per_read);
        // Every read is a new decoding session: pgoutput describes each relation again.
        let mut decoder = TxnDecoder::new(self.cfg.changes_per_message);
        for r in &rows {
            let data: Vec<u8> = r.try_get_by_index(0)?;
            decoder.message(pgoutput::decode(&data)?)?;
        }
        let (pending, last_end) = decoder.take();
        let mut out = self.publish_pending(&pending, exhausted).await?;
        let target = if exhausted { Some(upto) } else { last_end };
        if let Some(to) = target {
            self.source
                .execute(stmt(
                    "SELECT pg_replication_slot_advance($1, CAST($2 AS pg_lsn))",
                    vec![self.cfg.slot.clone().into(), format_lsn(to).into()],
                ))
                .await?;
            out.advanced_to = Some(to);
        }
        Ok(out)
    }

    /// Publish decoded batches in order (each acknowledged by the bus before the next) and set
    /// the capture lag gauge; `caught_up` says the read found the end of the WAL.
    pub(crate) async fn publish_pending(
        &self,
        pending: &[Batch],
        caught_up: bool,
    ) -> Result<ReadOutcome> {
        let mut out = ReadOutcome::default();
        for b in pending {
            out.changes += b.changes.len() as u64;
            metrics::counter!("bulwark_reporting_changes_captured_total", "table" => b.table.clone())
                .increment(b.changes.len() as u64);
            let id = b.message_id();
            self.publish(b, &id).await?;
            out.messages += 1;
        }
        if let Some(last) = pending.last().and_then(|b| b.changes.last()) {
            let age = chrono::Utc::now().timestamp_micros() - last.commit_time_us;
            metrics::gauge!("bulwark_reporting_capture_lag_seconds").set(age.max(0) as f64 / 1e6);
        } else if caught_up {
            metrics::gauge!("bulwark_reporting_capture_lag_seconds").set(0.0);
        }
        Ok(out)
    }

    /// Slot position against the WAL: (bytes not yet confirmed, bytes of WAL retained).
    pub async fn slot_lag(&self) -> Result<Option<(i64, i64)>> {
        let row = self
            .source
            .query_one(stmt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                 (pg_current_wal_lsn() - restart_lsn)::bigint, coalesce(wal_status, '')::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                vec![self.cfg.slot.clone().into()],
            ))
            .await?;
        let Some(row) = row else {
            return Err(CaptureError::Setup(format!(
                "reporting.slot: the replication slot `{}` is gone (dropped); restart to create \
                 it again and snapshot every table",
                self.cfg.slot
            )));
        };
        if row.try_get_by_index::<String>(2).ok().as_deref() == Some("lost") {
            return Err(CaptureError::Setup(format!(
                "reporting.slot: the replication slot `{}` was invalidated (its WAL was \
                 removed); see docs/runbooks/reporting.md",
                self.cfg.slot
            )));
        }
        Ok(Some((
            row.try_get_by_index::<Option<i64>>(0)?.unwrap_or(0),
            row.try_get_by_index::<Option<i64>>(1)?.unwrap_or(0),
        )))
    }
}

/// Turns pgoutput messages into change batches, whole transactions at a time: a
/// transaction's changes are held until its commit and then take the commit's LSN (the order
/// the sink applies by) and their position inside it. The polling capture makes one per read;
/// the streaming capture keeps one per replication session, since pgoutput describes each
/// relation once per session.
pub(crate) struct TxnDecoder {
    relations: HashMap<u32, Relation>,
    txn: Vec<(u32, Change)>,
    xid: u32,
    commit_time_us: i64,
    in_txn: bool,
    changes_per_message: usize,
    pending: Vec<Batch>,
    /// The end of the last commit decoded: where the slot may be confirmed once `pending` is
    /// stored.
    last_end: Option<u64>,
    changes: u64,
}

impl TxnDecoder {
    pub(crate) fn new(changes_per_message: usize) -> Self {
        Self {
            relations: HashMap::new(),
            txn: Vec::new(),
            xid: 0,
            commit_time_us: 0,
            in_txn: false,
            changes_per_message,
            pending: Vec::new(),
            last_end: None,
            changes: 0,
        }
    }

    /// Inside a transaction (a begin seen, its commit not yet).
    pub(crate) fn in_txn(&self) -> bool {
        self.in_txn
    }

    /// Committed changes decoded since the last [`TxnDecoder::take`].
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    pub(crate) fn begin(&mut self, xid: u32, commit_time_pg_us: i64) {
        self.xid = xid;
        self.commit_time_us = pg_time_to_unix_us(commit_time_pg_us);
        self.txn.clear();
        self.in_txn = true;
    }

    pub(crate) fn commit(&mut self, commit_lsn: u64, end_lsn: u64) -> Result<()> {
        for (n, (oid, mut c)) in self.txn.drain(..).enumerate() {
            let Some(rel) = self.relations.get(&oid) else {
                return Err(CaptureError::Setup(format!(
                    "pgoutput sent a change of relation {oid} before describing it"
                )));
            };
            c.lsn = commit_lsn;
            // The change's position inside its commit: later wins.
            c.seq = n as u64 + 1;
            add_change(&mut self.pending, rel, c, self.changes_per_message);
            self.changes += 1;
        }
        self.last_end = Some(end_lsn);
        self.in_txn = false;
        Ok(())
    }

    /// Any pgoutput message (the streaming client parses begin and commit itself and calls
    /// [`TxnDecoder::begin`]/[`TxnDecoder::commit`]).
    pub(crate) fn message(&mut self, m: Message) -> Result<()> {
        let (xid, t) = (self.xid, self.commit_time_us);
        match m {
            Message::Begin {
                xid, commit_time, ..
            } => self.begin(xid, commit_time),
            Message::Relation(rel) => {
                self.relations.insert(rel.oid, rel);
            }
            Message::Insert { relation, new } => {
                self.txn
                    .push((relation, change(Op::Insert, new, None, xid, t)));
            }
            Message::Update { relation, old, new } => {
                self.txn
                    .push((relation, change(Op::Update, new, old, xid, t)));
            }
            Message::Delete { relation, old } => {
                self.txn
                    .push((relation, change(Op::Delete, old, None, xid, t)));
            }
            Message::Truncate { relations: rels } => {
                for oid in rels {
                    let name = self
                        .relations
                        .get(&oid)
                        .map(|r| format!("{}.{}", r.schema, r.name))
                        .unwrap_or_default();
                    tracing::warn!(
                        message = "A captured table was truncated; the warehouse table keeps its rows until a re-snapshot.",
                        table = %name
                    );
                    metrics::counter!("bulwark_reporting_truncates_total", "table" => name)
                        .increment(1);
                }
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => self.commit(commit_lsn, end_lsn)?,
            Message::Other(_) => {}
        }
        Ok(())
    }

    /// The batches decoded so far and the end of the last commit among them; starts over.
    pub(crate) fn take(&mut self) -> (Vec<Batch>, Option<u64>) {
        self.changes = 0;
        (std::mem::take(&mut self.pending), self.last_end.take())
    }
}

fn change(
    op: Op,
    tuple: Vec<Value>,
    old: Option<Vec<Value>>,
    xid: u32,
    commit_time_us: i64,
) -> Change {
    let mut unchanged = Vec::new();
    let after = tuple
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Null => None,
            Value::Unchanged => {
                unchanged.push(i);
                None
            }
            Value::Text(s) => Some(s),
        })
        .collect();
    let before = old.map(|o| {
        o.into_iter()
            .map(|v| match v {
                Value::Text(s) => Some(s),
                Value::Null | Value::Unchanged => None,
            })
            .collect()
    });
    Change {
        op,
        lsn: 0,
        seq: 0,
        xid,
        commit_time_us,
        after,
        unchanged,
        before,
    }
}

/// Append `c` to the open batch of its table if the layout is the same and there is room.
fn add_change(pending: &mut Vec<Batch>, rel: &Relation, c: Change, max: usize) {
    let table = format!("{}.{}", rel.schema, rel.name);
    let columns: Vec<ColumnType> = rel
        .columns
        .iter()
        .map(|c| ColumnType {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: c.key,
        })
        .collect();
    if let Some(b) = pending.iter_mut().rev().find(|b| b.table == table)
        && b.columns == columns
        && b.changes.len() < max
    {
        b.changes.push(c);
        return;
    }
    pending.push(Batch {
        table,
        columns,
        changes: vec![c],
    });
}

/// PostgreSQL timestamps count microseconds from 2000-01-01.
fn pg_time_to_unix_us(t: i64) -> i64 {
    t + 946_684_800_000_000
}

async fn one_text(
    db: &DatabaseConnection,
    sql: &str,
    values: Vec<DbValue>,
) -> Result<Option<String>> {
    Ok(db
        .query_one(stmt(sql, values))
        .await?
        .and_then(|r| r.try_get_by_index::<Option<String>>(0).ok().flatten()))
}

/// One keyset page of `t`: up to `limit` rows after key `after` (all rows from the start when
/// `None`), ordered by key, every column as text; `range` is an extra SQL condition (a
/// backfill's time range). The snapshot and the backfill both read this way.
pub(crate) async fn keyset_page(
    db: &DatabaseConnection,
    t: &SourceTable,
    range: Option<&str>,
    after: Option<&[Option<String>]>,
    limit: u32,
) -> Result<Vec<Vec<Option<String>>>> {
    let keys: Vec<&(ColumnType, String)> = t.columns.iter().filter(|(c, _)| c.key).collect();
    let key_list = keys
        .iter()
        .map(|(c, _)| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    // Qualified: an unqualified ORDER BY name would sort by the `::text` output column of that
    // name, not the key (PostgreSQL prefers output names), and break the keyset.
    let order = keys
        .iter()
        .map(|(c, _)| format!("{}.{}", t.sql_name(), quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let select = t
        .columns
        .iter()
        .map(|(c, _)| format!("{}::text", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut conditions: Vec<String> = range.iter().map(|r| (*r).to_owned()).collect();
    let mut values = Vec::new();
    if let Some(k) = after {
        let params = keys
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("CAST(${} AS {ty})", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        conditions.push(format!("({key_list}) > ({params})"));
        values = k.iter().map(|v| DbValue::from(v.clone())).collect();
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {select} FROM {} {filter} ORDER BY {order} LIMIT {limit}",
        t.sql_name()
    );
    let rows = db.query_all(stmt(&sql, values)).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (0..t.columns.len())
                .map(|i| r.try_get_by_index::<Option<String>>(i).ok().flatten())
                .collect()
        })
        .collect())
}

/// Look `t` up in the source: it must exist and have a key (its primary key, or the declared
/// one, for which the table is set to `REPLICA IDENTITY FULL`).
pub(crate) async fn describe(
    db: &DatabaseConnection,
    t: &TableConfig,
    i: usize,
    alter: bool,
) -> Result<SourceTable> {
    let (schema, name) = t.qualified();
    let field = format!("reporting.tables[{i}]");
    let oid = one_text(
        db,
        "SELECT c.oid::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        vec![schema.clone().into(), name.clone().into()],
    )
    .await?
    .ok_or_else(|| {
        CaptureError::Setup(format!(
            "{field}.name: the source has no table `{schema}.{name}`"
        ))
    })?;
    let cols = db
        .query_all(stmt(
            "SELECT a.attname::text, a.atttypid::bigint, a.atttypmod::bigint, \
             format_type(a.atttypid, a.atttypmod), \
             coalesce(a.attnum = ANY(i.indkey), false) \
             FROM pg_attribute a \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = CAST($1 AS oid) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            vec![oid.clone().into()],
        ))
        .await?;
    let mut columns = Vec::new();
    for r in &cols {
        let cname: String = r.try_get_by_index(0)?;
        let pk: bool = r.try_get_by_index(4)?;
        let key = if t.key.is_empty() {
            pk
        } else {
            t.key.contains(&cname)
        };
        columns.push((
            ColumnType {
                name: cname,
                type_oid: u32::try_from(r.try_get_by_index::<i64>(1)?).unwrap_or(0),
                type_modifier: i32::try_from(r.try_get_by_index::<i64>(2)?).unwrap_or(-1),
                key,
            },
            r.try_get_by_index::<String>(3)?,
        ));
    }
    for k in &t.key {
        if !columns.iter().any(|(c, _)| &c.name == k) {
            return Err(CaptureError::Setup(format!(
                "{field}.key: `{schema}.{name}` has no column `{k}`"
            )));
        }
    }
    if !columns.iter().any(|(c, _)| c.key) {
        return Err(CaptureError::Setup(format!(
            "{field}: `{schema}.{name}` has no primary key, so its updates and deletes cannot be \
             matched: add a primary key, or declare `key = [\"col\", …]` for it (the capture \
             then sets REPLICA IDENTITY FULL)"
        )));
    }
    if !t.key.is_empty() {
        let ident = one_text(
            db,
            "SELECT relreplident::text FROM pg_class WHERE oid = CAST($1 AS oid)",
            vec![oid.into()],
        )
        .await?;
        if alter && ident.as_deref() != Some("f") {
            db.execute_unprepared(&format!(
                "ALTER TABLE {}.{} REPLICA IDENTITY FULL",
                quote(&schema),
                quote(&name)
            ))
            .await?;
        }
    }
    Ok(SourceTable {
        cfg: t.clone(),
        schema,
        name,
        columns,
    })
}

/// The capture loop: snapshot what needs one, then read the source until `stop`.
pub async fn run<S: ChangeSource>(capture: S, stop: tokio_util::sync::CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match capture.snapshot_missing().await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(message = "Snapshot failed; retrying.", error = %e);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    let mut lag_at = tokio::time::Instant::now();
    loop {
        let started = tokio::time::Instant::now();
        let busy = match capture.read_once().await {
            Ok(o) => {
                backoff = Duration::from_millis(500);
                o.changes > 0
            }
            Err(CaptureError::Setup(m)) => {
                tracing::error!(message = "Change capture stopped.", error = %m);
                metrics::counter!("bulwark_reporting_capture_errors_total").increment(1);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
                false
            }
            Err(e) => {
                // An active slot (another process reads it), a busy SQLite source, a
                // connection or bus outage.
                tracing::debug!(message = "Reading the change source failed; retrying.", error = %e);
                metrics::counter!("bulwark_reporting_capture_errors_total").increment(1);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                false
            }
        };
        metrics::histogram!("bulwark_reporting_capture_read_seconds")
            .record(started.elapsed().as_secs_f64());
        if lag_at.elapsed() >= Duration::from_secs(1) {
            lag_at = tokio::time::Instant::now();
            match capture.slot_lag().await {
                Ok(Some((unconfirmed, retained))) => {
                    metrics::gauge!("bulwark_reporting_capture_lag_bytes").set(unconfirmed as f64);
                    metrics::gauge!("bulwark_reporting_slot_retained_wal_bytes")
                        .set(retained as f64);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(message = "Change source backlog check failed.", error = %e)
                }
            }
        }
        if !busy {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(capture.poll_interval()) => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
    }
}
