//! Dataset versions (N8): which annotations a spec selects, as of when, and their encoding.
//!
//! A [`DatasetSpec`] names a project and filters; [`generate`] streams the selected rows from
//! the database in keyset-paginated chunks of items (all of an item's records arrive together,
//! so consolidation sees every vote) and writes them in one of three encodings. The output
//! depends only on the spec and the log: rows are ordered by item id, then annotator; nothing
//! in the data file says when it was made; Parquet writer properties are fixed, and rows are
//! re-batched into fixed-size record batches whatever the database chunk sizes were. So the same
//! spec over the same log gives the same bytes (and sha256); the manifest carries the rest.
//!
//! "Current" annotation of an (item, annotator) as of `T`: among its records created at or before
//! `T`, the one no other such record supersedes. A correction made after `T` does not count, so
//! a record superseded only later is still current as of `T`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use arrow::array::{ArrayRef, Int64Builder, ListBuilder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use utoipa::ToSchema;

use crate::agreement::{self, ConsolidationRule};
use crate::entity::project;
use crate::store::{self, sql};

/// The file encodings of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `external_id,uri,label[,annotator]`; multi-label: the labels joined with `|`.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet, Snappy-compressed.
    Parquet,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Csv, Format::Jsonl, Format::Parquet];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
            Self::Parquet => "parquet",
        }
    }

    /// The file extension (without the dot).
    pub fn ext(self) -> &'static str {
        self.as_str()
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/x-ndjson",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// What a dataset version contains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// The project's id.
    #[serde(deserialize_with = "whole_i64")]
    pub project: i64,
    /// Only annotations whose latest review (as of `as_of`) is an accept.
    #[serde(default)]
    pub reviewed_only: bool,
    /// Only records (annotations and reviews) created at or before this time (RFC 3339). An
    /// export job without one is pinned to the time it was requested, and its manifest says so.
    #[serde(default)]
    pub as_of: Option<DateTime<Utc>>,
    /// Leave these annotators' annotations out (before consolidation: their votes do not count).
    /// An empty name matches nobody.
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub exclude_annotators: Vec<String>,
    /// Keep only items whose consensus share is at least this (0 to 1): the largest share of the
    /// item's voters that gave one identical label set. An item with one voter has share 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub min_agreement: Option<f64>,
    /// When set: one row per item with the consensus label (majority vote); unresolved and
    /// insufficient items are left out and counted. When unset: one row per current annotation.
    #[serde(default)]
    pub consolidation: Option<ConsolidationRule>,
    pub format: Format,
}

/// The most annotators a spec can exclude.
pub const MAX_EXCLUDED: usize = 1000;

impl DatasetSpec {
    /// Check the values serde cannot.
    pub fn validate(&self) -> Result<(), DatasetError> {
        if let Some(x) = self.min_agreement
            && !(0.0..=1.0).contains(&x)
        {
            return Err(DatasetError::invalid(
                "min_agreement",
                format!("must be between 0 and 1, not {x}"),
            ));
        }
        if self.exclude_annotators.len() > MAX_EXCLUDED {
            return Err(DatasetError::invalid(
                "exclude_annotators",
                format!("at most {MAX_EXCLUDED} names"),
            ));
        }
        Ok(())
    }

    /// This spec with `as_of` pinned (to `now_ms` when unset, at millisecond precision) and the
    /// excluded annotators sorted and deduplicated: what the manifest records.
    pub fn resolved(&self, now_ms: i64) -> Self {
        let mut s = self.clone();
        let ms = s.as_of.map_or(now_ms, |t| t.timestamp_millis());
        s.as_of = DateTime::from_timestamp_millis(ms);
        s.exclude_annotators.sort();
        s.exclude_annotators.dedup();
        s
    }

    fn as_of_ms(&self) -> i64 {
        self.as_of.map_or(i64::MAX, |t| t.timestamp_millis())
    }

