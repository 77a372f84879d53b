//! Change events as they travel on the bus (R2): one message holds consecutive changes of one
//! table with one column layout, in WAL order. docs/reporting.md describes the format.

use serde::{Deserialize, Serialize};

/// The stream every change travels on; a subject per table.
pub const STREAM: &str = "CDC";
pub const SUBJECT_PREFIX: &str = "cdc";

/// `cdc.<schema>.<table>`.
pub fn subject(table: &str) -> String {
    format!("{SUBJECT_PREFIX}.{table}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A row read by the initial snapshot.
    #[serde(rename = "r")]
    Read,
    #[serde(rename = "c")]
    Insert,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }
}

/// A column of the message's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnType {
    pub name: String,
    /// PostgreSQL type OID; the sink maps it to an Arrow type.
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the key the sink merges on.
    pub key: bool,
}

/// One change of one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub op: Op,
    /// The commit LSN of the change's transaction (0: the snapshot). With `seq`, the order
    /// of changes: later commits win, and within one, later changes.
    pub lsn: u64,
    /// The change's position inside its commit, from 1 (0: the snapshot).
    pub seq: u64,
    pub xid: u32,
    /// Commit time, Unix microseconds (the snapshot: when the row was read).
    pub commit_time_us: i64,
    /// Values in text form, one per column; `None` is NULL. A delete carries the old key
    /// (and, under replica identity full, the old row).
    pub after: Vec<Option<String>>,
    /// Columns (indexes) whose TOASTed value the update did not change: the sink keeps the
    /// value it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<usize>,
    /// The old key, when an update changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Vec<Option<String>>>,
}

/// One bus message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// `schema.table` of the source.
    pub table: String,
    pub columns: Vec<ColumnType>,
    pub changes: Vec<Change>,
}

impl Batch {
    /// The message id: table and the first and last change's position, so a replay of the
    /// same changes is dropped by the stream's duplicate window, and a different cut of them
    /// (after a restart) is a different message the sink's LSN guard makes harmless.
    pub fn message_id(&self) -> String {
        let pos = |c: Option<&Change>| c.map_or((0, 0), |c| (c.lsn, c.seq));
        let (a, b) = pos(self.changes.first());
        let (c, d) = pos(self.changes.last());
        format!("{}:{a:X}.{b:X}-{c:X}.{d:X}", self.table)
    }
}
