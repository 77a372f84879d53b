//! The WebSocket gateway (A1, A2, A5, A10): one task per socket that owns its life cycle.
//!
//! A bid is validated here (role, shape, rate), stamped with `received_at`, published to
//! JetStream with the bid's id as `Nats-Msg-Id`, and only after the stream's publish ack is
//! the client sent `ack`. No ack means the client resends the same id; the stream's duplicate
//! window and the database's unique key make that safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Message;
use bulwark_kernel::auth::{Identity, Role};
use bulwark_kernel::bus::Headers;
use bulwark_kernel::ws::TrackedSocket;
use futures::StreamExt as _;
use tokio::sync::broadcast::error::RecvError;

use crate::protocol::{
    AckStatus, ClientMsg, Command, ErrorCode, Outcome, ServerMsg, close_code, validate_bid,
};
use crate::{AuctionShared, store};

/// Invalid frames tolerated before the socket is closed with 4002.
const MAX_BAD_FRAMES: u32 = 20;

/// Token buckets per bidder, in this process.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Take one token for `who`; false when the bucket is empty.
    pub fn allow(&self, who: &str, per_second: f64, burst: f64) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if b.len() > 100_000 {
            // Full buckets carry no information; drop them to bound memory.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_second < burst
            });
        }
        let (tokens, at) = b.entry(who.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn count_out(kind: &'static str) {
    metrics::counter!("bulwark_auction_messages_total", "direction" => "out", "type" => kind)
        .increment(1);
}

/// Why a socket ended, for the log and metrics.
enum End {
    Client,
    Slow,
    Abuse,
    Draining,
}

struct Socket {
    inner: Arc<AuctionShared>,
    auction_id: i64,
    identity: Identity,
    out: tokio::sync::mpsc::Sender<Message>,
    last_seq: i64,
    bad_frames: u32,
    /// The client left its queue full for `slow_client_timeout`.
    slow: std::sync::atomic::AtomicBool,
}

impl Socket {
    /// Queue `msg`; false when the client did not make room within `slow_client_timeout`.
    async fn send(&self, msg: &ServerMsg) -> bool {
        let text = match serde_json::to_string(msg) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(message = "Cannot encode a server message.", error = %e);
                return true;
            }
        };
        match self
            .out
            .send_timeout(Message::text(text), self.inner.cfg.slow_client_timeout)
            .await
        {
            Ok(()) => {
                count_out(msg.kind());
                true
            }
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.slow.store(true, std::sync::atomic::Ordering::Relaxed);
                false
            }
            // The writer ended: the connection is gone (or closed by the drain).
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    async fn send_state(&mut self) -> Result<bool, sea_orm::DbErr> {
        let Some(state) = store::state(
            &self.inner.db,
            self.auction_id,
            u64::from(self.inner.cfg.state_bids),
        )
        .await?
        else {
            return Ok(false);
        };
        self.last_seq = state.seq;
        Ok(self.send(&ServerMsg::State(Box::new(state))).await)
    }

    async fn error(&self, code: ErrorCode, message: impl Into<String>, id: Option<String>) -> bool {
        metrics::counter!("bulwark_auction_rejections_total", "reason" => error_label(code))
            .increment(1);
        self.send(&ServerMsg::Error {
            code,
            message: message.into(),
            id,
        })
        .await
    }

    /// Handle one text frame; false ends the socket (client too slow).
    async fn on_text(&mut self, text: &str) -> Result<bool, End> {
        let msg: ClientMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.bad_frames += 1;
                if self.bad_frames > MAX_BAD_FRAMES {
                    return Err(End::Abuse);
                }
                return Ok(self.error(ErrorCode::BadMessage, e.to_string(), None).await);
            }
        };
        match msg {
            ClientMsg::Sync => {
                metrics::counter!("bulwark_auction_messages_total", "direction" => "in", "type" => "sync").increment(1);
                self.send_state().await.map_err(|e| {
                    tracing::warn!(message = "Cannot read auction state.", error = %e);
                    End::Slow
                })
            }
            ClientMsg::Bid { id, amount } => {
                metrics::counter!("bulwark_auction_messages_total", "direction" => "in", "type" => "bid").increment(1);
                Ok(self.on_bid(id, amount).await)
            }
        }
    }

    async fn on_bid(&mut self, id: String, amount: i64) -> bool {
        let started = Instant::now();
        if !self.identity.has(Role::Bidder) {
            return self
                .error(
                    ErrorCode::Forbidden,
                    "role `bidder` required to bid",
                    Some(id),
                )
                .await;
        }
        if let Err(m) = validate_bid(&id, amount) {
            return self.error(ErrorCode::InvalidBid, m, Some(id)).await;
        }
        let cfg = &self.inner.cfg;
        if !self
            .inner
            .limiter
            .allow(&self.identity.subject, cfg.bids_per_second, cfg.bid_burst)
        {
            return self
                .error(
                    ErrorCode::RateLimited,
                    format!("at most {} bids per second", cfg.bids_per_second),
                    Some(id),
                )
                .await;
        }
        let cmd = Command::Bid {
            auction_id: self.auction_id,
            bidder: self.identity.subject.clone(),
            id: id.clone(),
            amount,
            received_at_ms: store::now_ms(),
        };
        let payload = match serde_json::to_vec(&cmd) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .error(ErrorCode::Unavailable, e.to_string(), Some(id))
                    .await;
            }
        };
        let mut headers = Headers::new();
        bulwark_kernel::telemetry::inject_context(&mut headers);
        let subject = self.inner.bid_subject(self.auction_id);
        let msg_id = crate::bid_message_id(self.auction_id, &self.identity.subject, &id);
        match self
            .inner
            .bus
            .publish(&subject, Some(&msg_id), headers, payload.into())
            .await
        {
            Ok(ack) => {
                let status = if ack.duplicate {
                    metrics::counter!("bulwark_auction_duplicates_total", "layer" => "stream")
                        .increment(1);
                    AckStatus::Duplicate
                } else {
                    AckStatus::Stored
                };
                metrics::histogram!("bulwark_auction_bid_ack_seconds")
                    .record(started.elapsed().as_secs_f64());
                if !self
                    .send(&ServerMsg::Ack {
                        id: id.clone(),
                        status,
                    })
                    .await
                {
                    return false;
                }
                if ack.duplicate {
                    // A resend: the client may have missed the outcome; repeat it if known.
                    return self.repeat_outcome(id).await;
                }
                true
            }
            Err(e) => {
                tracing::warn!(message = "Bid not stored.", auction = self.auction_id, error = %e);
                self.error(
                    ErrorCode::Unavailable,
                    "the bid could not be stored; resend it with the same id",
                    Some(id),
                )
                .await
            }
        }
    }

    async fn repeat_outcome(&self, id: String) -> bool {
        match store::find_bid(&self.inner.db, self.auction_id, &self.identity.subject, &id).await {
            Ok(Some(b)) => {
                let highest = store::get(&self.inner.db, self.auction_id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|a| a.highest_amount);
                self.send(&ServerMsg::BidResult {
                    id,
                    outcome: Outcome::parse(&b.outcome).unwrap_or(Outcome::TooLow),
                    reason: b.reason,
                    highest,
                })
                .await
            }
            // Not applied yet: the worker's `bid_result` is still to come.
            _ => true,
        }
    }
}

