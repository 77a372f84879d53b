//! The embedded bus (K4): JetStream semantics on the application database.
//!
//! Tables come from the kernel migration `m20261126_000001_bus`. Every claim is a conditional
//! write checked by `rows_affected`, so several processes sharing one PostgreSQL database never
//! hand the same delivery out twice. Transactions always start with a write so SQLite takes its
//! write lock up front (a read-then-write upgrade fails with `SQLITE_BUSY` regardless of the
//! busy timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement,
    TransactionTrait, Value,
};
use tokio::sync::{Notify, broadcast};

use super::{
    Acker, Bus, BusError, Consumer, ConsumerSpec, Delivery, Headers, Message, PublishAck,
    StreamSpec, subject_matches, validate_name, validate_pattern, validate_subject,
};
use crate::config::BusConfig;

const BUS: &str = "embedded";
/// JetStream's default when a consumer gives no ack wait.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How often (at most) publish sweeps expired duplicate ids and messages past `max_age`.
const JANITOR_EVERY_MS: i64 = 5_000;
/// Buffered ephemeral messages per subscriber before a slow one starts losing them.
const FANOUT_CAPACITY: usize = 1024;

/// The bus stored in the application database.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    default_duplicate_window: Duration,
    poll_interval: Duration,
    /// Wakes this process's long-polling consumers when it publishes.
    published: Notify,
    fanout: broadcast::Sender<Message>,
    last_janitor_ms: AtomicI64,
}

impl EmbeddedBus {
    pub fn new(db: DatabaseConnection, cfg: &BusConfig) -> Self {
        let (fanout, _) = broadcast::channel(FANOUT_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                db,
                default_duplicate_window: cfg.duplicate_window,
                poll_interval: cfg.poll_interval.max(Duration::from_millis(1)),
                published: Notify::new(),
                fanout,
                last_janitor_ms: AtomicI64::new(0),
            }),
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A statement with `?` placeholders, renumbered to `$n` for PostgreSQL.
fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

fn storage(err: DbErr) -> BusError {
    match err {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => BusError::Unavailable(err.to_string()),
        other => BusError::Storage(other.to_string()),
    }
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, col: &str) -> Result<T, BusError> {
    row.try_get::<T>("", col).map_err(storage)
}

struct StreamRow {
    name: String,
    subjects: Vec<String>,
    duplicate_window_ms: i64,
}

impl Inner {
    fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    async fn exec(&self, sql: &str, values: Vec<Value>) -> Result<u64, BusError> {
        let res = self
            .db
            .execute(stmt(self.backend(), sql, values))
            .await
            .map_err(storage)?;
        Ok(res.rows_affected())
    }

    async fn streams(&self) -> Result<Vec<StreamRow>, BusError> {
        let rows = self
            .db
            .query_all(stmt(
                self.backend(),
                "SELECT name, subjects, duplicate_window_ms FROM bus_streams ORDER BY name",
                vec![],
            ))
            .await
            .map_err(storage)?;
        rows.iter()
            .map(|r| {
                let subjects: String = get(r, "subjects")?;
                Ok(StreamRow {
                    name: get(r, "name")?,
                    subjects: serde_json::from_str(&subjects).map_err(|e| {
                        BusError::Storage(format!("bus_streams.subjects is not a JSON list: {e}"))
                    })?,
                    duplicate_window_ms: get(r, "duplicate_window_ms")?,
                })
            })
            .collect()
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        let started = Instant::now();
        let result = self
            .publish_inner(subject, message_id, &mut headers, payload)
            .await;
        metrics::histogram!("bulwark_bus_publish_duration_seconds", "bus" => BUS)
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(ack) if ack.duplicate => "duplicate",
            Ok(_) => "stored",
            Err(_) => "error",
        };
        metrics::counter!("bulwark_bus_published_total", "bus" => BUS, "outcome" => outcome)
            .increment(1);
        if matches!(&result, Ok(ack) if !ack.duplicate) {
            self.published.notify_waiters();
        }
        result
    }