    /// A short human summary (commit messages, logs): `csv reviewed-only as-of ... ...`.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.format.as_str().to_owned()];
        if self.reviewed_only {
            parts.push("reviewed-only".into());
        }
        if let Some(t) = self.as_of {
            parts.push(format!(
                "as-of {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ));
        }
        if !self.exclude_annotators.is_empty() {
            parts.push(format!("excluding {}", self.exclude_annotators.join(",")));
        }
        if let Some(x) = self.min_agreement {
            parts.push(format!("min-agreement {x}"));
        }
        if let Some(r) = &self.consolidation {
            parts.push(format!("consolidated (min_votes {})", r.min_votes));
        }
        parts.join(" ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Db(#[from] DbErr),
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("writing the dataset: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("encoding Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("encoding CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A progress callback asked to stop (an export job lost its claim, or is shutting down).
    #[error("stopped: {0}")]
    Stopped(String),
}

impl DatasetError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl From<store::StoreError> for DatasetError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::Db(e) => Self::Db(e),
            store::StoreError::NotFound(m) => Self::NotFound(m),
            other => Self::Stopped(other.to_string()),
        }
    }
}

/// What was left out, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Skipped {
    /// Current annotations of excluded annotators.
    pub excluded_annotator: u64,
    /// `reviewed_only`: current annotations without a review as of `as_of`.
    pub not_reviewed: u64,
    /// `reviewed_only`: current annotations whose latest review is a reject.
    pub rejected: u64,
    /// Records of an (item, annotator) whose history forked (two records neither of which
    /// supersedes the other): the newest is kept, the others counted here.
    pub forked_history: u64,
    /// Items below `min_agreement`.
    pub below_agreement: u64,
    /// Consolidation: items whose vote is tied (tie rule `review`).
    pub unresolved: u64,
    /// Consolidation: items with fewer voters than `min_votes`.
    pub insufficient: u64,
}

/// The figures of a generated dataset.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Counts {
    /// Items with at least one row.
    pub items: u64,
    pub rows: u64,
    /// Distinct annotators behind the rows.
    pub annotators: u64,
    pub skipped: Skipped,
}

/// A generated data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub counts: Counts,
    /// Hex.
    pub sha256: String,
    pub bytes: u64,
}

/// Where a dataset version went in a DVC repository (N10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DvcInfo {
    /// The commit that adds the data file's `.dvc` file: it pins code and data together.
    pub commit: String,
    /// The data file, relative to the repository root.
    pub path: String,
    /// The md5 DVC stores the file under (its remote holds `files/md5/<2>/<30>`).
    pub md5: Option<String>,
}

/// The project a dataset came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ManifestProject {
    pub id: i64,
    pub name: String,
    pub labels: Vec<String>,
    pub multi_label: bool,
}

/// The data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ManifestFile {
    pub name: String,
    pub format: Format,
    pub bytes: u64,
    pub sha256: String,
    pub content_type: String,
}

/// Everything about a dataset version that is not in its data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Manifest {
    /// The spec with `as_of` pinned: giving it again reproduces the same bytes.
    pub spec: DatasetSpec,
    pub project: ManifestProject,
    pub file: ManifestFile,
    pub counts: Counts,
    /// Multi-label CSV joins a row's labels with this.
    pub csv_label_separator: String,
    pub generated_at: DateTime<Utc>,
    pub bulwark_version: String,
    /// Set by `bulwark annotation export --dvc`.
    pub dvc: Option<DvcInfo>,
}

/// Multi-label CSV: a row's labels joined with this.
pub const CSV_LABEL_SEPARATOR: &str = "|";

impl Manifest {
    pub fn new(spec: DatasetSpec, p: &project::Model, file_name: String, g: &Generated) -> Self {
        Self {
            project: ManifestProject {
                id: p.id,
                name: p.name.clone(),
                labels: store::labels_of(p),
                multi_label: p.multi_label,
            },
            file: ManifestFile {
                name: file_name,
                format: spec.format,
                bytes: g.bytes,
                sha256: g.sha256.clone(),
                content_type: spec.format.content_type().into(),
            },
            spec,
            counts: g.counts.clone(),
            csv_label_separator: CSV_LABEL_SEPARATOR.into(),
            generated_at: DateTime::from_timestamp_millis(store::now_ms()).unwrap_or_default(),
            bulwark_version: env!("CARGO_PKG_VERSION").into(),
            dvc: None,
        }
    }
}

/// One row of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRow {
    pub item_id: i64,
    pub external_id: String,
    pub uri: Option<String>,
    /// JSON text as stored.
    pub payload: Option<String>,
    /// In schema order.
    pub labels: Vec<String>,
    /// One name per annotation; several (by name) for a consolidated row.
    pub annotators: Vec<String>,
    /// In the order of `annotators`.
    pub annotation_ids: Vec<i64>,
}

