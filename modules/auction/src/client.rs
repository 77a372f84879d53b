//! A Rust client of `/ws/auction/{id}` (A9, A10) for tests, the load generator and anyone
//! embedding Bulwark auctions in a Rust service.
//!
//! It keeps one connection alive: on a drop it reconnects with exponential backoff and full
//! jitter (capped), resends every bid that was not ACKed, with the same id, and replaces
//! its view of the room with the `state` the server sends on every connect. Room messages
//! are applied in `seq` order; a gap triggers `sync`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::protocol::{AckStatus, ClientMsg, ErrorCode, Outcome, ServerMsg, State};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port` (no path); several are tried in turn on reconnect, as a load
    /// balancer would spread them.
    pub endpoints: Vec<String>,
    pub auction_id: i64,
    pub token: String,
    /// First reconnect delay ceiling; doubles per failed attempt.
    pub backoff_base: Duration,
    /// Largest reconnect delay ceiling.
    pub backoff_cap: Duration,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, auction_id: i64, token: impl Into<String>) -> Self {
        Self {
            endpoints: vec![base_url.into()],
            auction_id,
            token: token.into(),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
        }
    }
}

/// What the client has seen so far.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The room as of the last `state` plus the room messages applied since.
    pub state: Option<State>,
    /// Bids sent but not ACKed yet (they are resent on reconnect).
    pub unacked: BTreeMap<String, i64>,
    /// ACKed bids whose `bid_result` has not arrived. Outcomes travel at most once, so these
    /// are resent too after a reconnect: the server answers a known id with its outcome.
    pub unresolved: BTreeMap<String, i64>,
    pub acks: HashMap<String, AckStatus>,
    pub results: HashMap<String, Outcome>,
    /// Successful connections (1 = never reconnected).
    pub connects: u32,
    /// Close code of the last dropped connection, if the server sent one.
    pub last_close: Option<u16>,
    pub connected: bool,
    /// Every server message, in arrival order (tests inspect it).
    pub log: Vec<ServerMsg>,
    /// Bids the server refused for good (not resent).
    pub rejected: HashMap<String, ErrorCode>,
    /// Placement order of each bid, so resends keep the bidder's order.
    pub order: HashMap<String, u64>,
    /// When each unanswered bid was last sent.
    pub sent_at: HashMap<String, std::time::Instant>,
}

/// A bid without `ack` or `bid_result` this long on a live connection is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(3);

enum Cmd {
    Send(ClientMsg),
    Stop,
}

/// A live, self-healing connection to one auction room.
pub struct AuctionClient {
    cmds: mpsc::UnboundedSender<Cmd>,
    view: Arc<Mutex<View>>,
    changed: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl AuctionClient {
    /// Start connecting in the background.
    pub fn start(cfg: ClientConfig) -> Self {
        let (cmds, rx) = mpsc::unbounded_channel();
        let view = Arc::new(Mutex::new(View::default()));
        let (tx_changed, changed) = watch::channel(0u64);
        let task = tokio::spawn(run(cfg, rx, view.clone(), tx_changed));
        Self {
            cmds,
            view,
            changed,
            task,
        }
    }

    /// Place a bid with a fresh id; returns the id.
    pub fn bid(&self, amount: i64) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.bid_with_id(&id, amount);
        id
    }

    /// Place (or resend) a bid with a chosen id.
    pub fn bid_with_id(&self, id: &str, amount: i64) {
        {
            let mut v = lock(&self.view);
            v.unacked.insert(id.to_owned(), amount);
            v.sent_at.insert(id.to_owned(), std::time::Instant::now());
            let next = v.order.len() as u64;
            v.order.entry(id.to_owned()).or_insert(next);
        }
        let _ = self.cmds.send(Cmd::Send(ClientMsg::Bid {
            id: id.to_owned(),
            amount,
        }));
    }

    pub fn sync(&self) {
        let _ = self.cmds.send(Cmd::Send(ClientMsg::Sync));
    }

    /// A copy of what the client has seen.
    pub fn view(&self) -> View {
        lock(&self.view).clone()
    }

    /// Wait until `pred` holds for the view, or `timeout`; returns the view either way.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&View) -> bool,
    ) -> (bool, View) {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let v = lock(&self.view);
                if pred(&v) {
                    return (true, v.clone());
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                let v = self.view();
                return (pred(&v), v);
            }
        }
    }

    /// Close the connection and stop reconnecting.
    pub async fn stop(self) {
        let _ = self.cmds.send(Cmd::Stop);
        let _ = self.task.await;
    }
}

