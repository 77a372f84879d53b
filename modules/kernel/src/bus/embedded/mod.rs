//! The embedded bus (K4): JetStream semantics on the application database.
//!
//! Tables come from the kernel migration `m20261126_000001_bus`. Every claim is a conditional
//! write checked by `rows_affected`, so several processes sharing one PostgreSQL database never
//! hand the same delivery out twice. Transactions always start with a write so SQLite takes its
//! write lock up front (a read-then-write upgrade fails with `SQLITE_BUSY` regardless of the
//! busy timeout).
//!
//! * [`publish`]: storing a message, duplicate ids, the janitor;
//! * [`consume`]: claiming deliveries (due redeliveries, then new messages) and lag;
//! * [`settle`]: what a delivery's ack, nak, in-progress and term do to its row;
//! * [`fanout`]: ephemeral broadcast inside this process;
//! * [`sql`]: statements that run on SQLite and PostgreSQL alike.

mod consume;
mod fanout;
mod publish;
mod settle;
mod sql;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio::sync::{Notify, broadcast};

use super::{Bus, BusError, Consumer, ConsumerSpec, Headers, Message, PublishAck, StreamSpec};
use crate::config::BusConfig;
use consume::EmbeddedConsumer;
use sql::{millis, stmt, storage};

const BUS: &str = "embedded";

/// The bus stored in the application database.
#[derive(Clone)]
pub struct EmbeddedBus {
    store: Arc<Store>,
}

/// What every handle on one embedded bus shares: the database that holds the bus tables, the
/// configured defaults, and the in-process signals (publish wake-ups, fan-out channel).
struct Store {
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
        Self {
            store: Arc::new(Store {
                db,
                default_duplicate_window: cfg.duplicate_window,
                poll_interval: cfg.poll_interval.max(Duration::from_millis(1)),
                published: Notify::new(),
                fanout: fanout::channel(),
                last_janitor_ms: AtomicI64::new(0),
            }),
        }
    }
}
#[async_trait]
impl Bus for EmbeddedBus {
    fn kind(&self) -> &'static str {
        BUS
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        spec.validate()?;
        let window = if spec.duplicate_window.is_zero() {
            self.store.default_duplicate_window
        } else {
            spec.duplicate_window
        };
        let subjects =
            serde_json::to_string(&spec.subjects).map_err(|e| BusError::Invalid(e.to_string()))?;
        self.store
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
        self.store
            .publish(subject, message_id, headers, payload)
            .await
    }

    async fn consumer(&self, spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BusError> {
        spec.validate()?;
        let exists = self
            .store
            .db
            .query_one(stmt(
                self.store.backend(),
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
        let ack_wait = spec.ack_wait_or_default();
        let spec_json = serde_json::json!({
            "filter_subject": spec.filter_subject,
            "ack_wait_ms": millis(ack_wait),
            "max_deliver": spec.max_deliver,
            "dead_letter_subject": spec.dead_letter_subject(),
        })
        .to_string();
        // A new durable starts at the beginning of the stream (JetStream's `DeliverPolicy::All`);
        // an existing one keeps its cursor.
        self.store
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
            store: self.store.clone(),
            spec: spec.clone(),
            ack_wait,
        }))
    }

    async fn broadcast(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.store.broadcast(subject, headers, payload)
    }

    async fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError> {
        self.store.subscribe(subject)
    }

    async fn health(&self) -> Result<(), BusError> {
        crate::db::ping(&self.store.db).await.map_err(storage)
    }
}