    async fn publish_inner(
        &self,
        subject: &str,
        message_id: Option<&str>,
        headers: &mut Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        validate_subject(subject)?;
        if message_id.is_some_and(str::is_empty) {
            return Err(BusError::Invalid("empty message id".into()));
        }
        let streams = self.streams().await?;
        let stream = streams
            .iter()
            .find(|s| s.subjects.iter().any(|p| subject_matches(p, subject)))
            .ok_or_else(|| BusError::Invalid(format!("no stream captures subject `{subject}`")))?;
        let now = now_ms();
        self.janitor(now).await;

        if let Some(id) = message_id
            && let Some(seq) = self.live_duplicate(&stream.name, id, now).await?
        {
            return Ok(PublishAck {
                stream: stream.name.clone(),
                sequence: seq,
                duplicate: true,
            });
        }

        crate::telemetry::inject_context(headers);
        let headers_json = serde_json::to_string(&headers)
            .map_err(|e| BusError::Invalid(format!("headers: {e}")))?;
        let backend = self.backend();
        let txn = self.db.begin().await.map_err(storage)?;
        // The insert comes first: it is the write that takes SQLite's lock.
        let row = txn
            .query_one(stmt(
                backend,
                "INSERT INTO bus_messages (stream, subject, msg_id, headers, payload, published_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
                vec![
                    stream.name.clone().into(),
                    subject.into(),
                    message_id.map(str::to_owned).into(),
                    headers_json.into(),
                    payload.to_vec().into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(storage)?
            .ok_or_else(|| BusError::Storage("INSERT ... RETURNING returned no row".into()))?;
        let seq: i64 = get(&row, "seq")?;
        if let Some(id) = message_id {
            // Takes over an expired row; leaves a live one alone (0 rows), which means a
            // concurrent publisher of the same id won the race.
            let claimed = txn
                .execute(stmt(
                    backend,
                    "INSERT INTO bus_dedup (stream, msg_id, seq, expires_at_ms) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (stream, msg_id) DO UPDATE SET seq = excluded.seq, \
                     expires_at_ms = excluded.expires_at_ms WHERE bus_dedup.expires_at_ms <= ?",
                    vec![
                        stream.name.clone().into(),
                        id.into(),
                        seq.into(),
                        now.saturating_add(stream.duplicate_window_ms).into(),
                        now.into(),
                    ],
                ))
                .await
                .map_err(storage)?
                .rows_affected();
            if claimed == 0 {
                txn.rollback().await.map_err(storage)?;
                let original = self
                    .live_duplicate(&stream.name, id, now)
                    .await?
                    .ok_or_else(|| {
                        BusError::Storage("duplicate id vanished while publishing".into())
                    })?;
                return Ok(PublishAck {
                    stream: stream.name.clone(),
                    sequence: original,
                    duplicate: true,
                });
            }
        }
        txn.commit().await.map_err(storage)?;
        Ok(PublishAck {
            stream: stream.name.clone(),
            sequence: seq_u64(seq),
            duplicate: false,
        })
    }

    async fn live_duplicate(
        &self,
        stream: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<u64>, BusError> {
        let row = self
            .db
            .query_one(stmt(
                self.backend(),
                "SELECT seq FROM bus_dedup WHERE stream = ? AND msg_id = ? AND expires_at_ms > ?",
                vec![stream.into(), id.into(), now.into()],
            ))
            .await
            .map_err(storage)?;
        row.map(|r| get::<i64>(&r, "seq").map(seq_u64)).transpose()
    }

    /// Best effort: drop expired duplicate ids and messages past their stream's `max_age`.
    async fn janitor(&self, now: i64) {
        let last = self.last_janitor_ms.load(Ordering::Relaxed);
        if now - last < JANITOR_EVERY_MS
            || self
                .last_janitor_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let sweep = async {
            self.exec(
                "DELETE FROM bus_dedup WHERE expires_at_ms <= ?",
                vec![now.into()],
            )
            .await?;
            self.exec(
                "DELETE FROM bus_messages WHERE seq IN (SELECT m.seq FROM bus_messages m \
                 JOIN bus_streams s ON s.name = m.stream \
                 WHERE s.max_age_ms IS NOT NULL AND m.published_at_ms < ? - s.max_age_ms)",
                vec![now.into()],
            )
            .await
        };
        if let Err(err) = sweep.await {
            tracing::warn!(message = "Embedded bus janitor failed.", error = %err);
        }
    }
}

fn seq_u64(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn kind(&self) -> &'static str {
        BUS
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        validate_name("stream", &spec.name)?;
        if spec.subjects.is_empty() {
            return Err(BusError::Invalid(format!(
                "stream `{}` has no subjects",
                spec.name
            )));
        }
        for s in &spec.subjects {
            validate_pattern(s)?;
        }
        let window = if spec.duplicate_window.is_zero() {
            self.inner.default_duplicate_window
        } else {
            spec.duplicate_window
        };
        let subjects =
            serde_json::to_string(&spec.subjects).map_err(|e| BusError::Invalid(e.to_string()))?;
        self.inner
            .exec(
                "INSERT INTO bus_streams (name, subjects, duplicate_window_ms, max_age_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET subjects = excluded.subjects, \
                 duplicate_window_ms = excluded.duplicate_window_ms, max_age_ms = excluded.max_age_ms",
                vec![
                    spec.name.clone().into(),
                    subjects.into(),
                    millis(window).into(),
                    spec.max_age.filter(|d| !d.is_zero()).map(millis).into(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        self.inner
            .publish(subject, message_id, headers, payload)
            .await
    }

    async fn consumer(&self, spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BusError> {
        validate_name("durable", &spec.durable)?;
        if let Some(filter) = &spec.filter_subject {
            validate_pattern(filter)?;
        }
        validate_subject(&spec.dead_letter_subject())?;
        let exists = self
            .inner
            .db
            .query_one(stmt(
                self.inner.backend(),
                "SELECT name FROM bus_streams WHERE name = ?",
                vec![spec.stream.clone().into()],
            ))
            .await
            .map_err(storage)?;
        if exists.is_none() {
            return Err(BusError::Invalid(format!(
                "unknown stream `{}`",
                spec.stream
            )));
        }
        let ack_wait = if spec.ack_wait.is_zero() {
            DEFAULT_ACK_WAIT
        } else {
            spec.ack_wait
        };
        let spec_json = serde_json::json!({
            "filter_subject": spec.filter_subject,
            "ack_wait_ms": millis(ack_wait),
            "max_deliver": spec.max_deliver,
            "dead_letter_subject": spec.dead_letter_subject(),
        })
        .to_string();
        // A new durable starts at the beginning of the stream (JetStream's `DeliverPolicy::All`);
        // an existing one keeps its cursor.
        self.inner
            .exec(
                "INSERT INTO bus_consumers (stream, durable, cursor_seq, spec) VALUES (?, ?, 0, ?) \
                 ON CONFLICT (stream, durable) DO UPDATE SET spec = excluded.spec",
                vec![
                    spec.stream.clone().into(),
                    spec.durable.clone().into(),
                    spec_json.into(),
                ],
            )
            .await?;
        Ok(Box::new(EmbeddedConsumer {
            inner: self.inner.clone(),
            spec: spec.clone(),
            ack_wait,
        }))
    }

    async fn broadcast(
        &self,
        subject: &str,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        validate_subject(subject)?;
        crate::telemetry::inject_context(&mut headers);
        // No subscriber is not an error: fan-out is at most once.
        let _ = self.inner.fanout.send(Message {
            subject: subject.to_owned(),
            headers,
            payload,
        });
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError> {
        validate_pattern(subject)?;
        let rx = self.inner.fanout.subscribe();
        let pattern = subject.to_owned();
        Ok(
            futures::stream::unfold((rx, pattern), |(mut rx, pattern)| async move {
                loop {
                    match rx.recv().await {
                        Ok(m) if subject_matches(&pattern, &m.subject) => {
                            return Some((m, (rx, pattern)));
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(
                                message = "Slow ephemeral subscriber lost messages.",
                                lost = n
                            );
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .boxed(),
        )
    }

    async fn health(&self) -> Result<(), BusError> {
        crate::db::ping(&self.inner.db).await.map_err(storage)
    }
}

struct EmbeddedConsumer {
    inner: Arc<Inner>,
    spec: ConsumerSpec,
    ack_wait: Duration,
}

struct Stored {
    seq: i64,
    subject: String,
    msg_id: Option<String>,
    headers: Headers,
    payload: Bytes,
}

fn stored(row: &QueryResult) -> Result<Stored, BusError> {
    let headers: String = get(row, "headers")?;
    let payload: Vec<u8> = get(row, "payload")?;
    Ok(Stored {
        seq: get(row, "seq")?,
        subject: get(row, "subject")?,
        msg_id: get(row, "msg_id")?,
        headers: serde_json::from_str(&headers).map_err(|e| {
            BusError::Storage(format!("bus_messages.headers is not a JSON map: {e}"))
        })?,
        payload: Bytes::from(payload),
    })
}

impl EmbeddedConsumer {
    fn delivery(&self, m: Stored, delivered: i32) -> Delivery {
        metrics::counter!("bulwark_bus_deliveries_total", "bus" => BUS).increment(1);
        if delivered > 1 {
            metrics::counter!("bulwark_bus_redeliveries_total", "bus" => BUS).increment(1);
        }
        let acker = EmbeddedAcker {
            inner: self.inner.clone(),
            stream: self.spec.stream.clone(),
            durable: self.spec.durable.clone(),
            seq: m.seq,
            delivered,
            ack_wait: self.ack_wait,
        };
        Delivery::new(
            m.subject,
            m.headers,
            m.payload,
            m.msg_id,
            seq_u64(m.seq),
            u32::try_from(delivered).unwrap_or(0),
            Box::new(acker),
        )
    }

    /// Claims what is available now: due redeliveries first, then new messages.
    async fn claim(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::new();
        self.claim_due(max, &mut out).await?;
        if out.len() < max {
            self.claim_new(max - out.len(), &mut out).await?;
        }
        Ok(out)
    }

    async fn claim_due(&self, max: usize, out: &mut Vec<Delivery>) -> Result<(), BusError> {
        let inner = &self.inner;
        let (stream, durable) = (&self.spec.stream, &self.spec.durable);
        let now = now_ms();
        let due = inner
            .db
            .query_all(stmt(
                inner.backend(),
                "SELECT seq, delivered FROM bus_deliveries WHERE stream = ? AND durable = ? AND visible_at_ms <= ? \
                 ORDER BY seq LIMIT ?",
                vec![stream.clone().into(), durable.clone().into(), now.into(), i64::try_from(max).unwrap_or(i64::MAX).into()],
            ))
            .await
            .map_err(storage)?;
        let max_deliver = i32::try_from(self.spec.max_deliver).unwrap_or(i32::MAX);
        for row in &due {
            if out.len() >= max {
                break;
            }
            let seq: i64 = get(row, "seq")?;
            let delivered: i32 = get(row, "delivered")?;
            let dead = max_deliver > 0 && delivered >= max_deliver;
            let next = if dead {
                delivered
            } else {
                delivered.saturating_add(1)
            };
            // Both conditions make the claim atomic: only one claimer sees the old values.
            let won = inner
                .exec(
                    "UPDATE bus_deliveries SET delivered = ?, visible_at_ms = ? \
                     WHERE stream = ? AND durable = ? AND seq = ? AND delivered = ? AND visible_at_ms <= ?",
                    vec![
                        next.into(),
                        now.saturating_add(millis(self.ack_wait)).into(),
                        stream.clone().into(),
                        durable.clone().into(),
                        seq.into(),
                        delivered.into(),
                        now.into(),
                    ],
                )
                .await?;
            if won != 1 {
                continue;
            }
            let msg = inner
                .db
                .query_one(stmt(
                    inner.backend(),
                    "SELECT seq, subject, msg_id, headers, payload FROM bus_messages WHERE seq = ?",
                    vec![seq.into()],
                ))
                .await
                .map_err(storage)?;
            let Some(msg) = msg else {
                // Aged out of the stream: nothing left to deliver.
                self.forget(seq).await?;
                continue;
            };
            let msg = stored(&msg)?;
            if dead {
                self.dead_letter(msg, delivered).await?;
            } else {
                out.push(self.delivery(msg, next));
            }
        }
        Ok(())
    }

    /// Publishes to the dead-letter subject, then stops redelivery. If the publish fails the
    /// claim simply lapses after `ack_wait` and the move is retried: nothing is lost.
    async fn dead_letter(&self, msg: Stored, delivered: i32) -> Result<(), BusError> {
        let dlq = self.spec.dead_letter_subject();
        let mut headers = msg.headers;
        headers.insert(
            "Bulwark-Dead-Letter-Stream".into(),
            self.spec.stream.clone(),
        );
        headers.insert(
            "Bulwark-Dead-Letter-Durable".into(),
            self.spec.durable.clone(),
        );
        headers.insert("Bulwark-Dead-Letter-Subject".into(), msg.subject.clone());
        headers.insert("Bulwark-Dead-Letter-Sequence".into(), msg.seq.to_string());
        headers.insert(
            "Bulwark-Dead-Letter-Delivered".into(),
            delivered.to_string(),
        );
        // A stable id makes a retried move a duplicate instead of a second copy.
        let id = format!("dlq-{}-{}-{}", self.spec.stream, self.spec.durable, msg.seq);
        match self
            .inner
            .publish(&dlq, Some(&id), headers, msg.payload)
            .await
        {
            Ok(_) => {
                metrics::counter!("bulwark_bus_dead_letters_total", "bus" => BUS).increment(1);
                self.forget(msg.seq).await
            }
            Err(err) => {
                tracing::error!(
                    message = "Cannot move a message to its dead-letter subject; will retry.",
                    stream = %self.spec.stream, durable = %self.spec.durable, sequence = msg.seq, error = %err,
                );
                Ok(())
            }
        }
    }

    async fn forget(&self, seq: i64) -> Result<(), BusError> {
        self.inner
            .exec(
                "DELETE FROM bus_deliveries WHERE stream = ? AND durable = ? AND seq = ?",
                vec![
                    self.spec.stream.clone().into(),
                    self.spec.durable.clone().into(),
                    seq.into(),
                ],
            )
            .await
            .map(|_| ())
    }

    async fn claim_new(&self, want: usize, out: &mut Vec<Delivery>) -> Result<(), BusError> {
        let inner = &self.inner;
        let backend = inner.backend();
        let (stream, durable) = (&self.spec.stream, &self.spec.durable);
        // Rows read per attempt: exactly what is wanted without a filter, more with one.
        let scan = if self.spec.filter_subject.is_some() {
            want.max(256)
        } else {
            want
        };
        let scan_i64 = i64::try_from(scan).unwrap_or(i64::MAX);
        let mut contended = 0;
        loop {
            let cursor = cursor_seq(inner, stream, durable).await?;
            let rows = inner
                .db
                .query_all(stmt(
                    backend,
                    "SELECT seq, subject, msg_id, headers, payload FROM bus_messages \
                     WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                    vec![stream.clone().into(), cursor.into(), scan_i64.into()],
                ))
                .await
                .map_err(storage)?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut next_cursor = cursor;
            let mut picked = Vec::new();
            for row in &rows {
                let m = stored(row)?;
                next_cursor = m.seq;
                if self
                    .spec
                    .filter_subject
                    .as_deref()
                    .is_none_or(|f| subject_matches(f, &m.subject))
                {
                    picked.push(m);
                    if picked.len() == want {
                        break;
                    }
                }
            }
            let visible_at = now_ms().saturating_add(millis(self.ack_wait));
            let txn = inner.db.begin().await.map_err(storage)?;
            // Compare-and-set on the cursor: whoever moves it owns the messages passed over.
            let won = txn
                .execute(stmt(
                    backend,
                    "UPDATE bus_consumers SET cursor_seq = ? WHERE stream = ? AND durable = ? AND cursor_seq = ?",
                    vec![next_cursor.into(), stream.clone().into(), durable.clone().into(), cursor.into()],
                ))
                .await
                .map_err(storage)?
                .rows_affected();
            if won != 1 {
                txn.rollback().await.map_err(storage)?;
                contended += 1;
                if contended > 16 {
                    return Ok(()); // Others are draining it; try again next poll.
                }
                continue;
            }
            for m in &picked {
                txn.execute(stmt(
                    backend,
                    "INSERT INTO bus_deliveries (stream, durable, seq, delivered, visible_at_ms) VALUES (?, ?, ?, 1, ?) \
                     ON CONFLICT (stream, durable, seq) DO NOTHING",
                    vec![stream.clone().into(), durable.clone().into(), m.seq.into(), visible_at.into()],
                ))
                .await
                .map_err(storage)?;
            }
            txn.commit().await.map_err(storage)?;
            let got = picked.len();
            out.extend(picked.into_iter().map(|m| self.delivery(m, 1)));
            // Keep scanning only when a full page held nothing for this filter.
            if got > 0 || rows.len() < scan {
                return Ok(());
            }
        }
    }
}

/// The last stream sequence a durable consumer has claimed.
async fn cursor_seq(inner: &Inner, stream: &str, durable: &str) -> Result<i64, BusError> {
    let row = inner
        .db
        .query_one(stmt(
            inner.backend(),
            "SELECT cursor_seq FROM bus_consumers WHERE stream = ? AND durable = ?",
            vec![stream.into(), durable.into()],
        ))
        .await
        .map_err(storage)?
        .ok_or_else(|| {
            BusError::Invalid(format!("consumer `{stream}/{durable}` no longer exists"))
        })?;
    get(&row, "cursor_seq")
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn pending(&self) -> Result<u64, BusError> {
        let inner = &self.inner;
        let backend = inner.backend();
        let (stream, durable) = (self.spec.stream.clone(), self.spec.durable.clone());
        let cursor = cursor_seq(inner, &stream, &durable).await?;
        // Subjects only: the filter is matched here, as in `claim_new`.
        let rows = inner
            .db
            .query_all(stmt(
                backend,
                "SELECT subject FROM bus_messages WHERE stream = ? AND seq > ?",
                vec![stream.clone().into(), cursor.into()],
            ))
            .await
            .map_err(storage)?;
        let mut waiting = 0u64;
        for r in &rows {
            let subject: String = get(r, "subject")?;
            if self
                .spec
                .filter_subject
                .as_deref()
                .is_none_or(|f| subject_matches(f, &subject))
            {
                waiting += 1;
            }
        }
        let unacked = inner
            .db
            .query_one(stmt(
                backend,
                "SELECT COUNT(*) AS n FROM bus_deliveries WHERE stream = ? AND durable = ?",
                vec![stream.into(), durable.into()],
            ))
            .await
            .map_err(storage)?
            .map(|r| get::<i64>(&r, "n"))
            .transpose()?
            .unwrap_or(0);
        Ok(waiting + u64::try_from(unacked).unwrap_or(0))
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a publish in between still wakes us.
            let published = self.inner.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let got = self.claim(max).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(got);
            }
            let nap = self.inner.poll_interval.min(deadline - now);
            tokio::select! {
                () = &mut published => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }
}

struct EmbeddedAcker {
    inner: Arc<Inner>,
    stream: String,
    durable: String,
    seq: i64,
    delivered: i32,
    ack_wait: Duration,
}

impl EmbeddedAcker {
    fn key(&self) -> Vec<Value> {
        vec![
            self.stream.clone().into(),
            self.durable.clone().into(),
            self.seq.into(),
        ]
    }

    /// Moves the redelivery deadline, only while this delivery is still the current one.
    async fn reschedule(&self, after: Duration) -> Result<(), BusError> {
        let mut values = vec![now_ms().saturating_add(millis(after)).into()];
        values.extend(self.key());
        values.push(self.delivered.into());
        self.inner
            .exec(
                "UPDATE bus_deliveries SET visible_at_ms = ? WHERE stream = ? AND durable = ? AND seq = ? AND delivered = ?",
                values,
            )
            .await?;
        Ok(())
    }

    async fn remove(&self) -> Result<(), BusError> {
        // Unconditional: a late ack of a delivery that already lapsed still means "done".
        self.inner
            .exec(
                "DELETE FROM bus_deliveries WHERE stream = ? AND durable = ? AND seq = ?",
                self.key(),
            )
            .await?;
        Ok(())
    }
}

fn count_ack(kind: &'static str) {
    metrics::counter!("bulwark_bus_acks_total", "bus" => BUS, "kind" => kind).increment(1);
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<(), BusError> {
        count_ack("ack");
        self.remove().await
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        count_ack("nak");
        self.reschedule(delay).await?;
        if delay.is_zero() {
            self.inner.published.notify_waiters();
        }
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), BusError> {
        count_ack("progress");
        self.reschedule(self.ack_wait).await
    }
    async fn term(&self) -> Result<(), BusError> {
        count_ack("term");
        self.remove().await
    }
}