fn lock(v: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// The given bids as `(id, amount)`, in the order they were placed.
fn in_placement_order<'a>(
    v: &View,
    bids: impl Iterator<Item = (&'a String, &'a i64)>,
) -> Vec<(String, i64)> {
    let mut out: Vec<(u64, String, i64)> = bids
        .map(|(k, a)| (v.order.get(k).copied().unwrap_or(u64::MAX), k.clone(), *a))
        .collect();
    out.sort();
    out.into_iter().map(|(_, k, a)| (k, a)).collect()
}

/// Full jitter: a uniform delay in [0, min(cap, base · 2^attempt)].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .checked_mul(1u32 << attempt.min(20))
        .unwrap_or(cap)
        .min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

async fn run(
    cfg: ClientConfig,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    view: Arc<Mutex<View>>,
    changed: watch::Sender<u64>,
) {
    let notify = || changed.send_modify(|n| *n += 1);
    let mut attempt = 0u32;
    let mut next = 0usize;
    loop {
        let Some(base) = cfg.endpoints.get(next % cfg.endpoints.len().max(1)) else {
            return;
        };
        next = next.wrapping_add(1);
        let url = format!(
            "{}/ws/auction/{}?access_token={}",
            base.trim_end_matches('/'),
            cfg.auction_id,
            cfg.token
        );
        let ws = match tokio_tungstenite::connect_async(&url).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                tracing::debug!(message = "Auction client cannot connect.", error = %e);
                let wait = backoff(cfg.backoff_base, cfg.backoff_cap, attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    c = cmds.recv() => match c {
                        None | Some(Cmd::Stop) => return,
                        // Queued in `unacked`; sent after the reconnect.
                        Some(Cmd::Send(_)) => continue,
                    },
                }
            }
        };
        attempt = 0;
        let (mut sink, mut stream) = ws.split();
        let resend: Vec<(String, i64)> = {
            let mut v = lock(&view);
            v.connects += 1;
            v.connected = true;
            in_placement_order(&v, v.unacked.iter().chain(v.unresolved.iter()))
        };
        notify();
        let mut resent = true;
        for (id, amount) in resend {
            if send(&mut sink, &ClientMsg::Bid { id, amount })
                .await
                .is_err()
            {
                resent = false;
                break;
            }
        }
        let mut close_code = None;
        // Resend what stays unanswered on a live connection too: an `ack` lost to an error
        // (`unavailable`, `rate_limited`) or a `bid_result` lost on the way. Same ids, so the
        // server answers from what it stored.
        let mut patrol = tokio::time::interval(RESEND_AFTER / 2);
        patrol.tick().await;

        // Only `break` (reconnect) and `return` (stopped) leave this loop.
        if resent {
            loop {
                tokio::select! {
                    c = cmds.recv() => match c {
                        None | Some(Cmd::Stop) => {
                            let _ = sink.send(Message::Close(None)).await;
                            lock(&view).connected = false;
                            notify();
                            return;
                        }
                        Some(Cmd::Send(m)) => {
                            if send(&mut sink, &m).await.is_err() {
                                break;
                            }
                        }
                    },
                    _ = patrol.tick() => {
                    let again: Vec<(String, i64)> = {
                        let mut v = lock(&view);
                        let now = std::time::Instant::now();
                        let due = in_placement_order(
                            &v,
                            v.unacked.iter().chain(v.unresolved.iter()).filter(|(k, _)| {
                                v.sent_at
                                    .get(*k)
                                    .is_none_or(|t| now.duration_since(*t) >= RESEND_AFTER)
                            }),
                        );
                        for (k, _) in &due {
                            v.sent_at.insert(k.clone(), now);
                        }
                        due
                    };
                    let mut broken = false;
                    for (id, amount) in again {
                        if send(&mut sink, &ClientMsg::Bid { id, amount }).await.is_err() {
                            broken = true;
                            break;
                        }
                    }
                    if broken {
                        break;
                    }
                }
                frame = stream.next() => match frame {
                        Some(Ok(Message::Text(t))) => {
                            let Ok(msg) = serde_json::from_str::<ServerMsg>(t.as_str()) else { continue };
                            let need_sync = apply(&mut lock(&view), msg);
                            notify();
                            if need_sync && send(&mut sink, &ClientMsg::Sync).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            close_code = frame.map(|f| u16::from(f.code));
                            break;
                        }
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => break,
                    },
                }
            }
        }
        {
            let mut v = lock(&view);
            v.connected = false;
            v.last_close = close_code;
        }
        notify();
        // Reconnect at once after the first drop (a 1012 restart), back off after that.
        let wait = backoff(cfg.backoff_base, cfg.backoff_cap, attempt);
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(wait).await;
    }
}

