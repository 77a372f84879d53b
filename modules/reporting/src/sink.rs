//! The sink (R2, R6): applies change batches from the `CDC` stream to Delta tables in the
//! pipeline's warehouse, one MERGE per table per fetch.
//!
//! * **Order and idempotence by the LSN guard.** Every row carries `_lsn` (its commit LSN) and
//!   `_seq` (its place in that commit); a change replaces a row only if its `(_lsn, _seq)` is
//!   greater. Replays, redeliveries after a kill, and a different cut of the same changes all
//!   leave the table as it was; a snapshot row (`_lsn` 0) never overwrites a streamed one, and
//!   a backfill (which writes the replica's rows at LSN 0 too) never overwrites CDC data.
//! * **Deletes** keep a tombstone (`_deleted = true`, the delete's position, and the row's last
//!   values when the table held it), so an older insert replayed after the delete cannot bring
//!   the row back, and the summaries know which day a deleted row counted in. Readers filter
//!   `NOT _deleted`; the summaries do.
//! * **TOAST**: a column an update left unchanged keeps the table's value (a CASE on the
//!   batch's `_unchanged` list), or the value an earlier change of the same fetch carried.
//! * **Schema**: a column added on the source is added to the table (an empty schema-merging
//!   append) before the MERGE. Parquet files are compressed (zstd) and columnar.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::CastOptions;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use bulwark_pipeline::data::{Engine, dir_url};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use thiserror::Error;

use crate::event::{Batch, ColumnType, Op};

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("{0}")]
    Invalid(String),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("delta: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("datafusion: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("warehouse: {0}")]
    Engine(#[from] bulwark_pipeline::data::EngineError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, SinkError>;

/// The application transaction id each CDC commit carries: its version is the highest commit
/// LSN the table holds, so the table itself says how far it is applied.
pub const APP_ID: &str = "bulwark.reporting.cdc";

/// The Arrow type of a PostgreSQL type OID; anything not listed stays text.
pub fn arrow_type(oid: u32, typmod: i32) -> DataType {
    match oid {
        16 => DataType::Boolean,
        20 | 26 => DataType::Int64,
        21 => DataType::Int16,
        23 => DataType::Int32,
        700 => DataType::Float32,
        701 => DataType::Float64,
        1700 => {
            // numeric(p, s): typmod = (p << 16 | s) + 4; unconstrained: 38 digits, scale 9.
            if typmod >= 4 {
                let t = typmod - 4;
                let (p, s) = ((t >> 16) & 0xFFFF, t & 0xFFFF);
                let p = u8::try_from(p).unwrap_or(38).clamp(1, 38);
                let s = i8::try_from(s).unwrap_or(9).min(p as i8);
                DataType::Decimal128(p, s)
            } else {
                DataType::Decimal128(38, 9)
            }
        }
        1082 => DataType::Date32,
        1114 => DataType::Timestamp(TimeUnit::Microsecond, None),
        1184 => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => DataType::Utf8,
    }
}

/// PostgreSQL prints a whole-hour offset as `+00`; Arrow's parser wants `+00:00`.
fn normalize(v: &str, ty: &DataType) -> String {
    match ty {
        DataType::Timestamp(_, Some(_)) => {
            let b = v.as_bytes();
            let n = b.len();
            if n > 3
                && (b[n - 3] == b'+' || b[n - 3] == b'-')
                && b[n - 2..].iter().all(u8::is_ascii_digit)
            {
                format!("{v}:00")
            } else {
                v.to_owned()
            }
        }
        DataType::Boolean => match v {
            "t" => "true".into(),
            "f" => "false".into(),
            other => other.to_owned(),
        },
        _ => v.to_owned(),
    }
}

/// One row after folding a fetch's changes by key.
struct Row {
    op: Op,
    lsn: u64,
    seq: u64,
    commit_time_us: i64,
    /// By column name.
    values: HashMap<String, Option<String>>,
    /// TOASTed columns no change in this fetch carried.
    unchanged: Vec<String>,
}

/// What one apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub changes: u64,
    pub rows: u64,
    pub version: Option<i64>,
}

