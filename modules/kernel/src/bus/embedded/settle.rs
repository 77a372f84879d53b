//! Settling deliveries: ack and term delete the delivery row, nak and in-progress move its
//! redelivery deadline.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::Value;

use super::Store;
use super::sql::{millis, now_ms};
use crate::bus::{Acker, BusError};

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

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.remove().await
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.reschedule(delay).await?;
        if delay.is_zero() {
            self.store.published.notify_waiters();
        }
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), BusError> {
        self.reschedule(self.ack_wait).await
    }
    async fn term(&self) -> Result<(), BusError> {
        self.remove().await
    }
}
