//! The bid worker (A6, A7) and the closing scheduler (A8).
//!
//! Order: bids of one auction go to one partition subject `auction.bids.<p>.<auction>`, and
//! each partition is consumed by exactly one worker process at a time, which holds the
//! partition's lease in the key-value store (renewed while it works) and applies deliveries
//! one after another. So bids are applied in the order the stream stored them, and the
//! scheduler's close command — published to the same subject after `ends_at + close_settle` —
//! is applied after every bid stored before it, even after a backlog. If a lease is lost
//! (a worker stalled past `partition_lease`), two processes may briefly apply bids of the
//! same partition; the version compare-and-set keeps each application atomic and the unique
//! bid key keeps each bid applied once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_kernel::bus::{ConsumerSpec, Delivery, Headers};
use tokio_util::sync::CancellationToken;

use crate::protocol::{Command, RoomEvent, ServerMsg};
use crate::store::{self, Applied, BidCommand, Closed};
use crate::{AuctionShared, STREAM};

/// Deliveries fetched per round.
const BATCH: usize = 32;
/// Longest wait for the first delivery of a fetch.
const FETCH_WAIT: Duration = Duration::from_millis(500);

pub fn consumer_spec(inner: &AuctionShared, partition: u16) -> ConsumerSpec {
    ConsumerSpec {
        stream: STREAM.into(),
        durable: format!("auction-worker-p{partition}"),
        filter_subject: Some(format!("auction.bids.{partition}.>")),
        ack_wait: inner.cfg.ack_wait,
        max_deliver: inner.cfg.max_deliver,
        dead_letter_subject: None,
    }
}

/// Run every partition: each loop competes for its partition's lease.
pub async fn run(
    inner: Arc<AuctionShared>,
    closing: CancellationToken,
    deadline: CancellationToken,
) {
    let mut tasks = Vec::new();
    for p in 0..inner.cfg.partitions {
        let (inner, closing, deadline) = (inner.clone(), closing.clone(), deadline.clone());
        tasks.push(tokio::spawn(partition_loop(inner, p, closing, deadline)));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn partition_loop(
    inner: Arc<AuctionShared>,
    p: u16,
    closing: CancellationToken,
    deadline: CancellationToken,
) {
    let key = format!("auction:partition:{p}");
    let lease = inner.cfg.partition_lease;
    while !closing.is_cancelled() {
        match inner.kv.try_lock(&key, lease).await {
            Ok(Some(guard)) => {
                metrics::gauge!("bulwark_auction_partitions_owned").increment(1.0);
                tracing::info!(message = "Owning bid partition.", partition = p);
                // The kernel reports the partition consumer's lag while `own` holds it.
                own(&inner, p, &guard, &closing, &deadline).await;
                metrics::gauge!("bulwark_auction_partitions_owned").decrement(1.0);
                let _ = inner.kv.release_lock(&guard).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(message = "Cannot take a partition lease.", partition = p, error = %e)
            }
        }
        // Another process owns it (or the store is down): look again within half a lease,
        // with jitter so that many workers do not ask in step.
        let wait = lease.mul_f64(0.25 + rand::random::<f64>() * 0.25);
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn own(
    inner: &Arc<AuctionShared>,
    p: u16,
    guard: &bulwark_kernel::kv::LockGuard,
    closing: &CancellationToken,
    deadline: &CancellationToken,
) {
    let consumer = match inner.bus.consumer(&consumer_spec(inner, p)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(message = "Cannot bind the bid consumer.", partition = p, error = %e);
            return;
        }
    };
    let lease = inner.cfg.partition_lease;
    let mut renewed = Instant::now();
    while !closing.is_cancelled() {
        if renewed.elapsed() >= lease / 3 {
            match inner.kv.extend_lock(guard, lease).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!(
                        message = "Lost the partition lease; stopping.",
                        partition = p
                    );
                    return;
                }
                Err(e) if renewed.elapsed() >= lease => {
                    tracing::warn!(message = "Cannot renew the partition lease; stopping.", partition = p, error = %e);
                    return;
                }
                Err(_) => {}
            }
        }
        let batch = match consumer.fetch(BATCH, FETCH_WAIT).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(message = "Fetching bids failed.", partition = p, error = %e);
                tokio::select! {
                    _ = closing.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        process_batch(inner, batch, deadline).await;
    }
}

async fn broadcast(inner: &AuctionShared, auction_id: i64, to: Option<String>, msg: ServerMsg) {
    let event = RoomEvent { to, msg };
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(message = "Cannot encode a room event.", error = %e);
            return;
        }
    };
    let mut headers = Headers::new();
    bulwark_kernel::telemetry::inject_context(&mut headers);
    if let Err(e) = inner
        .bus
        .broadcast(&crate::room_subject(auction_id), headers, payload.into())
        .await
    {
        // Sockets see the gap in `seq` on the next message and resynchronise.
        tracing::warn!(message = "Room broadcast failed.", auction = auction_id, error = %e);
    }
}

