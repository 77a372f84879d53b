//! Streaming import of items from JSON lines or CSV (one pass, constant memory): each line is
//! checked on its own, errors are reported with their line number while every good line is
//! stored, and an `external_id` the project has already is left as it is, so re-running an
//! import (or resuming one that stopped) adds nothing twice.

use bulwark_kernel::http::{Bounded, Text};
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait, Value};
use serde::Deserialize;
use tokio::io::AsyncRead;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::{Result, StoreError, add_counts, now_ms, sql};

/// Rows per insert statement and transaction.
const BATCH: usize = 500;
/// Per-line errors listed in the report; later ones are only counted.
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Longest `external_id`, in characters.
pub const MAX_EXTERNAL_ID: usize = 255;
/// Longest `uri`, in characters.
pub const MAX_URI: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    JsonLines,
    /// A header line naming columns; `external_id` is required.
    Csv,
}

/// An item's priority: higher is served first.
pub type Priority = Bounded<{ i32::MIN as i64 }, { i32::MAX as i64 }>;

/// One item as a line gives it (the JSON-lines schema of the import endpoint).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemLine {
    /// Unique in the project; a line with a known one is left as it is.
    #[schema(inline)]
    pub external_id: Text<{ MAX_EXTERNAL_ID }>,
    /// Where the data is (a path or URL the labeling page can show).
    #[serde(default)]
    #[schema(inline)]
    pub uri: Option<Text<{ MAX_URI }>>,
    /// What the annotator sees (text, fields); any JSON.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Default 0.
    #[serde(default)]
    #[schema(inline)]
    pub priority: Option<Priority>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineError {
    pub line: u64,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Lines read (blank lines excluded).
    pub lines: u64,
    pub imported: u64,
    /// Lines whose `external_id` the project had already.
    pub existing: u64,
    /// Lines refused; the first [`MAX_LISTED_ERRORS`] are in `errors`.
    pub failed: u64,
    pub errors: Vec<LineError>,
}

impl Report {
    fn error(&mut self, line: u64, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(LineError { line, message });
        }
    }
}

/// Parse one JSON line.
fn parse_json(text: &str) -> std::result::Result<ItemLine, String> {
    serde_json::from_str::<ItemLine>(text).map_err(|e| e.to_string())
}

/// The columns of a CSV header: known ones by name, the rest go into `payload`.
struct CsvHeader {
    names: Vec<String>,
}

impl CsvHeader {
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let names = csv_fields(text)?;
        if !names.iter().any(|n| n == "external_id") {
            return Err("the header has no `external_id` column".into());
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(format!("column {n:?} appears twice in the header"));
            }
        }
        Ok(Self { names })
    }

    fn record(&self, text: &str) -> std::result::Result<ItemLine, String> {
        let fields = csv_fields(text)?;
        if fields.len() != self.names.len() {
            return Err(format!(
                "{} fields, the header has {}",
                fields.len(),
                self.names.len()
            ));
        }
        let mut external_id = None;
        let mut line = ItemLine {
            external_id: Text::parse("-").map_err(|e| e.to_string())?,
            uri: None,
            payload: None,
            metadata: None,
            priority: None,
        };
        let mut rest = serde_json::Map::new();
        for (name, value) in self.names.iter().zip(fields) {
            let json = |v: &str| serde_json::from_str(v).map_err(|e| format!("{name}: {e}"));
            match name.as_str() {
                "external_id" => {
                    external_id =
                        Some(Text::parse(&value).map_err(|e| format!("external_id: {e}"))?)
                }
                "uri" if !value.is_empty() => {
                    line.uri = Some(Text::parse(&value).map_err(|e| format!("uri: {e}"))?)
                }
                "uri" => {}
                "priority" if !value.is_empty() => {
                    line.priority = Some(
                        value
                            .parse::<i64>()
                            .ok()
                            .and_then(Priority::new)
                            .ok_or_else(|| {
                                format!("priority: {value:?} is not a 32-bit integer")
                            })?,
                    )
                }
                "priority" => {}
                "payload" if !value.is_empty() => line.payload = Some(json(&value)?),
                "metadata" if !value.is_empty() => line.metadata = Some(json(&value)?),
                "payload" | "metadata" => {}
                _ => {
                    rest.insert(name.clone(), serde_json::Value::String(value));
                }
            }
        }
        if !rest.is_empty() {
            match &mut line.payload {
                None => line.payload = Some(serde_json::Value::Object(rest)),
                Some(serde_json::Value::Object(p)) => p.extend(rest),
                Some(_) => {
                    return Err("payload: must be an object when other columns are given".into());
                }
            }
        }
        line.external_id = external_id.ok_or("external_id: missing")?;
        Ok(line)
    }
}