/// Rows per database chunk, about: a chunk is this many rows' worth of items (divided by the
/// project's overlap), so memory stays flat whatever the project's size.
pub const CHUNK_ROWS: u64 = 10_000;

struct ItemRow {
    id: i64,
    external_id: String,
    uri: Option<String>,
    payload: Option<String>,
}

struct Record {
    id: i64,
    item_id: i64,
    annotator: String,
    labels: Vec<String>,
    supersedes: Option<i64>,
}

/// The selected rows of a spec, a chunk of items at a time.
pub struct RowStream<'a, C: ConnectionTrait> {
    db: &'a C,
    spec: &'a DatasetSpec,
    project_id: i64,
    schema: agreement::Schema,
    class_index: HashMap<String, usize>,
    excluded: HashSet<String>,
    chunk_items: u64,
    after: i64,
    done: bool,
    counts: Counts,
    annotators: BTreeSet<String>,
}

impl<'a, C: ConnectionTrait> RowStream<'a, C> {
    pub fn new(db: &'a C, project: &project::Model, spec: &'a DatasetSpec) -> Self {
        let classes = store::labels_of(project);
        let class_index = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        let overlap = u64::try_from(project.overlap.max(1)).unwrap_or(1);
        Self {
            db,
            spec,
            project_id: project.id,
            schema: agreement::Schema {
                classes,
                multi_label: project.multi_label,
            },
            class_index,
            excluded: spec.exclude_annotators.iter().cloned().collect(),
            chunk_items: (CHUNK_ROWS / overlap).max(100),
            after: 0,
            done: false,
            counts: Counts::default(),
            annotators: BTreeSet::new(),
        }
    }

    /// The figures so far (final once [`next_chunk`](Self::next_chunk) returned `None`).
    pub fn counts(&self) -> Counts {
        let mut c = self.counts.clone();
        c.annotators = self.annotators.len() as u64;
        c
    }