fn error_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadMessage => "bad_message",
        ErrorCode::InvalidBid => "invalid_bid",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Unavailable => "unavailable",
    }
}

/// Run one socket of room `auction_id` until the client leaves, is too slow, or we drain.
pub async fn run(
    inner: Arc<AuctionShared>,
    auction_id: i64,
    identity: Identity,
    ts: TrackedSocket,
) {
    let TrackedSocket {
        mut inbound,
        outbound,
        closing,
        mut closer,
    } = ts;
    let conn = uuid::Uuid::new_v4().simple().to_string();
    let member = format!("{}/{conn}/{}", inner.instance, identity.subject);
    let presence_set = crate::presence_set(auction_id);
    // Join before reading the state, so nothing published in between is missed; messages the
    // state already reflects are skipped by `seq`.
    let mut room = inner.hub.join(auction_id);
    let mut s = Socket {
        inner: inner.clone(),
        auction_id,
        identity,
        out: outbound,
        last_seq: 0,
        bad_frames: 0,
        slow: std::sync::atomic::AtomicBool::new(false),
    };
    let beat = |inner: Arc<AuctionShared>, set: String, member: String| async move {
        if let Err(e) = inner
            .kv
            .presence_heartbeat(&set, &member, inner.cfg.presence_ttl)
            .await
        {
            tracing::debug!(message = "Presence heartbeat failed.", error = %e);
        }
    };
    beat(inner.clone(), presence_set.clone(), member.clone()).await;
    let end = match s.send_state().await {
        Ok(true) => {
            let mut heartbeat = tokio::time::interval(inner.cfg.presence_ttl / 3);
            heartbeat.tick().await;
            loop {
                tokio::select! {
                    _ = closing.cancelled() => break End::Draining,
                    frame = inbound.next() => match frame {
                        None | Some(Ok(Message::Close(_))) => break End::Client,
                        Some(Err(e)) => {
                            closer.close_with(bulwark_kernel::ws::close_for_read_error(&e));
                            break End::Client;
                        }
                        Some(Ok(Message::Text(t))) => match s.on_text(t.as_str()).await {
                            Ok(true) => {}
                            Ok(false) => break End::Slow,
                            Err(end) => break end,
                        },
                        Some(Ok(Message::Binary(_))) => {
                            s.bad_frames += 1;
                            if s.bad_frames > MAX_BAD_FRAMES {
                                break End::Abuse;
                            }
                            if !s.error(ErrorCode::BadMessage, "binary frames are not part of the protocol", None).await {
                                break End::Slow;
                            }
                        }
                        Some(Ok(_)) => {}
                    },
                    ev = room.recv() => match ev {
                        Ok(ev) => {
                            if let Some(to) = &ev.to {
                                if *to == s.identity.subject && !s.send(&ev.msg).await {
                                    break End::Slow;
                                }
                                continue;
                            }
                            let Some(seq) = ev.msg.seq() else { continue };
                            if seq <= s.last_seq {
                                continue;
                            }
                            let ok = if seq == s.last_seq + 1 {
                                s.last_seq = seq;
                                s.send(&ev.msg).await
                            } else {
                                // A room message was lost on the way (ephemeral fan-out):
                                // the database has it, so resend the whole state.
                                metrics::counter!("bulwark_auction_resyncs_total", "cause" => "gap").increment(1);
                                s.send_state().await.unwrap_or(false)
                            };
                            if !ok {
                                break End::Slow;
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            metrics::counter!("bulwark_auction_resyncs_total", "cause" => "lagged").increment(1);
                            if !s.send_state().await.unwrap_or(false) {
                                break End::Slow;
                            }
                        }
                        Err(RecvError::Closed) => break End::Draining,
                    },
                    _ = heartbeat.tick() => beat(inner.clone(), presence_set.clone(), member.clone()).await,
                }
            }
        }
        Ok(false) => End::Client,
        Err(e) => {
            tracing::warn!(message = "Cannot read auction state.", error = %e);
            End::Client
        }
    };
    match end {
        End::Slow if s.slow.load(std::sync::atomic::Ordering::Relaxed) => {
            metrics::counter!("bulwark_auction_slow_clients_total").increment(1);
            // Not through the queue that just stayed full: the closer goes ahead of it.
            closer.close(close_code::SLOW_CLIENT, "too slow: reconnect");
        }
        End::Abuse => {
            closer.close(close_code::PROTOCOL_ABUSE, "too many invalid frames");
        }
        End::Slow | End::Client | End::Draining => {}
    }
    drop(room);
    inner.hub.leave(auction_id);
    if let Err(e) = inner.kv.presence_remove(&presence_set, &member).await {
        tracing::debug!(message = "Presence removal failed.", error = %e);
    }
}