/// The fields of one CSV record (RFC 4180 quoting; the record may span lines).
fn csv_fields(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    match reader.records().next() {
        Some(Ok(rec)) => Ok(rec.iter().map(str::to_owned).collect()),
        Some(Err(e)) => Err(format!("not a CSV record: {e}")),
        None => Err("empty record".into()),
    }
}

/// A CSV record is complete when its quotes balance (a quoted field may hold newlines).
fn quotes_balanced(text: &str) -> bool {
    text.bytes().filter(|b| *b == b'"').count() % 2 == 0
}

/// Progress of a running import, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub lines: u64,
    pub imported: u64,
}

/// Read `input` to its end and store its items into `project_id`.
pub async fn import<R: AsyncRead + Unpin + Send>(
    db: &DatabaseConnection,
    project_id: i64,
    format: Format,
    input: R,
    max_line_bytes: usize,
    on_progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Report> {
    let mut lines = FramedRead::new(input, LinesCodec::new_with_max_length(max_line_bytes));
    let mut report = Report::default();
    let mut batch: Vec<ItemLine> = Vec::with_capacity(BATCH);
    let mut header: Option<CsvHeader> = None;
    let mut pending = String::new();
    let mut pending_start = 0u64;
    let mut number = 0u64;
    while let Some(next) = lines.next().await {
        number += 1;
        let text = match next {
            Ok(t) => t,
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                report.lines += 1;
                report.error(number, format!("longer than {max_line_bytes} bytes"));
                pending.clear();
                continue;
            }
            Err(LinesCodecError::Io(e)) => {
                // The upload broke off: what was read is stored, and the caller learns why.
                flush(db, project_id, &mut batch, &mut report).await?;
                return Err(StoreError::invalid(
                    "body",
                    format!("reading the upload failed: {e}"),
                ));
            }
        };
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let parsed = match format {
            Format::JsonLines => {
                if text.trim().is_empty() {
                    continue;
                }
                report.lines += 1;
                parse_json(text)
            }
            Format::Csv => {
                if pending.is_empty() {
                    if text.trim().is_empty() {
                        continue;
                    }
                    pending_start = number;
                } else {
                    pending.push('\n');
                }
                pending.push_str(text);
                if pending.len() > max_line_bytes {
                    report.lines += 1;
                    report.error(
                        pending_start,
                        format!("record longer than {max_line_bytes} bytes"),
                    );
                    pending.clear();
                    continue;
                }
                if !quotes_balanced(&pending) {
                    continue;
                }
                let record = std::mem::take(&mut pending);
                match &header {
                    None => match CsvHeader::parse(&record) {
                        Ok(h) => {
                            header = Some(h);
                            continue;
                        }
                        Err(e) => {
                            // Without a usable header no line can be read: nothing is imported,
                            // and the report says why, like any other refused line.
                            report.lines += 1;
                            report.error(pending_start, format!("header: {e}"));
                            return Ok(report);
                        }
                    },
                    Some(h) => {
                        report.lines += 1;
                        h.record(&record)
                    }
                }
            }
        };
        let line_no = if format == Format::Csv {
            pending_start
        } else {
            number
        };
        match parsed {
            Ok(item) => batch.push(item),
            Err(e) => report.error(line_no, e),
        }
        if batch.len() >= BATCH {
            flush(db, project_id, &mut batch, &mut report).await?;
            on_progress(Progress {
                lines: report.lines,
                imported: report.imported,
            });
        }
    }
    if !pending.is_empty() {
        report.lines += 1;
        report.error(
            pending_start,
            "unterminated quoted field at the end of the input".into(),
        );
    }
    flush(db, project_id, &mut batch, &mut report).await?;
    on_progress(Progress {
        lines: report.lines,
        imported: report.imported,
    });
    Ok(report)
}

