//! The durable bus (K4): one trait, two implementations.
//!
//! * [`nats::NatsBus`] — NATS JetStream (production).
//! * [`embedded::EmbeddedBus`] — a table in the application database with the same
//!   semantics (the embedded default; survives restarts).
//!
//! [`from_config`] wraps either in [`Metered`], which adds what both share: the bus metrics, the
//! dead-letter move after `max_deliver`, and the list of held consumers whose lag
//! [`report_consumer_lag`] publishes. A bare backend does none of these.
//!
//! Semantics every implementation must honour (checked by the conformance suite in
//! `tests/tests/bus_conformance.rs`):
//! * `publish` with a message id drops a second publish of the same id inside the stream's
//!   duplicate window and reports it as `duplicate`;
//! * durable consumers deliver at least once: an unacked delivery is redelivered after
//!   `ack_wait`; `nak(delay)` redelivers after `delay`; `in_progress` pushes the deadline out;
//!   `term` stops redelivery; acked messages are never redelivered;
//! * messages on one subject are delivered in publish order;
//! * a message that was delivered `max_deliver` times without an ack is moved to the
//!   consumer's dead-letter subject instead of being delivered again;
//! * ephemeral fan-out (`broadcast`/`subscribe`) is at-most-once and not persisted.

pub mod embedded;
mod lag;
mod metered;
pub mod nats;

pub use lag::{CONSUMER_LAG_EVERY, ConsumerLag, report_consumer_lag};
pub use metered::Metered;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// Message headers. W3C `traceparent` is carried here (see [`crate::telemetry`]).
pub type Headers = BTreeMap<String, String>;

/// Errors from the bus. Each names what failed so readiness and logs can say why.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus request timed out: {0}")]
    Timeout(String),
    #[error("invalid bus argument: {0}")]
    Invalid(String),
    #[error("bus storage error: {0}")]
    Storage(String),
    #[error("bus error: {0}")]
    Other(String),
}

/// A durable stream: a set of subjects whose messages are stored.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name, e.g. `ORDERS`.
    pub name: String,
    /// Subjects captured by the stream; `*` matches one token, `>` the rest (NATS syntax).
    pub subjects: Vec<String>,
    /// Window within which a repeated message id is dropped as a duplicate.
    pub duplicate_window: Duration,
    /// Messages older than this are discarded (`None`: kept until removed by limits).
    pub max_age: Option<Duration>,
}

/// A durable pull consumer on a stream.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    /// Durable name: a restarted process with the same name resumes where the last one stopped.
    pub durable: String,
    /// Only subjects matching this filter are delivered (`None`: the whole stream).
    pub filter_subject: Option<String>,
    /// An unacked delivery is redelivered after this long.
    pub ack_wait: Duration,
    /// After this many deliveries without an ack the message goes to `dead_letter_subject`.
    pub max_deliver: u32,
    /// Where messages go after `max_deliver` deliveries. Default: `dlq.<stream>.<durable>`.
    pub dead_letter_subject: Option<String>,
}

impl StreamSpec {
    /// What every backend refuses before declaring the stream.
    pub(crate) fn validate(&self) -> Result<(), BusError> {
        validate_name("stream", &self.name)?;
        if self.subjects.is_empty() {
            return Err(BusError::Invalid(format!(
                "stream `{}` has no subjects",
                self.name
            )));
        }
        self.subjects.iter().try_for_each(|s| validate_pattern(s))
    }
}

/// JetStream's default when a consumer gives no ack wait.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

impl ConsumerSpec {
    pub fn dead_letter_subject(&self) -> String {
        self.dead_letter_subject
            .clone()
            .unwrap_or_else(|| format!("dlq.{}.{}", self.stream, self.durable))
    }

    /// `ack_wait`, with zero meaning JetStream's default of 30 s.
    pub(crate) fn ack_wait_or_default(&self) -> Duration {
        if self.ack_wait.is_zero() {
            DEFAULT_ACK_WAIT
        } else {
            self.ack_wait
        }
    }

    /// What every backend refuses before binding the consumer.
    pub(crate) fn validate(&self) -> Result<(), BusError> {
        validate_name("durable", &self.durable)?;
        if let Some(filter) = &self.filter_subject {
            validate_pattern(filter)?;
        }
        validate_subject(&self.dead_letter_subject())
    }
}

/// The outcome of a durable publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    pub stream: String,
    /// Sequence of the stored message (of the original when `duplicate`).
    pub sequence: u64,
    /// The message id was seen inside the duplicate window; nothing new was stored.
    pub duplicate: bool,
}

/// An ephemeral (fan-out) message.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// What a consumer does with a delivery; implemented per backend.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BusError>;
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    async fn in_progress(&self) -> Result<(), BusError>;
    async fn term(&self) -> Result<(), BusError>;
}