async fn send<S>(sink: &mut S, m: &ClientMsg) -> Result<(), ()>
where
    S: futures::Sink<Message> + Unpin,
{
    let text = serde_json::to_string(m).map_err(|_| ())?;
    sink.send(Message::text(text)).await.map_err(|_| ())
}

/// Apply one server message to the view; true when a gap in `seq` calls for `sync`.
fn apply(v: &mut View, msg: ServerMsg) -> bool {
    v.log.push(msg.clone());
    match msg {
        ServerMsg::State(s) => {
            v.state = Some(*s);
            false
        }
        ServerMsg::Ack { id, status } => {
            if let Some(amount) = v.unacked.remove(&id)
                && !v.results.contains_key(&id)
            {
                v.unresolved.insert(id.clone(), amount);
            }
            v.acks.insert(id, status);
            false
        }
        ServerMsg::BidResult { id, outcome, .. } => {
            v.unacked.remove(&id);
            v.unresolved.remove(&id);
            v.sent_at.remove(&id);
            v.results.insert(id, outcome);
            false
        }
        ServerMsg::Error { code, id, .. } => {
            // A bid the server will never take (bad id or amount, wrong role) is not resent;
            // `rate_limited` and `unavailable` are, with the same id.
            if let Some(id) = id
                && matches!(
                    code,
                    ErrorCode::InvalidBid | ErrorCode::Forbidden | ErrorCode::BadMessage
                )
            {
                v.unacked.remove(&id);
                v.unresolved.remove(&id);
                v.sent_at.remove(&id);
                v.rejected.insert(id, code);
            }
            false
        }
        room => {
            let Some(state) = v.state.as_mut() else {
                return true;
            };
            let Some(seq) = room.seq() else { return false };
            if seq <= state.seq {
                return false;
            }
            if seq != state.seq + 1 {
                return true;
            }
            state.seq = seq;
            match room {
                ServerMsg::BidPlaced {
                    seq,
                    amount,
                    bidder,
                    received_at_ms,
                    ends_at_ms,
                } => {
                    state.highest = Some(crate::protocol::Highest {
                        amount,
                        bidder: bidder.clone(),
                    });
                    state.min_next = amount + state.min_increment;
                    state.bid_count += 1;
                    state.ends_at_ms = ends_at_ms;
                    state.bids.insert(
                        0,
                        crate::protocol::PlacedBid {
                            seq,
                            amount,
                            bidder,
                            received_at_ms,
                        },
                    );
                }
                ServerMsg::Extended { ends_at_ms, .. } => state.ends_at_ms = ends_at_ms,
                ServerMsg::Closed {
                    winner,
                    amount,
                    reserve_met,
                    ..
                } => {
                    state.status = "closed".into();
                    state.result = Some(crate::protocol::ResultView {
                        winner,
                        amount,
                        reserve_met,
                        closed_at_ms: 0,
                    });
                }
                _ => {}
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_bids_are_dropped_but_retryable_ones_kept() {
        let mut v = View::default();
        for id in ["bad", "busy"] {
            v.unacked.insert(id.into(), 5);
        }
        let err = |code, id: &str| ServerMsg::Error {
            code,
            message: String::new(),
            id: Some(id.into()),
        };
        apply(&mut v, err(ErrorCode::InvalidBid, "bad"));
        apply(&mut v, err(ErrorCode::RateLimited, "busy"));
        assert!(!v.unacked.contains_key("bad"));
        assert_eq!(v.rejected.get("bad"), Some(&ErrorCode::InvalidBid));
        assert!(
            v.unacked.contains_key("busy"),
            "rate-limited bids are resent"
        );
        // An ack moves a bid to `unresolved` until its result arrives.
        apply(
            &mut v,
            ServerMsg::Ack {
                id: "busy".into(),
                status: AckStatus::Stored,
            },
        );
        assert!(v.unresolved.contains_key("busy"));
        apply(
            &mut v,
            ServerMsg::BidResult {
                id: "busy".into(),
                outcome: Outcome::Accepted,
                reason: None,
                highest: Some(5),
            },
        );
        assert!(v.unresolved.is_empty() && v.unacked.is_empty());
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(base, cap, attempt);
            assert!(d <= cap);
            assert!(d <= base * 2u32.pow(attempt.min(20)));
        }
        let spread: std::collections::HashSet<u128> =
            (0..50).map(|_| backoff(base, cap, 6).as_micros()).collect();
        assert!(spread.len() > 10, "full jitter spreads delays");
    }
}