/// Fold `batches` (one table's, in stream order) to the last change per key.
fn fold(batches: &[Batch]) -> Result<(Vec<ColumnType>, Vec<Row>)> {
    let mut columns: Vec<ColumnType> = Vec::new();
    let mut keys: Option<Vec<String>> = None;
    let mut rows: BTreeMap<Vec<Option<String>>, Row> = BTreeMap::new();
    for b in batches {
        for c in &b.columns {
            if !columns.iter().any(|x| x.name == c.name) {
                columns.push(c.clone());
            }
        }
        let bk: Vec<String> = b
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect();
        match &keys {
            None => keys = Some(bk.clone()),
            Some(k) if *k != bk => {
                return Err(SinkError::Invalid(format!(
                    "table {}: the key changed from {k:?} to {bk:?}; re-snapshot the table",
                    b.table
                )));
            }
            Some(_) => {}
        }
        if bk.is_empty() {
            return Err(SinkError::Invalid(format!("table {} has no key", b.table)));
        }
        let key_idx: Vec<usize> = b
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        for ch in &b.changes {
            if ch.after.len() != b.columns.len() {
                return Err(SinkError::Invalid(format!(
                    "table {}: a change has {} values for {} columns",
                    b.table,
                    ch.after.len(),
                    b.columns.len()
                )));
            }
            let key: Vec<Option<String>> = key_idx.iter().map(|i| ch.after[*i].clone()).collect();
            // An update that changed the key: the old key is deleted.
            if let Some(before) = &ch.before
                && before.len() == b.columns.len()
            {
                let old: Vec<Option<String>> = key_idx.iter().map(|i| before[*i].clone()).collect();
                if old != key {
                    let values = key_idx
                        .iter()
                        .map(|i| (b.columns[*i].name.clone(), before[*i].clone()))
                        .collect();
                    put(
                        &mut rows,
                        old,
                        Row {
                            op: Op::Delete,
                            lsn: ch.lsn,
                            seq: ch.seq,
                            commit_time_us: ch.commit_time_us,
                            values,
                            unchanged: vec![],
                        },
                    );
                }
            }
            let mut values = HashMap::new();
            let mut unchanged = Vec::new();
            for (i, col) in b.columns.iter().enumerate() {
                if ch.unchanged.contains(&i) {
                    unchanged.push(col.name.clone());
                } else if ch.op == Op::Delete && !col.key {
                    // A tombstone keeps the key only.
                    values.insert(col.name.clone(), None);
                } else {
                    values.insert(col.name.clone(), ch.after[i].clone());
                }
            }
            put(
                &mut rows,
                key,
                Row {
                    op: ch.op,
                    lsn: ch.lsn,
                    seq: ch.seq,
                    commit_time_us: ch.commit_time_us,
                    values,
                    unchanged,
                },
            );
        }
    }
    Ok((columns, rows.into_values().collect()))
}

/// Keep the later of the held and the new row; an unchanged TOAST column of the new one takes
/// the held row's value when it has one.
fn put(rows: &mut BTreeMap<Vec<Option<String>>, Row>, key: Vec<Option<String>>, mut new: Row) {
    if let Some(old) = rows.get(&key) {
        if (old.lsn, old.seq) > (new.lsn, new.seq) {
            return;
        }
        let mut still = Vec::new();
        for c in std::mem::take(&mut new.unchanged) {
            match old.values.get(&c) {
                Some(v) if old.op != Op::Delete => {
                    new.values.insert(c, v.clone());
                }
                _ => still.push(c),
            }
        }
        new.unchanged = still;
    }
    rows.insert(key, new);
}