/// Apply a fetched batch in stream order; ack each delivery only after its database commit.
/// Consecutive bids on one auction are applied in one transaction ([`store::apply_bids`]).
pub async fn process_batch(
    inner: &AuctionShared,
    batch: Vec<Delivery>,
    deadline: &CancellationToken,
) {
    let mut run: Vec<(Delivery, BidCommand)> = Vec::new();
    for d in batch {
        if deadline.is_cancelled() {
            flush(inner, &mut run).await;
            let _ = d.nak(Duration::ZERO).await;
            continue;
        }
        if d.delivered > 1 {
            metrics::counter!("bulwark_auction_redeliveries_total").increment(1);
        }
        match serde_json::from_slice::<Command>(&d.payload) {
            Ok(Command::Bid {
                auction_id,
                bidder,
                id,
                amount,
                received_at_ms,
            }) => {
                if run.first().is_some_and(|(_, c)| c.auction_id != auction_id) {
                    flush(inner, &mut run).await;
                }
                let stream_seq = i64::try_from(d.sequence).ok();
                run.push((
                    d,
                    BidCommand {
                        auction_id,
                        bidder,
                        client_bid_id: id,
                        amount,
                        received_at_ms,
                        stream_seq,
                    },
                ));
            }
            Ok(Command::Close {
                auction_id,
                ends_at_ms,
            }) => {
                flush(inner, &mut run).await;
                close(inner, d, auction_id, ends_at_ms).await;
            }
            Err(e) => {
                flush(inner, &mut run).await;
                tracing::error!(message = "Unreadable bid command; terminated.", sequence = d.sequence, error = %e);
                metrics::counter!("bulwark_auction_bids_total", "outcome" => "malformed")
                    .increment(1);
                let _ = d.term().await;
            }
        }
    }
    flush(inner, &mut run).await;
}

/// Apply a run of bids on one auction, then answer each bidder, tell the room, and ack.
async fn flush(inner: &AuctionShared, run: &mut Vec<(Delivery, BidCommand)>) {
    if run.is_empty() {
        return;
    }
    let started = Instant::now();
    let cmds: Vec<BidCommand> = run.iter().map(|(_, c)| c.clone()).collect();
    let auction_id = cmds[0].auction_id;
    let results = match store::apply_bids(&inner.db, &cmds).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(message = "Applying bids failed; will retry.", auction = auction_id, bids = cmds.len(), error = %e);
            for (d, _) in run.drain(..) {
                let _ = d.nak(Duration::from_secs(1)).await;
            }
            return;
        }
    };
    let took = started.elapsed().as_secs_f64();
    for ((d, cmd), applied) in run.drain(..).zip(results) {
        match applied {
            Applied::Fresh { judgement, room } => {
                metrics::histogram!("bulwark_auction_bid_apply_seconds").record(took);
                metrics::counter!("bulwark_auction_bids_total", "outcome" => judgement.outcome.as_str()).increment(1);
                let result = ServerMsg::BidResult {
                    id: cmd.client_bid_id,
                    outcome: judgement.outcome,
                    reason: judgement.reason,
                    highest: judgement.highest,
                };
                broadcast(inner, auction_id, Some(cmd.bidder), result).await;
                for m in room {
                    broadcast(inner, auction_id, None, m).await;
                }
                ack(d).await;
            }
            Applied::Duplicate(j) => {
                metrics::counter!("bulwark_auction_duplicates_total", "layer" => "database")
                    .increment(1);
                let result = ServerMsg::BidResult {
                    id: cmd.client_bid_id,
                    outcome: j.outcome,
                    reason: j.reason,
                    highest: j.highest,
                };
                broadcast(inner, auction_id, Some(cmd.bidder), result).await;
                ack(d).await;
            }
            Applied::UnknownAuction => {
                tracing::warn!(
                    message = "Bid for an unknown auction; terminated.",
                    auction = auction_id
                );
                metrics::counter!("bulwark_auction_bids_total", "outcome" => "unknown_auction")
                    .increment(1);
                let _ = d.term().await;
            }
        }
    }
}

