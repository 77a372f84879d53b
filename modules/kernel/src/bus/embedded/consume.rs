//! Claiming deliveries for a durable consumer: due redeliveries first, then new messages
//! past its cursor; and its lag.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sea_orm::{ConnectionTrait, QueryResult, TransactionTrait};

use super::Store;
use super::settle::EmbeddedAcker;
use super::sql::{get, millis, now_ms, seq_u64, stmt, storage};
use crate::bus::{BusError, Consumer, ConsumerSpec, Delivery, Headers, subject_matches};

pub(super) struct EmbeddedConsumer {
    pub(super) store: Arc<Store>,
    pub(super) spec: ConsumerSpec,
    pub(super) ack_wait: Duration,
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
        let acker = EmbeddedAcker {
            store: self.store.clone(),
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
        let store = &self.store;
        let (stream, durable) = (&self.spec.stream, &self.spec.durable);
        let now = now_ms();
        let due = store
            .db
            .query_all(stmt(
                store.backend(),
                "SELECT seq, delivered FROM bus_deliveries WHERE stream = ? AND durable = ? AND visible_at_ms <= ? \
                 ORDER BY seq LIMIT ?",
                vec![stream.clone().into(), durable.clone().into(), now.into(), i64::try_from(max).unwrap_or(i64::MAX).into()],
            ))
            .await
            .map_err(storage)?;
        for row in &due {
            if out.len() >= max {
                break;
            }
            let seq: i64 = get(row, "seq")?;
            let delivered: i32 = get(row, "delivered")?;
            // Past `max_deliver` too: the bus wrapper (`bus::Metered`) dead-letters those.
            let next = delivered.saturating_add(1);
            // Both conditions make the claim atomic: only one claimer sees the old values.
            let won = store
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
            let msg = store
                .db
                .query_one(stmt(
                    store.backend(),
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
            out.push(self.delivery(stored(&msg)?, next));
        }
        Ok(())
    }

    /// Drops the delivery row of a message that is gone from the stream.
    async fn forget(&self, seq: i64) -> Result<(), BusError> {
        self.store
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
        let store = &self.store;
        let backend = store.backend();
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
            let cursor = cursor_seq(store, stream, durable).await?;
            let rows = store
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
            let txn = store.db.begin().await.map_err(storage)?;
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
async fn cursor_seq(store: &Store, stream: &str, durable: &str) -> Result<i64, BusError> {
    let row = store
        .db
        .query_one(stmt(
            store.backend(),
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
        let store = &self.store;
        let backend = store.backend();
        let (stream, durable) = (self.spec.stream.clone(), self.spec.durable.clone());
        let cursor = cursor_seq(store, &stream, &durable).await?;
        // Subjects only: the filter is matched here, as in `claim_new`.
        let rows = store
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
        let unacked = store
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

    async fn unacked(&self) -> Result<u64, BusError> {
        let store = &self.store;
        let n = store
            .db
            .query_one(stmt(
                store.backend(),
                "SELECT COUNT(*) AS n FROM bus_deliveries WHERE stream = ? AND durable = ?",
                vec![
                    self.spec.stream.clone().into(),
                    self.spec.durable.clone().into(),
                ],
            ))
            .await
            .map_err(storage)?
            .map(|r| get::<i64>(&r, "n"))
            .transpose()?
            .unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a publish in between still wakes us.
            let published = self.store.published.notified();
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
            let nap = self.store.poll_interval.min(deadline - now);
            tokio::select! {
                () = &mut published => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }
}