/// Insert a batch in one transaction with its counter update.
async fn flush(
    db: &DatabaseConnection,
    project_id: i64,
    batch: &mut Vec<ItemLine>,
    report: &mut Report,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut text = String::from(
        "INSERT INTO annotation_items (project_id, external_id, uri, payload, metadata, priority, \
         version, annotation_count, done, created_at_ms) VALUES ",
    );
    let mut values: Vec<Value> = Vec::with_capacity(batch.len() * 6 + 2);
    values.push(project_id.into());
    values.push(now.into());
    for (i, it) in batch.iter().enumerate() {
        let b = 3 + i * 5;
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(&format!(
            "($1, ${}, ${}, ${}, ${}, ${}, 1, 0, {}, $2)",
            b,
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            "false"
        ));
        values.push(it.external_id.as_str().into());
        values.push(it.uri.as_ref().map(|u| u.as_str().to_owned()).into());
        values.push(it.payload.as_ref().map(|v| v.to_string()).into());
        values.push(it.metadata.as_ref().map(|v| v.to_string()).into());
        values.push(
            i32::try_from(it.priority.map_or(0, Priority::get))
                .unwrap_or(0)
                .into(),
        );
    }
    text.push_str(" ON CONFLICT (project_id, external_id) DO NOTHING RETURNING id");
    let tx = db.begin().await?;
    let rows = tx.query_all(sql(&tx, &text, values)).await?;
    let inserted = rows.len() as u64;
    add_counts(
        &tx,
        project_id,
        i64::try_from(inserted).unwrap_or(i64::MAX),
        0,
        0,
    )
    .await?;
    tx.commit().await?;
    report.imported += inserted;
    report.existing += batch.len() as u64 - inserted;
    metrics::counter!("bulwark_annotation_items_imported_total").increment(inserted);
    batch.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_map_known_columns_and_gather_the_rest_into_payload() {
        let h = CsvHeader::parse("external_id,uri,priority,text").expect("header");
        let line = h
            .record("a1,s3://b/a1.jpg,5,\"hello, world\"")
            .expect("record");
        assert_eq!(line.external_id.as_str(), "a1");
        assert_eq!(line.uri.as_deref(), Some("s3://b/a1.jpg"));
        assert_eq!(line.priority.map(Priority::get), Some(5));
        assert_eq!(
            line.payload,
            Some(serde_json::json!({"text": "hello, world"}))
        );
        assert!(h.record("a2,,x,t").is_err_and(|e| e.contains("priority")));
        assert!(h.record("a2,u").is_err_and(|e| e.contains("fields")));
        assert!(CsvHeader::parse("id,uri").is_err());
        assert!(CsvHeader::parse("external_id,uri,uri").is_err());
    }

    #[test]
    fn quoted_newlines_keep_a_record_open() {
        assert!(!quotes_balanced("a1,\"first line"));
        assert!(quotes_balanced("a1,\"first line\nsecond \"\"quoted\"\"\""));
    }

    #[test]
    fn json_lines_are_checked_one_by_one() {
        assert!(parse_json(r#"{"external_id":"x","priority":3}"#).is_ok());
        assert!(parse_json(r#"{"external_id":"  "}"#).is_err_and(|e| e.contains("blank")));
        assert!(
            parse_json(r#"{"external_id":"x","colour":1}"#).is_err_and(|e| e.contains("colour"))
        );
        assert!(parse_json("not json").is_err());
        let long = format!(r#"{{"external_id":"{}"}}"#, "x".repeat(300));
        assert!(parse_json(&long).is_err_and(|e| e.contains("255")));
        assert!(parse_json(r#"{"external_id":"a\u0000b"}"#).is_err_and(|e| e.contains("NUL")));
    }
}