async fn close(inner: &AuctionShared, d: Delivery, auction_id: i64, ends_at_ms: i64) {
    match store::close(&inner.db, auction_id, ends_at_ms).await {
        Ok(Closed::Now(msg)) => {
            metrics::counter!("bulwark_auction_closed_total").increment(1);
            tracing::info!(message = "Auction closed.", auction = auction_id);
            broadcast(inner, auction_id, None, msg).await;
            ack(d).await;
        }
        Ok(Closed::Already(msg)) => {
            broadcast(inner, auction_id, None, msg).await;
            ack(d).await;
        }
        Ok(Closed::NotDue | Closed::UnknownAuction) => ack(d).await,
        Err(e) => {
            tracing::warn!(message = "Closing failed; will retry.", auction = auction_id, error = %e);
            let _ = d.nak(Duration::from_secs(1)).await;
        }
    }
}

async fn ack(d: Delivery) {
    if let Err(e) = d.ack().await {
        // Redelivered later; the database recognises it as a duplicate.
        tracing::warn!(message = "Ack failed.", error = %e);
    }
}

/// Due auctions read per query; the scheduler pages through all of them every tick.
const DUE_PAGE: u64 = 500;

/// The scheduler (A8): publish a close command for every auction past `ends_at +
/// close_settle`. Several schedulers may run: the commands carry a message id, and closing
/// is a conditional update, so an auction is closed once whoever publishes.
///
/// Every tick pages through **all** due auctions (keyset on `(ends_at, id)`), so closing keeps
/// up with any number of them; a command published in the last minute is not published again
/// (a stopped worker does not pile up commands), but it never hides the auctions after it.
pub async fn schedule(inner: Arc<AuctionShared>, closing: CancellationToken) {
    // (auction, ends_at) → when we last published its close: republish only after a minute.
    let mut sent: HashMap<(i64, i64), Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tokio::time::sleep(inner.cfg.scheduler_interval) => {}
        }
        sent.retain(|_, at| at.elapsed() < Duration::from_secs(60));
        let settle = i64::try_from(inner.cfg.close_settle.as_millis()).unwrap_or(i64::MAX);
        let cutoff = store::now_ms().saturating_sub(settle);
        let mut after = None;
        loop {
            if closing.is_cancelled() {
                return;
            }
            let page = match store::due(&inner.db, cutoff, after, DUE_PAGE).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(message = "Cannot look for auctions to close.", error = %e);
                    break;
                }
            };
            let full = page.len() as u64 == DUE_PAGE;
            after = page.last().map(|&(id, ends_at)| (ends_at, id));
            for (auction_id, ends_at_ms) in page {
                if sent.contains_key(&(auction_id, ends_at_ms)) {
                    continue;
                }
                if publish_close(&inner, auction_id, ends_at_ms).await {
                    sent.insert((auction_id, ends_at_ms), Instant::now());
                }
            }
            if !full {
                break;
            }
        }
    }
}

/// Publish the close command of `auction_id` at `ends_at_ms`; false when the bus refused it.
async fn publish_close(inner: &AuctionShared, auction_id: i64, ends_at_ms: i64) -> bool {
    let cmd = Command::Close {
        auction_id,
        ends_at_ms,
    };
    let Ok(payload) = serde_json::to_vec(&cmd) else {
        return false;
    };
    let msg_id = format!("close.{auction_id}.{ends_at_ms}");
    match inner
        .bus
        .publish(
            &inner.bid_subject(auction_id),
            Some(&msg_id),
            Headers::new(),
            payload.into(),
        )
        .await
    {
        Ok(_) => {
            metrics::counter!("bulwark_auction_close_commands_total").increment(1);
            true
        }
        Err(e) => {
            tracing::warn!(message = "Cannot publish a close command.", auction = auction_id, error = %e);
            false
        }
    }
}

/// Every web instance: feed room messages from the bus into the local rooms (A4).
pub async fn fan_out(inner: Arc<AuctionShared>, closing: CancellationToken) {
    loop {
        let mut sub = match inner.bus.subscribe("auction.room.>").await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(message = "Cannot subscribe to room messages.", error = %e);
                tokio::select! {
                    _ = closing.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let m = tokio::select! {
                _ = closing.cancelled() => return,
                m = futures::StreamExt::next(&mut sub) => m,
            };
            let Some(m) = m else { break };
            let Some(auction_id) = m
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<i64>().ok())
            else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<RoomEvent>(&m.payload) else {
                continue;
            };
            if let ServerMsg::BidPlaced { received_at_ms, .. } = &event.msg {
                let ms = store::now_ms().saturating_sub(*received_at_ms).max(0);
                metrics::histogram!("bulwark_auction_bid_broadcast_seconds")
                    .record(ms as f64 / 1000.0);
            }
            inner.hub.deliver(auction_id, event);
        }
        // The subscription ended (bus reconnecting): subscribe again shortly.
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
