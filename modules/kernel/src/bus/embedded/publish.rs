//! Storing a message: the capturing stream, duplicate ids, and the janitor that expires both.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use sea_orm::{ConnectionTrait, TransactionTrait};

use super::Store;
use super::sql::{get, now_ms, seq_u64, stmt, storage};
use crate::bus::{BusError, Headers, PublishAck, subject_matches, validate_subject};

/// How often (at most) publish sweeps expired duplicate ids and messages past `max_age`.
const JANITOR_EVERY_MS: i64 = 5_000;

struct StreamRow {
    name: String,
    subjects: Vec<String>,
    duplicate_window_ms: i64,
}

impl Store {
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

    pub(super) async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        let result = self
            .store_message(subject, message_id, &mut headers, payload)
            .await;
        if matches!(&result, Ok(ack) if !ack.duplicate) {
            self.published.notify_waiters();
        }
        result
    }

    async fn store_message(
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
