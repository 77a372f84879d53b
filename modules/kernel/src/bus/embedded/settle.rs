//! Settling deliveries: ack and term delete the delivery row, nak and in-progress move its
//! redelivery deadline; and the dead-letter move that replaces a delivery past `max_deliver`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::Value;

use super::consume::{EmbeddedConsumer, Stored};
use super::sql::{millis, now_ms};
use super::{BUS, Store};
use crate::bus::{Acker, BusError};

impl EmbeddedConsumer {
    /// Publishes to the dead-letter subject, then stops redelivery. If the publish fails the
    /// claim simply lapses after `ack_wait` and the move is retried: nothing is lost.
    pub(super) async fn dead_letter(&self, msg: Stored, delivered: i32) -> Result<(), BusError> {
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
            .store
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

    pub(super) async fn forget(&self, seq: i64) -> Result<(), BusError> {
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
}

pub(super) struct EmbeddedAcker {
    pub(super) store: Arc<Store>,
    pub(super) stream: String,
    pub(super) durable: String,
    pub(super) seq: i64,
    pub(super) delivered: i32,
    pub(super) ack_wait: Duration,
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
        self.store
            .exec(
                "UPDATE bus_deliveries SET visible_at_ms = ? WHERE stream = ? AND durable = ? AND seq = ? AND delivered = ?",
                values,
            )
            .await?;
        Ok(())
    }

    async fn remove(&self) -> Result<(), BusError> {
        // Unconditional: a late ack of a delivery that already lapsed still means "done".
        self.store
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
            self.store.published.notify_waiters();
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
