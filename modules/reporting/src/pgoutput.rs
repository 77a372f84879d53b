//! A decoder of PostgreSQL's `pgoutput` logical decoding messages, protocol version 1 (R2).
//!
//! The layout is PostgreSQL's "Logical Replication Message Formats" (protocol.sgml): one
//! message per row that `pg_logical_slot_peek_binary_changes` returns. Values arrive in their
//! text form; `'u'` marks a TOASTed value the update did not change (its bytes are not in the
//! WAL), which the sink replaces with the value it already holds.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message ends early (wanted {wanted} more bytes at offset {at})")]
    Short { at: usize, wanted: usize },
    #[error("pgoutput message of unknown kind `{0}`")]
    UnknownKind(char),
    #[error("pgoutput tuple value of unknown kind `{0}`")]
    UnknownValue(char),
    #[error("pgoutput string is not UTF-8 or not terminated")]
    BadString,
    #[error("pgoutput {0}: unexpected marker `{1}`")]
    Marker(&'static str, char),
}

/// One column of a relation, as the Relation message declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The table a change refers to. Sent before the first change of a table in a session, and
/// again after its definition changed (an added column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub columns: Vec<Column>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value this update left unchanged.
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        /// Microseconds since 2000-01-01 (PostgreSQL's epoch).
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// The end of the commit record: where a slot may be advanced to past this transaction.
        end_lsn: u64,
        commit_time: i64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or whole old row (`O`, replica identity full), if sent.
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, Type and logical messages: nothing the capture needs.
    Other(char),
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(DecodeError::Short {
                at: self.at,
                wanted: n,
            });
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at.min(self.buf.len())..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::BadString)?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::BadString)?;
        self.at += nul + 1;
        Ok(s.to_owned())
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    Value::Text(
                        std::str::from_utf8(bytes)
                            .map_err(|_| DecodeError::BadString)?
                            .to_owned(),
                    )
                }
                other => return Err(DecodeError::UnknownValue(char::from(other))),
            });
        }
        Ok(values)
    }
}

/// Decode one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf, at: 0 };
    let kind = char::from(r.u8()?);
    Ok(match kind {
        'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.u64()? as i64,
            xid: r.u32()?,
        },
        'C' => {
            r.u8()?; // flags, unused
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.u64()? as i64,
            }
        }
        'R' => {
            let oid = r.u32()?;
            let schema = r.string()?;
            let name = r.string()?;
            let replica_identity = char::from(r.u8()?);
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                m => return Err(DecodeError::Marker("insert", char::from(m))),
            }
        }
        'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut marker = r.u8()?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8()?;
            }
            if marker != b'N' {
                return Err(DecodeError::Marker("update", char::from(marker)));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                m => return Err(DecodeError::Marker("delete", char::from(m))),
            }
        }
        'T' => {
            let n = r.u32()?;
            r.u8()?; // options: cascade, restart identity
            let mut relations = Vec::new();
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        'O' | 'Y' | 'M' => Message::Other(kind),
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

/// `0/1528E70`, PostgreSQL's text form of an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parse PostgreSQL's text form of an LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some("\u{0}u") => b.push(b'u'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_relation_insert_update_delete_commit() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0bids\0d");
        rel.extend(2u16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(20u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"note\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel).expect("test value") else {
            panic!("not a relation")
        };
        assert_eq!((r.schema.as_str(), r.name.as_str()), ("public", "bids"));
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!(r.columns[1].type_oid, 25);

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("7"), None]));
        assert_eq!(
            decode(&ins).expect("test value"),
            Message::Insert {
                relation: 16384,
                new: vec![Value::Text("7".into()), Value::Null]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("7"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("8"), Some("\u{0}u")]));
        let Message::Update { old, new, .. } = decode(&upd).expect("test value") else {
            panic!("not an update")
        };
        assert_eq!(old.expect("test value")[0], Value::Text("7".into()));
        assert_eq!(new[1], Value::Unchanged);

        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("8"), None]));
        assert!(matches!(
            decode(&del).expect("test value"),
            Message::Delete { .. }
        ));

        let mut c = vec![b'C', 0];
        c.extend(0x1528E70u64.to_be_bytes());
        c.extend(0x1529010u64.to_be_bytes());
        c.extend(5i64.to_be_bytes());
        assert_eq!(
            decode(&c).expect("test value"),
            Message::Commit {
                commit_lsn: 0x1528E70,
                end_lsn: 0x1529010,
                commit_time: 5
            }
        );
    }

    #[test]
    fn refuses_truncated_and_unknown_messages() {
        assert!(matches!(
            decode(&[b'B', 0, 0]),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownKind('Z')));
        let mut ins = vec![b'I'];
        ins.extend(1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(1u16.to_be_bytes());
        ins.push(b'x');
        assert_eq!(decode(&ins), Err(DecodeError::UnknownValue('x')));
        // A text value claiming more bytes than the message holds.
        let mut long = vec![b'I'];
        long.extend(1u32.to_be_bytes());
        long.push(b'N');
        long.extend(1u16.to_be_bytes());
        long.push(b't');
        long.extend(u32::MAX.to_be_bytes());
        assert!(matches!(decode(&long), Err(DecodeError::Short { .. })));
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("0/1528E70"), Some(0x1528E70));
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
        assert_eq!(parse_lsn(&format_lsn(0xAB_0000_0001)), Some(0xAB_0000_0001));
        assert_eq!(parse_lsn("zz"), None);
        assert_eq!(parse_lsn("1/FFFFFFFFF"), None);
    }
}