fn to_record_batch(columns: &[ColumnType], rows: &[Row]) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    let opts = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    for c in columns {
        let ty = arrow_type(c.type_oid, c.type_modifier);
        let text: StringArray = rows
            .iter()
            .map(|r| {
                r.values
                    .get(&c.name)
                    .cloned()
                    .flatten()
                    .map(|v| normalize(&v, &ty))
            })
            .collect();
        let arr = arrow::compute::cast_with_options(&text, &ty, &opts)
            .map_err(|e| SinkError::Invalid(format!("column `{}` as {ty}: {e}", c.name)))?;
        fields.push(Field::new(&c.name, ty, !c.key));
        arrays.push(arr);
    }
    let i64s = |f: &dyn Fn(&Row) -> i64| -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(f(r))).collect::<Int64Array>())
    };
    fields.push(Field::new("_lsn", DataType::Int64, false));
    arrays.push(i64s(&|r| i64::try_from(r.lsn).unwrap_or(i64::MAX)));
    fields.push(Field::new("_seq", DataType::Int64, false));
    arrays.push(i64s(&|r| i64::try_from(r.seq).unwrap_or(i64::MAX)));
    fields.push(Field::new("_deleted", DataType::Boolean, false));
    arrays.push(Arc::new(
        rows.iter()
            .map(|r| Some(r.op == Op::Delete))
            .collect::<BooleanArray>(),
    ));
    fields.push(Field::new("_op", DataType::Utf8, false));
    arrays.push(Arc::new(
        rows.iter()
            .map(|r| Some(r.op.as_str()))
            .collect::<StringArray>(),
    ));
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    fields.push(Field::new("_commit_time", ts.clone(), false));
    arrays.push(arrow::compute::cast(&i64s(&|r| r.commit_time_us), &ts)?);
    fields.push(Field::new("_unchanged", DataType::Utf8, true));
    arrays.push(Arc::new(
        rows.iter()
            .map(|r| (!r.unchanged.is_empty()).then(|| format!(",{},", r.unchanged.join(","))))
            .collect::<StringArray>(),
    ));
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// Apply one table's batches (in stream order) to warehouse table `target`.
pub async fn apply(engine: &Engine, target: &str, batches: &[Batch]) -> Result<Applied> {
    let changes: u64 = batches.iter().map(|b| b.changes.len() as u64).sum();
    let (columns, rows) = fold(batches)?;
    if rows.is_empty() {
        return Ok(Applied::default());
    }
    let max_lsn = rows.iter().map(|r| r.lsn).max().unwrap_or(0);
    let batch = to_record_batch(&columns, &rows)?;
    // The table's schema: every column but the batch-only `_unchanged`.
    let table_schema = Arc::new(
        batch
            .schema()
            .project(&(0..batch.num_columns() - 1).collect::<Vec<_>>())?,
    );
    let path = engine.table_path(target);
    std::fs::create_dir_all(&path)?;
    let mut table = deltalake::DeltaTable::try_from_url(dir_url(&path)?).await?;
    let mut held_lsn = 0i64;
    if table.version().is_none() {
        table = table
            .write(vec![RecordBatch::new_empty(table_schema.clone())])
            .with_save_mode(SaveMode::Append)
            .with_writer_properties(writer_properties())
            .await?;
    } else {
        held_lsn = table
            .snapshot()?
            .transaction_version(table.log_store().as_ref(), APP_ID)
            .await?
            .unwrap_or(0);
        let stored = table.snapshot()?.snapshot().arrow_schema();
        let added: Vec<&Arc<Field>> = table_schema
            .fields()
            .iter()
            .filter(|f| stored.field_with_name(f.name()).is_err())
            .collect();
        if !added.is_empty() {
            tracing::info!(message = "Adding columns to a CDC table.", table = %target, columns = ?added.iter().map(|f| f.name()).collect::<Vec<_>>());
            let mut all: Vec<Field> = stored.fields().iter().map(|f| f.as_ref().clone()).collect();
            all.extend(added.iter().map(|f| f.as_ref().clone().with_nullable(true)));
            table = table
                .write(vec![RecordBatch::new_empty(Arc::new(Schema::new(all)))])
                .with_save_mode(SaveMode::Append)
                .with_schema_mode(SchemaMode::Merge)
                .await?;
        }
    }
    let ctx = datafusion::prelude::SessionContext::new();
    let df = ctx.read_batch(batch)?;
    let keys: Vec<&ColumnType> = columns.iter().filter(|c| c.key).collect();
    let on = keys
        .iter()
        .map(|k| format!("target.{0} = source.{0}", ident(&k.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let newer = "source._lsn > target._lsn OR (source._lsn = target._lsn AND source._seq > \
                 target._seq)";
    let toasted: Vec<String> = rows
        .iter()
        .flat_map(|r| r.unchanged.iter().cloned())
        .collect();
    let mut set: Vec<(String, String)> = columns
        .iter()
        .map(|c| {
            let col = ident(&c.name);
            let expr = if c.key {
                format!("source.{col}")
            } else if toasted.contains(&c.name) {
                format!(
                    "CASE WHEN source._deleted THEN target.{col} \
                     WHEN strpos(coalesce(source._unchanged, ''), ',{}') > 0 THEN \
                     target.{col} ELSE source.{col} END",
                    c.name.replace('\'', "''") + ","
                )
            } else {
                // A tombstone keeps the row's last values: the summaries find the day a
                // deleted row counted in.
                format!("CASE WHEN source._deleted THEN target.{col} ELSE source.{col} END")
            };
            (col, expr)
        })
        .collect();
    for m in ["_lsn", "_seq", "_deleted", "_op", "_commit_time"] {
        set.push((m.to_owned(), format!("source.{m}")));
    }
    let insert = set.clone();
    let version = held_lsn.max(i64::try_from(max_lsn).unwrap_or(i64::MAX));
    let props =
        CommitProperties::default().with_application_transaction(Transaction::new(APP_ID, version));
    let (table, _metrics) = table
        .merge(df, on)
        .with_source_alias("source")
        .with_target_alias("target")
        .with_writer_properties(writer_properties())
        .with_commit_properties(props)
        .when_matched_update(move |mut u| {
            u = u.predicate(newer);
            for (c, e) in &set {
                u = u.update(c.as_str(), e.as_str());
            }
            u
        })?
        .when_not_matched_insert(move |mut i| {
            for (c, e) in &insert {
                let e = if e.starts_with("CASE") {
                    format!("source.{c}")
                } else {
                    e.clone()
                };
                i = i.set(c.as_str(), e);
            }
            i
        })?
        .await?;
    Ok(Applied {
        changes,
        rows: rows.len() as u64,
        version: table.version().and_then(|v| i64::try_from(v).ok()),
    })
}

/// Run `sql` over warehouse tables `tables` and return every value as text (NULL as `None`):
/// how the tests and an operator's check compare the warehouse with the source row by row.
pub async fn query_text(
    engine: &Engine,
    tables: &[&str],
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>> {
    let ctx = engine.session()?;
    for t in tables {
        engine.register_table(&ctx, t).await?;
    }
    let batches = ctx.sql(sql).await?.collect().await?;
    let mut out = Vec::new();
    for b in batches {
        let cols = b
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &DataType::Utf8))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let cols: Vec<&StringArray> = cols
            .iter()
            .map(|c| {
                c.as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| SinkError::Invalid("a cast to text did not give text".into()))
            })
            .collect::<Result<_>>()?;
        for i in 0..b.num_rows() {
            out.push(
                cols.iter()
                    .map(|c| (!c.is_null(i)).then(|| c.value(i).to_owned()))
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// A column name in a DataFusion SQL expression: quoted, so upper case and keywords survive.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;

    fn cols() -> Vec<ColumnType> {
        vec![
            ColumnType {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                key: true,
            },
            ColumnType {
                name: "note".into(),
                type_oid: 25,
                type_modifier: -1,
                key: false,
            },
        ]
    }

    fn ch(op: Op, lsn: u64, seq: u64, id: &str, note: Option<&str>) -> Change {
        Change {
            op,
            lsn,
            seq,
            xid: 1,
            commit_time_us: 0,
            after: vec![Some(id.into()), note.map(Into::into)],
            unchanged: vec![],
            before: None,
        }
    }

    #[test]
    fn fold_keeps_the_last_change_per_key_and_carries_toast() {
        let mut toast = ch(Op::Update, 20, 1, "1", None);
        toast.unchanged = vec![1];
        let b = Batch {
            table: "public.t".into(),
            columns: cols(),
            changes: vec![
                ch(Op::Insert, 10, 1, "1", Some("big")),
                ch(Op::Insert, 10, 2, "2", Some("x")),
                toast,
                ch(Op::Delete, 30, 1, "2", None),
                // An older change replayed later loses.
                ch(Op::Insert, 5, 1, "2", Some("old")),
            ],
        };
        let (_, rows) = fold(&[b]).expect("test value");
        assert_eq!(rows.len(), 2);
        let one = &rows[0];
        assert_eq!(one.values["note"].as_deref(), Some("big"));
        assert!(one.unchanged.is_empty());
        assert_eq!((one.lsn, one.op), (20, Op::Update));
        let two = &rows[1];
        assert_eq!((two.lsn, two.op), (30, Op::Delete));
    }

    #[test]
    fn bad_batches_are_refused() {
        let mut b = Batch {
            table: "public.t".into(),
            columns: cols(),
            changes: vec![Change {
                after: vec![Some("1".into())],
                ..ch(Op::Insert, 1, 1, "1", None)
            }],
        };
        assert!(fold(std::slice::from_ref(&b)).is_err());
        b.columns.iter_mut().for_each(|c| c.key = false);
        b.changes = vec![ch(Op::Insert, 1, 1, "1", None)];
        assert!(fold(&[b]).is_err());
    }

    #[test]
    fn types_map_and_values_parse() {
        assert_eq!(
            arrow_type(1700, ((12 << 16) | 2) + 4),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(arrow_type(2950, -1), DataType::Utf8);
        let ty = arrow_type(1184, -1);
        assert_eq!(
            normalize("2026-12-02 10:00:00.5+00", &ty),
            "2026-12-02 10:00:00.5+00:00"
        );
        let rows = vec![Row {
            op: Op::Insert,
            lsn: 1,
            seq: 1,
            commit_time_us: 0,
            values: HashMap::from([
                ("id".to_owned(), Some("7".to_owned())),
                ("note".to_owned(), Some("x".to_owned())),
            ]),
            unchanged: vec![],
        }];
        let b = to_record_batch(&cols(), &rows).expect("test value");
        assert_eq!(b.num_rows(), 1);
        let mut bad = cols();
        bad[1].type_oid = 20; // "x" is no bigint
        assert!(to_record_batch(&bad, &rows).is_err());
    }
}

#[cfg(test)]
mod apply_tests {
    use super::*;
    use crate::event::Change;

    fn batch(ids: std::ops::Range<u64>) -> Batch {
        Batch {
            table: "public.t".into(),
            columns: vec![
                ColumnType {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    key: true,
                },
                ColumnType {
                    name: "name".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
                ColumnType {
                    name: "qty".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: false,
                },
                ColumnType {
                    name: "price".into(),
                    type_oid: 1700,
                    type_modifier: ((12 << 16) | 2) + 4,
                    key: false,
                },
                ColumnType {
                    name: "note".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
            ],
            changes: ids
                .map(|i| Change {
                    op: Op::Read,
                    lsn: 0,
                    seq: 0,
                    xid: 0,
                    commit_time_us: 0,
                    after: vec![
                        Some(i.to_string()),
                        Some(format!("item {i}")),
                        Some((i % 7).to_string()),
                        Some(format!("{:.2}", i as f64 * 1.25)),
                        None,
                    ],
                    unchanged: vec![],
                    before: None,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn snapshot_chunks_all_land() {
        let dir = tempfile::tempdir().expect("dir");
        let e = Engine::new(&Default::default(), dir.path());
        apply(&e, "t", &[batch(1..101), batch(101..201), batch(201..251)])
            .await
            .expect("one fetch");
        let n = query_text(&e, &["t"], "SELECT CAST(count(*) AS VARCHAR) FROM t")
            .await
            .expect("count");
        assert_eq!(n, vec![vec![Some("250".to_owned())]]);
    }
}
