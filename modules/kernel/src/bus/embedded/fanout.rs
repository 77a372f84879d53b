//! Ephemeral fan-out: an in-process broadcast channel, so it reaches subscribers in this
//! process only, at most once.

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::Store;
use crate::bus::{BusError, Headers, Message, subject_matches, validate_pattern, validate_subject};

/// Buffered ephemeral messages per subscriber before a slow one starts losing them.
const FANOUT_CAPACITY: usize = 1024;

pub(super) fn channel() -> broadcast::Sender<Message> {
    broadcast::channel(FANOUT_CAPACITY).0
}

impl Store {
    pub(super) fn broadcast(
        &self,
        subject: &str,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        validate_subject(subject)?;
        crate::telemetry::inject_context(&mut headers);
        // No subscriber is not an error: fan-out is at most once.
        let _ = self.fanout.send(Message {
            subject: subject.to_owned(),
            headers,
            payload,
        });
        Ok(())
    }

    pub(super) fn subscribe(&self, subject: &str) -> Result<BoxStream<'static, Message>, BusError> {
        validate_pattern(subject)?;
        let rx = self.fanout.subscribe();
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
}