    /// The next chunk's rows (possibly none), or `None` after the last item.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<DatasetRow>>, DatasetError> {
        if self.done {
            return Ok(None);
        }
        let as_of = self.spec.as_of_ms();
        let limit = i64::try_from(self.chunk_items).unwrap_or(i64::MAX);
        let items = self
            .db
            .query_all(sql(
                self.db,
                "SELECT id, external_id, uri, payload FROM annotation_items \
                 WHERE project_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                vec![self.project_id.into(), self.after.into(), limit.into()],
            ))
            .await?
            .into_iter()
            .map(|r| {
                Ok(ItemRow {
                    id: r.try_get("", "id")?,
                    external_id: r.try_get("", "external_id")?,
                    uri: r.try_get("", "uri")?,
                    payload: r.try_get("", "payload")?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        let Some(last) = items.last() else {
            self.done = true;
            return Ok(None);
        };
        let (lo, hi) = (self.after, last.id);
        self.after = hi;
        if (items.len() as u64) < self.chunk_items {
            self.done = true;
        }
        let records = self
            .db
            .query_all(sql(
                self.db,
                "SELECT id, item_id, annotator, labels, supersedes FROM annotation_annotations \
                 WHERE project_id = $1 AND item_id > $2 AND item_id <= $3 AND created_at_ms <= $4 \
                 ORDER BY item_id, annotator, id",
                vec![self.project_id.into(), lo.into(), hi.into(), as_of.into()],
            ))
            .await?
            .into_iter()
            .map(|r| {
                let labels: String = r.try_get("", "labels")?;
                Ok(Record {
                    id: r.try_get("", "id")?,
                    item_id: r.try_get("", "item_id")?,
                    annotator: r.try_get("", "annotator")?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    supersedes: r.try_get("", "supersedes")?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        let verdicts = if self.spec.reviewed_only {
            self.latest_verdicts(lo, hi, as_of).await?
        } else {
            HashMap::new()
        };
        Ok(Some(self.rows(&items, records, &verdicts)))
    }

    /// The latest verdict (as of `as_of`) of each reviewed record of items in `(lo, hi]`.
    async fn latest_verdicts(
        &self,
        lo: i64,
        hi: i64,
        as_of: i64,
    ) -> Result<HashMap<i64, bool>, DbErr> {
        let rows = self
            .db
            .query_all(sql(
                self.db,
                "SELECT r.annotation_id, r.verdict FROM annotation_reviews r \
                 JOIN annotation_annotations a ON a.id = r.annotation_id \
                 WHERE a.project_id = $1 AND a.item_id > $2 AND a.item_id <= $3 \
                   AND a.created_at_ms <= $4 AND r.created_at_ms <= $4 \
                 ORDER BY r.annotation_id, r.id",
                vec![self.project_id.into(), lo.into(), hi.into(), as_of.into()],
            ))
            .await?;
        let mut out = HashMap::new();
        for r in rows {
            let id: i64 = r.try_get("", "annotation_id")?;
            let verdict: String = r.try_get("", "verdict")?;
            // Ordered by review id: the last one wins.
            out.insert(id, verdict == "accept");
        }
        Ok(out)
    }

    fn schema_order(&self, mut labels: Vec<String>) -> Vec<String> {
        labels.sort_by(|a, b| {
            let ia = self.class_index.get(a).copied().unwrap_or(usize::MAX);
            let ib = self.class_index.get(b).copied().unwrap_or(usize::MAX);
            ia.cmp(&ib).then_with(|| a.cmp(b))
        });
        labels.dedup();
        labels
    }

    /// Resolve the chunk's records into rows.
    fn rows(
        &mut self,
        items: &[ItemRow],
        records: Vec<Record>,
        verdicts: &HashMap<i64, bool>,
    ) -> Vec<DatasetRow> {
        // (item, annotator) → records, oldest first (the query's order).
        let mut groups: BTreeMap<(i64, String), Vec<Record>> = BTreeMap::new();
        for r in records {
            groups
                .entry((r.item_id, r.annotator.clone()))
                .or_default()
                .push(r);
        }
        // item → its current, selected annotations, by annotator.
        let mut votes: BTreeMap<i64, Vec<Record>> = BTreeMap::new();
        for ((item, annotator), recs) in groups {
            let superseded: HashSet<i64> = recs.iter().filter_map(|r| r.supersedes).collect();
            let mut heads: Vec<Record> = recs
                .into_iter()
                .filter(|r| !superseded.contains(&r.id))
                .collect();
            let Some(current) = heads.pop() else {
                continue;
            };
            self.counts.skipped.forked_history += heads.len() as u64;
            if self.excluded.contains(&annotator) {
                self.counts.skipped.excluded_annotator += 1;
                continue;
            }
            if self.spec.reviewed_only {
                match verdicts.get(&current.id) {
                    None => {
                        self.counts.skipped.not_reviewed += 1;
                        continue;
                    }
                    Some(false) => {
                        self.counts.skipped.rejected += 1;
                        continue;
                    }
                    Some(true) => {}
                }
            }
            let labels = self.schema_order(current.labels);
            votes
                .entry(item)
                .or_default()
                .push(Record { labels, ..current });
        }
        if let Some(min) = self.spec.min_agreement {
            let mut below = 0;
            votes.retain(|_, v| {
                let mut sets: HashMap<&[String], u64> = HashMap::new();
                for r in v.iter() {
                    *sets.entry(r.labels.as_slice()).or_default() += 1;
                }
                let top = sets.values().copied().max().unwrap_or(0);
                #[allow(clippy::cast_precision_loss)]
                let share = top as f64 / v.len().max(1) as f64;
                let keep = share >= min;
                below += u64::from(!keep);
                keep
            });
            self.counts.skipped.below_agreement += below;
        }
        let info: HashMap<i64, &ItemRow> = items.iter().map(|i| (i.id, i)).collect();
        let row = |item: &ItemRow, labels, annotators, ids| DatasetRow {
            item_id: item.id,
            external_id: item.external_id.clone(),
            uri: item.uri.clone(),
            payload: item.payload.clone(),
            labels,
            annotators,
            annotation_ids: ids,
        };
        let mut out = Vec::new();
        match &self.spec.consolidation {
            None => {
                for (item, recs) in votes {
                    let Some(it) = info.get(&item) else { continue };
                    self.counts.items += 1;
                    for r in recs {
                        self.annotators.insert(r.annotator.clone());
                        out.push(row(it, r.labels, vec![r.annotator], vec![r.id]));
                    }
                }
            }
            Some(rule) => {
                let rows: Vec<agreement::Row> = votes
                    .iter()
                    .flat_map(|(&item, recs)| {
                        recs.iter().map(move |r| agreement::Row {
                            item,
                            annotator: r.annotator.clone(),
                            labels: r.labels.clone(),
                        })
                    })
                    .collect();
                for c in agreement::consolidate(&rows, &self.schema, rule) {
                    let (Some(it), Some(recs)) = (info.get(&c.item), votes.get(&c.item)) else {
                        continue;
                    };
                    match c.consensus {
                        agreement::Consensus::Label { labels, .. } => {
                            self.counts.items += 1;
                            let annotators: Vec<String> =
                                recs.iter().map(|r| r.annotator.clone()).collect();
                            self.annotators.extend(annotators.iter().cloned());
                            let ids = recs.iter().map(|r| r.id).collect();
                            out.push(row(it, labels, annotators, ids));
                        }
                        agreement::Consensus::Unresolved { .. } => {
                            self.counts.skipped.unresolved += 1;
                        }
                        agreement::Consensus::Insufficient { .. } => {
                            self.counts.skipped.insufficient += 1;
                        }
                    }
                }
            }
        }
        self.counts.rows += out.len() as u64;
        out
    }
}

// ---- encodings ----

/// Parquet: rows per record batch, whatever the database chunks were (page boundaries depend
/// on how batches arrive, so the batching is part of the deterministic encoding).
pub const PARQUET_BATCH_ROWS: usize = 8192;
/// Parquet: rows per row group.
pub const PARQUET_ROW_GROUP_ROWS: usize = 8 * PARQUET_BATCH_ROWS;
/// Parquet `created_by`: fixed, so files do not change with the library or Bulwark version
/// (the manifest carries the version). Bump the `v` when the encoding changes.
pub const PARQUET_CREATED_BY: &str = "bulwark annotation export v1";

/// Turns rows into bytes, chunk by chunk.
pub enum Encoder {
    Csv {
        consolidated: bool,
        header_done: bool,
    },
    Jsonl {
        consolidated: bool,
    },
    Parquet {
        consolidated: bool,
        schema: SchemaRef,
        writer: Box<parquet::arrow::ArrowWriter<Vec<u8>>>,
        pending: Vec<DatasetRow>,
    },
}

#[derive(Serialize)]
struct JsonRow<'a> {
    item_id: i64,
    external_id: &'a str,
    uri: Option<&'a str>,
    payload: serde_json::Value,
    labels: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    annotator: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotation_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotators: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotation_ids: Option<&'a [i64]>,
}

fn arrow_schema(consolidated: bool) -> SchemaRef {
    let list =
        |name: &str, t: DataType| Field::new_list(name, Field::new_list_field(t, false), false);
    let mut fields = vec![
        Field::new("item_id", DataType::Int64, false),
        Field::new("external_id", DataType::Utf8, false),
        Field::new("uri", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, true),
        list("labels", DataType::Utf8),
    ];
    if consolidated {
        fields.push(list("annotators", DataType::Utf8));
        fields.push(list("annotation_ids", DataType::Int64));
    } else {
        fields.push(Field::new("annotator", DataType::Utf8, false));
        fields.push(Field::new("annotation_id", DataType::Int64, false));
    }
    std::sync::Arc::new(Schema::new(fields))
}

fn writer_properties() -> parquet::file::properties::WriterProperties {
    use parquet::basic::Compression;
    use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
    WriterProperties::builder()
        .set_created_by(PARQUET_CREATED_BY.into())
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
        .set_max_row_group_bytes(None)
        .set_write_batch_size(1024)
        .set_data_page_size_limit(1024 * 1024)
        .set_dictionary_page_size_limit(1024 * 1024)
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_key_value_metadata(None)
        .build()
}

impl Encoder {
    pub fn new(format: Format, consolidated: bool) -> Result<Self, DatasetError> {
        Ok(match format {
            Format::Csv => Self::Csv {
                consolidated,
                header_done: false,
            },
            Format::Jsonl => Self::Jsonl { consolidated },
            Format::Parquet => {
                let schema = arrow_schema(consolidated);
                let writer = parquet::arrow::ArrowWriter::try_new(
                    Vec::new(),
                    schema.clone(),
                    Some(writer_properties()),
                )?;
                Self::Parquet {
                    consolidated,
                    schema,
                    writer: Box::new(writer),
                    pending: Vec::new(),
                }
            }
        })
    }

    /// The bytes of `rows` (Parquet: of the row groups completed meanwhile).
    pub fn encode(&mut self, rows: Vec<DatasetRow>) -> Result<Vec<u8>, DatasetError> {
        match self {
            Self::Csv {
                consolidated,
                header_done,
            } => {
                let mut w = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::Any(b'\n'))
                    .from_writer(Vec::new());
                if !*header_done {
                    if *consolidated {
                        w.write_record(["external_id", "uri", "label"])?;
                    } else {
                        w.write_record(["external_id", "uri", "label", "annotator"])?;
                    }
                    *header_done = true;
                }
                for r in &rows {
                    let label = r.labels.join(CSV_LABEL_SEPARATOR);
                    let uri = r.uri.as_deref().unwrap_or("");
                    if *consolidated {
                        w.write_record([r.external_id.as_str(), uri, label.as_str()])?;
                    } else {
                        let who = r.annotators.first().map_or("", String::as_str);
                        w.write_record([r.external_id.as_str(), uri, label.as_str(), who])?;
                    }
                }
                w.into_inner().map_err(|e| DatasetError::Io(e.into_error()))
            }
            Self::Jsonl { consolidated } => {
                let mut out = Vec::new();
                for r in &rows {
                    let payload = match &r.payload {
                        None => serde_json::Value::Null,
                        Some(t) => serde_json::from_str(t)
                            .unwrap_or_else(|_| serde_json::Value::String(t.clone())),
                    };
                    let (annotator, annotation_id, annotators, annotation_ids) = if *consolidated {
                        (
                            None,
                            None,
                            Some(r.annotators.as_slice()),
                            Some(r.annotation_ids.as_slice()),
                        )
                    } else {
                        (
                            r.annotators.first().map(String::as_str),
                            r.annotation_ids.first().copied(),
                            None,
                            None,
                        )
                    };
                    serde_json::to_writer(
                        &mut out,
                        &JsonRow {
                            item_id: r.item_id,
                            external_id: &r.external_id,
                            uri: r.uri.as_deref(),
                            payload,
                            labels: &r.labels,
                            annotator,
                            annotation_id,
                            annotators,
                            annotation_ids,
                        },
                    )?;
                    out.push(b'\n');
                }
                Ok(out)
            }
            Self::Parquet {
                consolidated,
                schema,
                writer,
                pending,
            } => {
                pending.extend(rows);
                while pending.len() >= PARQUET_BATCH_ROWS {
                    let rest = pending.split_off(PARQUET_BATCH_ROWS);
                    let batch = std::mem::replace(pending, rest);
                    writer.write(&record_batch(schema, *consolidated, &batch)?)?;
                }
                writer.sync()?;
                Ok(std::mem::take(writer.inner_mut()))
            }
        }
    }

    /// The last bytes (Parquet: the remaining rows and the footer).
    pub fn finish(self) -> Result<Vec<u8>, DatasetError> {
        match self {
            Self::Csv { .. } | Self::Jsonl { .. } => Ok(Vec::new()),
            Self::Parquet {
                consolidated,
                schema,
                mut writer,
                pending,
            } => {
                if !pending.is_empty() {
                    writer.write(&record_batch(&schema, consolidated, &pending)?)?;
                }
                writer.finish()?;
                writer.sync()?;
                Ok(std::mem::take(writer.inner_mut()))
            }
        }
    }
}

fn record_batch(
    schema: &SchemaRef,
    consolidated: bool,
    rows: &[DatasetRow],
) -> Result<RecordBatch, DatasetError> {
    let list_of = |t: DataType| Field::new_list_field(t, false);
    let mut item_id = Int64Builder::with_capacity(rows.len());
    let mut external_id = StringBuilder::new();
    let mut uri = StringBuilder::new();
    let mut payload = StringBuilder::new();
    let mut labels = ListBuilder::new(StringBuilder::new()).with_field(list_of(DataType::Utf8));
    let mut annotators = ListBuilder::new(StringBuilder::new()).with_field(list_of(DataType::Utf8));
    let mut ids = ListBuilder::new(Int64Builder::new()).with_field(list_of(DataType::Int64));
    let mut annotator = StringBuilder::new();
    let mut annotation_id = Int64Builder::with_capacity(rows.len());
    for r in rows {
        item_id.append_value(r.item_id);
        external_id.append_value(&r.external_id);
        uri.append_option(r.uri.as_deref());
        payload.append_option(r.payload.as_deref());
        for l in &r.labels {
            labels.values().append_value(l);
        }
        labels.append(true);
        if consolidated {
            for a in &r.annotators {
                annotators.values().append_value(a);
            }
            annotators.append(true);
            for i in &r.annotation_ids {
                ids.values().append_value(*i);
            }
            ids.append(true);
        } else {
            annotator.append_value(r.annotators.first().map_or("", String::as_str));
            annotation_id.append_value(r.annotation_ids.first().copied().unwrap_or_default());
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        std::sync::Arc::new(item_id.finish()),
        std::sync::Arc::new(external_id.finish()),
        std::sync::Arc::new(uri.finish()),
        std::sync::Arc::new(payload.finish()),
        std::sync::Arc::new(labels.finish()),
    ];
    if consolidated {
        cols.push(std::sync::Arc::new(annotators.finish()));
        cols.push(std::sync::Arc::new(ids.finish()));
    } else {
        cols.push(std::sync::Arc::new(annotator.finish()));
        cols.push(std::sync::Arc::new(annotation_id.finish()));
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// Progress after each chunk: rows written so far. Returning an error stops the generation.
pub trait Progress {
    fn chunk_done(
        &mut self,
        rows: u64,
    ) -> impl std::future::Future<Output = Result<(), DatasetError>> + Send;
}

/// No progress reporting.
pub struct NoProgress;

impl Progress for NoProgress {
    async fn chunk_done(&mut self, _rows: u64) -> Result<(), DatasetError> {
        Ok(())
    }
}

/// Stream the dataset of `spec` (resolved: see [`DatasetSpec::resolved`]) into `out`, hashing
/// as it goes. `out` is flushed, not synced: durability is the caller's.
pub async fn generate<C, W, P>(
    db: &C,
    project: &project::Model,
    spec: &DatasetSpec,
    out: &mut W,
    progress: &mut P,
) -> Result<Generated, DatasetError>
where
    C: ConnectionTrait,
    W: AsyncWrite + Unpin,
    P: Progress,
{
    let mut rows = RowStream::new(db, project, spec);
    let mut encoder = Encoder::new(spec.format, spec.consolidation.is_some())?;
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = rows.next_chunk().await? {
        let data = encoder.encode(chunk)?;
        hash.update(&data);
        bytes += data.len() as u64;
        out.write_all(&data).await?;
        progress.chunk_done(rows.counts.rows).await?;
    }
    let data = encoder.finish()?;
    hash.update(&data);
    bytes += data.len() as u64;
    out.write_all(&data).await?;
    out.flush().await?;
    Ok(Generated {
        counts: rows.counts(),
        sha256: hex(&hash.finalize()),
        bytes,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A file name made of `name`'s letters, digits, `.`, `-` and `_` (others become `_`).
pub fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() { "dataset".into() } else { s }
}

/// Write the dataset to `path` atomically: into `<path>.tmp` (or `tmp` when given), fsync,
/// rename, fsync the directory.
pub async fn write_file<C: ConnectionTrait, P: Progress>(
    db: &C,
    project: &project::Model,
    spec: &DatasetSpec,
    path: &std::path::Path,
    tmp: Option<&std::path::Path>,
    progress: &mut P,
) -> Result<Generated, DatasetError> {
    let tmp = tmp.map_or_else(
        || {
            let mut t = path.as_os_str().to_owned();
            t.push(".tmp");
            std::path::PathBuf::from(t)
        },
        std::path::Path::to_path_buf,
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await?;
    }
    let result = async {
        let file = tokio::fs::File::create(&tmp).await?;
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let g = generate(db, project, spec, &mut out, progress).await?;
        let file = out.into_inner();
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, path).await?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the directory is synced.
            if let Ok(d) = tokio::fs::File::open(dir).await {
                let _ = d.sync_all().await;
            }
        }
        Ok::<_, DatasetError>(g)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// An `i64` as JSON Schema's `integer` admits it: `3`, and also `3.0` (no fractional part).
fn whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::Deserialize as _;
    use serde::de::Error as _;
    let n = serde_json::Number::deserialize(d)?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let whole = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64)
            .map(|f| f as i64)
    });
    whole.ok_or_else(|| D::Error::custom(format!("must be a whole number, not {n}")))
}
