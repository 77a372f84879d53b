//! Consumer lag, `bulwark_bus_consumer_pending{stream,consumer}`: reported for every durable
//! consumer the kernel's bus ([`super::Metered`]) handed out, by the process that holds it,
//! so no module measures its own.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, Consumer, ConsumerSpec};

/// How often [`report_consumer_lag`] is meant to refresh the gauge.
pub const CONSUMER_LAG_EVERY: Duration = Duration::from_secs(2);

/// The lag of one durable consumer this process holds.
#[derive(Debug)]
pub struct ConsumerLag {
    pub stream: String,
    pub durable: String,
    /// Waiting plus delivered-and-unacked messages ([`Consumer::pending`]).
    pub pending: Result<u64, BusError>,
}

/// A consumer handed out by the wrapper; its handle owns it, the held list only watches it.
pub(super) struct Held {
    pub(super) spec: ConsumerSpec,
    pub(super) consumer: Box<dyn Consumer>,
}

/// The consumers a bus handed out that are still held somewhere in this process.
#[derive(Default)]
pub(super) struct HeldConsumers {
    list: Mutex<Vec<Weak<Held>>>,
}

impl HeldConsumers {
    pub(super) fn hold(&self, spec: &ConsumerSpec, consumer: Box<dyn Consumer>) -> Arc<Held> {
        let held = Arc::new(Held {
            spec: spec.clone(),
            consumer,
        });
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&held));
        held
    }

    /// One live consumer per stream and durable name: handles on the same durable share its
    /// server-side state, so they have the same lag.
    fn live(&self) -> Vec<Arc<Held>> {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|w| w.strong_count() > 0);
        let mut seen = HashSet::new();
        list.iter()
            .filter_map(Weak::upgrade)
            .filter(|h| seen.insert((h.spec.stream.clone(), h.spec.durable.clone())))
            .collect()
    }

    pub(super) async fn lag(&self) -> Vec<ConsumerLag> {
        let mut out = Vec::new();
        // Measured outside the lock: `pending` is a round trip to the store.
        for held in self.live() {
            out.push(ConsumerLag {
                stream: held.spec.stream.clone(),
                durable: held.spec.durable.clone(),
                pending: held.consumer.pending().await,
            });
        }
        out
    }
}

fn pending_gauge(stream: &str, durable: &str) -> metrics::Gauge {
    metrics::gauge!("bulwark_bus_consumer_pending", "stream" => stream.to_owned(), "consumer" => durable.to_owned())
}

/// Keeps `bulwark_bus_consumer_pending` current for every durable consumer `bus` handed out
/// and this process still holds, every `every` until `stop` fires. A consumer that is no
/// longer held drops to 0: whichever process takes it over reports it from then on. A
/// failed measurement keeps the last value (and is logged at debug).
pub async fn report_consumer_lag(bus: Arc<dyn Bus>, every: Duration, stop: CancellationToken) {
    let mut reported: HashSet<(String, String)> = HashSet::new();
    loop {
        let lags = tokio::select! {
            () = stop.cancelled() => return,
            lags = bus.consumer_lag() => lags,
        };
        let mut held = HashSet::with_capacity(lags.len());
        for lag in lags {
            match lag.pending {
                Ok(n) => pending_gauge(&lag.stream, &lag.durable).set(n as f64),
                Err(e) => tracing::debug!(
                    message = "Cannot read consumer lag.",
                    stream = %lag.stream, consumer = %lag.durable, error = %e,
                ),
            }
            held.insert((lag.stream, lag.durable));
        }
        for (stream, durable) in reported.difference(&held) {
            pending_gauge(stream, durable).set(0.0);
        }
        reported = held;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