/// One delivery of a stored message to a durable consumer.
pub struct Delivery {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    /// The publisher's message id, if any.
    pub message_id: Option<String>,
    /// Stream sequence of the message.
    pub sequence: u64,
    /// How many times this message has been delivered, this delivery included (1 = first).
    pub delivered: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("sequence", &self.sequence)
            .field("delivered", &self.delivered)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(
        subject: String,
        headers: Headers,
        payload: Bytes,
        message_id: Option<String>,
        sequence: u64,
        delivered: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            subject,
            headers,
            payload,
            message_id,
            sequence,
            delivered,
            acker,
        }
    }
    /// Processing succeeded: never deliver again.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }
    /// Processing failed: deliver again after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.acker.nak(delay).await
    }
    /// Still working: push the redelivery deadline out by another `ack_wait`.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.acker.in_progress().await
    }
    /// Never deliver again, without success (e.g. a message that can never be processed).
    pub async fn term(self) -> Result<(), BusError> {
        self.acker.term().await
    }
}

/// A durable pull consumer.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max` deliveries, waiting at most `wait` for the first one.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;
    /// Messages this consumer has not finished: not yet delivered plus delivered and not
    /// acked (its lag, for `bulwark_bus_consumer_pending`).
    async fn pending(&self) -> Result<u64, BusError>;
    /// Deliveries handed out (to this or an earlier binding of the durable) and neither acked
    /// nor terminated yet. A consumer that must keep order across a change of owner looks at
    /// it before its first fetch: a previous owner's unsettled deliveries come back first, but
    /// only once `ack_wait` ran out (or it handed them back with `nak`).
    async fn unacked(&self) -> Result<u64, BusError>;
}

/// The bus every module uses.
#[async_trait]
pub trait Bus: Send + Sync {
    /// Short name for logs, metrics and readiness: `nats` or `embedded`.
    fn kind(&self) -> &'static str;
    /// Declare a stream; idempotent (an existing stream is updated to the spec).
    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError>;
    /// Store a message durably. Returns only after the store acknowledged it.
    async fn publish(
        &self,
        subject: &str,
        message_id: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PublishAck, BusError>;
    /// Create (idempotently) and bind a durable consumer.
    async fn consumer(&self, spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BusError>;
    /// Ephemeral fan-out to every current subscriber of `subject` (at most once).
    async fn broadcast(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError>;
    /// Subscribe to ephemeral messages; `subject` may contain wildcards.
    async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError>;
    /// Is the bus reachable right now?
    async fn health(&self) -> Result<(), BusError>;
    /// The lag of every durable consumer this bus handed out that is still held, one per
    /// stream and durable name. Only [`Metered`] keeps that list; a bare backend has none.
    async fn consumer_lag(&self) -> Vec<ConsumerLag> {
        Vec::new()
    }
}

/// NATS-style subject matching: `*` matches one token, `>` one or more trailing tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Validate a subject a caller wants to publish to (no wildcards, no empty tokens).
pub fn validate_subject(subject: &str) -> Result<(), BusError> {
    if subject.is_empty()
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">" || t.contains(char::is_whitespace))
    {
        return Err(BusError::Invalid(format!("invalid subject `{subject}`")));
    }
    Ok(())
}

/// Validate a subscription or stream subject pattern: like [`validate_subject`], but `*` may
/// stand for a token and `>` for the last one.
pub(crate) fn validate_pattern(pattern: &str) -> Result<(), BusError> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    let bad = pattern.is_empty()
        || tokens.iter().enumerate().any(|(i, t)| {
            t.is_empty()
                || t.contains(char::is_whitespace)
                || (*t == ">" && i + 1 != tokens.len())
                || (t.len() > 1 && (t.contains('*') || t.contains('>')))
        });
    if bad {
        return Err(BusError::Invalid(format!(
            "invalid subject pattern `{pattern}`"
        )));
    }
    Ok(())
}

/// Validate a stream or durable name (one token: no dots, wildcards or whitespace).
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), BusError> {
    if name.is_empty()
        || name.contains(['.', '*', '>', '/', '\\'])
        || name.contains(char::is_whitespace)
    {
        return Err(BusError::Invalid(format!("invalid {what} name `{name}`")));
    }
    Ok(())
}

/// The bus the configuration asks for, metered: NATS JetStream when `bus.url` is set, else
/// the embedded bus in `db`.
pub async fn from_config(
    cfg: &crate::config::BusConfig,
    db: sea_orm::DatabaseConnection,
) -> Result<Arc<dyn Bus>, BusError> {
    let backend: Arc<dyn Bus> = match &cfg.url {
        Some(_) => Arc::new(nats::NatsBus::connect(cfg).await?),
        None => Arc::new(embedded::EmbeddedBus::new(db, cfg)),
    };
    Ok(Arc::new(Metered::new(backend)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn subjects_are_validated() {
        assert!(validate_subject("orders.new.1").is_ok());
        assert!(validate_subject("orders..1").is_err());
        assert!(validate_subject("orders.*").is_err());
        assert!(validate_subject("").is_err());
    }
}
