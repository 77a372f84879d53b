//! What every backend shares, written once around it: the bus metrics, the dead-letter move
//! after `max_deliver`, and the list of consumers handed out that feeds the lag gauge
//! ([`super::lag`]). [`super::from_config`] wraps each backend in [`Metered`], so the backends
//! record no metrics and never dead-letter themselves.
//!
//! The dead-letter move lives here rather than in the backends because it is a publish that
//! `bulwark_bus_published_total` must count, like any other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use super::lag::{ConsumerLag, Held, HeldConsumers};
use super::{
    Acker, Bus, BusError, Consumer, ConsumerSpec, Delivery, Headers, Message, PublishAck,
    StreamSpec,
};

/// A backend with the kernel's metrics and dead-lettering around it.
pub struct Metered {
    inner: Arc<dyn Bus>,
    held: HeldConsumers,
}

impl Metered {
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        Self {
            inner,
            held: HeldConsumers::default(),
        }
    }
}

/// Publishes through the backend, recording how long the store took to acknowledge and how
/// the publish ended.
async fn publish_metered(
    bus: &dyn Bus,
    subject: &str,
    message_id: Option<&str>,
    headers: Headers,
    payload: Bytes,
) -> Result<PublishAck, BusError> {
    let started = Instant::now();
    let result = bus.publish(subject, message_id, headers, payload).await;
    let kind = bus.kind();
    metrics::histogram!("bulwark_bus_publish_duration_seconds", "bus" => kind)
        .record(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(ack) if ack.duplicate => "duplicate",
        Ok(_) => "stored",
        Err(_) => "error",
    };
    metrics::counter!("bulwark_bus_published_total", "bus" => kind, "outcome" => outcome)
        .increment(1);
    result
}

#[async_trait]
impl Bus for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        self.inner.ensure_stream(spec).await
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError> {
        publish_metered(&*self.inner, subject, message_id, headers, payload).await
    }

    async fn consumer(&self, spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BusError> {
        let consumer = self.inner.consumer(spec).await?;
        Ok(Box::new(MeteredConsumer {
            bus: self.inner.clone(),
            held: self.held.hold(spec, consumer),
        }))
    }

    async fn broadcast(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.inner.broadcast(subject, headers, payload).await
    }

    async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError> {
        self.inner.subscribe(subject).await
    }

    async fn health(&self) -> Result<(), BusError> {
        self.inner.health().await
    }

    async fn consumer_lag(&self) -> Vec<ConsumerLag> {
        self.held.lag().await
    }
}

struct MeteredConsumer {
    /// The backend, for dead-letter publishes.
    bus: Arc<dyn Bus>,
    held: Arc<Held>,
}

impl MeteredConsumer {
    fn past_max_deliver(&self, d: &Delivery) -> bool {
        let max = self.held.spec.max_deliver;
        max > 0 && d.delivered > max
    }

    /// Publishes the message to the consumer's dead-letter subject, then terminates the
    /// delivery. If the publish fails the delivery is left unsettled: it comes back after
    /// `ack_wait` and the move is tried again.
    async fn dead_letter(&self, d: Delivery) {
        let Delivery {
            subject,
            mut headers,
            payload,
            sequence,
            delivered,
            acker,
            ..
        } = d;
        let spec = &self.held.spec;
        for (name, value) in [
            ("Bulwark-Dead-Letter-Stream", spec.stream.clone()),
            ("Bulwark-Dead-Letter-Durable", spec.durable.clone()),
            ("Bulwark-Dead-Letter-Subject", subject),
            ("Bulwark-Dead-Letter-Sequence", sequence.to_string()),
            // Deliveries a handler saw; this one was never handed out.
            ("Bulwark-Dead-Letter-Delivered", (delivered - 1).to_string()),
        ] {
            headers.insert(name.into(), value);
        }
        // A stable id makes a retried move a duplicate instead of a second copy.
        let id = format!("dlq-{}-{}-{sequence}", spec.stream, spec.durable);
        let dlq = spec.dead_letter_subject();
        match publish_metered(&*self.bus, &dlq, Some(&id), headers, payload).await {
            Ok(_) => {
                metrics::counter!("bulwark_bus_dead_letters_total", "bus" => self.bus.kind())
                    .increment(1);
                // The raw acker: this term is part of the move, not a handler's answer.
                if let Err(e) = acker.term().await {
                    tracing::warn!(message = "Dead-lettered message not terminated; it will be moved again.", error = %e);
                }
            }
            Err(err) => tracing::error!(
                message = "Cannot move a message to its dead-letter subject; will retry.",
                stream = %spec.stream, durable = %spec.durable, sequence, error = %err,
            ),
        }
    }

    /// Counts a delivery handed to the caller and meters how it is settled.
    fn hand_out(&self, d: Delivery) -> Delivery {
        let kind = self.bus.kind();
        metrics::counter!("bulwark_bus_deliveries_total", "bus" => kind).increment(1);
        if d.delivered > 1 {
            metrics::counter!("bulwark_bus_redeliveries_total", "bus" => kind).increment(1);
        }
        Delivery {
            acker: Box::new(MeteredAcker {
                inner: d.acker,
                kind,
            }),
            ..d
        }
    }
}

#[async_trait]
impl Consumer for MeteredConsumer {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let batch = self.held.consumer.fetch(max, left).await?;
            let fetched = batch.len();
            let mut out = Vec::with_capacity(fetched);
            for d in batch {
                if self.past_max_deliver(&d) {
                    self.dead_letter(d).await;
                } else {
                    out.push(self.hand_out(d));
                }
            }
            // Only dead letters arrived: look again while time is left.
            if !out.is_empty() || fetched == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    async fn pending(&self) -> Result<u64, BusError> {
        self.held.consumer.pending().await
    }

    async fn unacked(&self) -> Result<u64, BusError> {
        self.held.consumer.unacked().await
    }
}

struct MeteredAcker {
    inner: Box<dyn Acker>,
    kind: &'static str,
}

impl MeteredAcker {
    fn count(&self, how: &'static str) {
        metrics::counter!("bulwark_bus_acks_total", "bus" => self.kind, "kind" => how).increment(1);
    }
}

#[async_trait]
impl Acker for MeteredAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.count("ack");
        self.inner.ack().await
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.count("nak");
        self.inner.nak(delay).await
    }
    async fn in_progress(&self) -> Result<(), BusError> {
        self.count("progress");
        self.inner.in_progress().await
    }
    async fn term(&self) -> Result<(), BusError> {
        self.count("term");
        self.inner.term().await
    }
}
