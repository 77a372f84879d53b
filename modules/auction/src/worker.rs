//! The bid worker (A6, A7) and the closing scheduler (A8).
//!
//! Order: bids of one auction go to one partition subject `auction.bids.<p>.<auction>`, and
//! each partition is consumed by exactly one worker process at a time, which holds the
//! partition's lease in the key-value store (renewed while it works) and applies deliveries
//! one after another. So bids are applied in the order the stream stored them, and the
//! scheduler's close command — published to the same subject after `ends_at + close_settle` —
//! is applied after every bid stored before it, even after a backlog. An owner that takes
//! over from one that died first waits for the bus to return the dead owner's unsettled
//! deliveries ([`await_handover`]), so they are applied before anything later; an owner that
//! stops cleanly says so ([`store::release_partition`]) and its successor starts at once.
//! The lease is renewed by
//! a task beside the batch, and every write is fenced by the partition's token in the
//! database ([`store::claim_partition`]), so an owner whose lease ran out cannot write after a
//! newer one claimed the partition. A run that fails is retried in place before anything
//! later of its partition is applied, so nothing overtakes it.

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

/// What a partition owner applies with: its fence, and the signals to stop applying.
pub struct Owner {
    pub fence: Option<store::Fence>,
    /// Cancelled when the lease is lost (renewal refused or failing for a whole lease, or a
    /// write fenced out).
    pub lost: CancellationToken,
    /// The drain's deadline: hand everything not applied back to the bus.
    pub deadline: CancellationToken,
}

impl Owner {
    fn stopping(&self) -> bool {
        self.lost.is_cancelled() || self.deadline.is_cancelled()
    }

    async fn stopped(&self) {
        tokio::select! {
            _ = self.lost.cancelled() => {}
            _ = self.deadline.cancelled() => {}
        }
    }
}

/// Renew `guard` every third of `lease` until it is lost or `stop` fires; a lost lease
/// cancels `lost`. It runs beside the batch, so a slow batch keeps its lease (issue 14, item 3).
async fn renew(
    kv: Arc<dyn bulwark_kernel::kv::KvStore>,
    guard: bulwark_kernel::kv::LockGuard,
    lease: Duration,
    p: u16,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(lease / 3) => {}
        }
        match kv.extend_lock(&guard, lease).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                tracing::warn!(
                    message = "Lost the partition lease; stopping.",
                    partition = p
                );
                lost.cancel();
                return;
            }
            Err(e) if renewed.elapsed() >= lease => {
                tracing::warn!(message = "Cannot renew the partition lease; stopping.", partition = p, error = %e);
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::debug!(message = "Renewing the partition lease failed; retrying.", partition = p, error = %e)
            }
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
    let lease = inner.cfg.partition_lease;
    let lost = CancellationToken::new();
    let stop_renewing = CancellationToken::new();
    let _stop_renewing = stop_renewing.clone().drop_guard();
    tokio::spawn(renew(
        inner.kv.clone(),
        guard.clone(),
        lease,
        p,
        lost.clone(),
        stop_renewing,
    ));
    // Fence the partition's writes with this lease: from the claim on, a previous owner's
    // transactions are refused.
    let claim = match store::claim_partition(
        &inner.db,
        i32::from(p),
        guard.fencing_token,
        &inner.instance,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(message = "Cannot claim the bid partition.", partition = p, error = %e);
            return;
        }
    };
    let consumer = match inner.bus.consumer(&consumer_spec(inner, p)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(message = "Cannot bind the bid consumer.", partition = p, error = %e);
            return;
        }
    };
    let owner = Owner {
        fence: Some(claim.fence),
        lost,
        deadline: deadline.clone(),
    };
    if !claim.clean_handover && !await_handover(inner, p, &*consumer, &owner, closing).await {
        return;
    }
    while !closing.is_cancelled() && !owner.lost.is_cancelled() {
        let batch = match consumer.fetch(BATCH, FETCH_WAIT).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(message = "Fetching bids failed.", partition = p, error = %e);
                tokio::select! {
                    _ = closing.cancelled() => return,
                    _ = owner.lost.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        process_batch(inner, &owner, batch).await;
    }
    // Everything fetched was acked or handed back (`process_batch` settles its whole batch):
    // tell the next owner it need not wait for anything in flight.
    if !owner.lost.is_cancelled()
        && let Err(e) = store::release_partition(&inner.db, &claim.fence).await
    {
        tracing::warn!(message = "Cannot record the partition's clean hand-over; the next owner will wait out ack_wait.", partition = p, error = %e);
    }
}

/// The previous owner of partition `p` died or lost its lease (issue 14, item 1): deliveries
/// it fetched and did not settle come back only when their `ack_wait` runs out, and a fetch
/// before that would hand us later bids — and even the close — first, so the earlier bids
/// would be judged after them. Wait until they are due again: `ack_wait` from now, plus the
/// third of a lease in which an owner that is still alive notices its loss and stops pushing
/// its deadlines out (`in_progress`). The bus then redelivers them ahead of anything new, in
/// stream order. No wait when nothing is unacked. False when we stop first.
async fn await_handover(
    inner: &AuctionShared,
    p: u16,
    consumer: &dyn bulwark_kernel::bus::Consumer,
    owner: &Owner,
    closing: &CancellationToken,
) -> bool {
    let unacked = match consumer.unacked().await {
        Ok(0) => return true,
        Ok(n) => Some(n),
        // Unknown: assume the worst.
        Err(e) => {
            tracing::warn!(message = "Cannot count the partition's unacked deliveries.", partition = p, error = %e);
            None
        }
    };
    let wait = inner.cfg.ack_wait + inner.cfg.partition_lease / 3 + Duration::from_millis(500);
    tracing::warn!(
        message = "The previous owner left deliveries unsettled; waiting for the bus to return them before fetching.",
        partition = p,
        unacked,
        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
    );
    metrics::counter!("bulwark_auction_handover_waits_total").increment(1);
    tokio::select! {
        _ = closing.cancelled() => false,
        _ = owner.lost.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
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
///
/// A run that fails is retried in place, with backoff, before anything after it: the whole
/// partition waits (issue 14, item 2), so no later bid of that auction can overtake it. When
/// the owner stops (lease lost, fenced out, drain deadline) what is not applied is handed back
/// to the bus unacked, in order, for the next owner.
pub async fn process_batch(inner: &AuctionShared, owner: &Owner, batch: Vec<Delivery>) {
    let mut run: Vec<(Delivery, BidCommand)> = Vec::new();
    let mut rest = batch.into_iter();
    while let Some(d) = rest.next() {
        if owner.stopping() {
            let held = run.drain(..).map(|(d, _)| d);
            give_back(held.chain(std::iter::once(d)).chain(rest)).await;
            return;
        }
        if d.delivered > 1 {
            metrics::counter!("bulwark_auction_redeliveries_total").increment(1);
        }
        let applied = match serde_json::from_slice::<Command>(&d.payload) {
            Ok(Command::Bid {
                auction_id,
                bidder,
                id,
                amount,
                received_at_ms,
            }) => {
                let mut ok = true;
                if run.first().is_some_and(|(_, c)| c.auction_id != auction_id) {
                    ok = flush(inner, owner, &mut run).await;
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
                ok
            }
            Ok(Command::Close {
                auction_id,
                ends_at_ms,
            }) => {
                if !flush(inner, owner, &mut run).await {
                    // Stopped: hand back the run, this close and the rest, in stream order.
                    let held: Vec<Delivery> = run.drain(..).map(|(d, _)| d).collect();
                    give_back(held.into_iter().chain(std::iter::once(d)).chain(rest)).await;
                    return;
                }
                close(inner, owner, d, auction_id, ends_at_ms).await
            }
            Err(e) => {
                let ok = flush(inner, owner, &mut run).await;
                tracing::error!(message = "Unreadable bid command; terminated.", sequence = d.sequence, error = %e);
                metrics::counter!("bulwark_auction_bids_total", "outcome" => "malformed")
                    .increment(1);
                let _ = d.term().await;
                ok
            }
        };
        if !applied {
            // Stopped: nothing after this may be applied by us.
            give_back(run.drain(..).map(|(d, _)| d).chain(rest.by_ref())).await;
            return;
        }
    }
    if !flush(inner, owner, &mut run).await {
        give_back(run.drain(..).map(|(d, _)| d)).await;
    }
}

/// Hand deliveries we will not apply back to the bus (unacked) for the next owner.
async fn give_back(ds: impl Iterator<Item = Delivery>) {
    for d in ds {
        let _ = d.nak(Duration::ZERO).await;
    }
}

/// Backoff of the in-place retry of a failed run: doubling from 100 ms, at most 5 s and at
/// most a third of `ack_wait` (each retry also tells the bus the deliveries are in progress).
fn retry_backoff(attempt: u32, ack_wait: Duration) -> Duration {
    let cap = Duration::from_secs(5).min(ack_wait / 3);
    Duration::from_millis(100)
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(cap)
}

/// Run `op` until it applies, retrying a database failure in place with backoff. `None` when
/// the owner stopped (lease lost, fenced out, deadline) before it applied.
async fn until_applied<T, F, Fut>(
    inner: &AuctionShared,
    owner: &Owner,
    what: &str,
    auction_id: i64,
    deliveries: &[&Delivery],
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, store::ApplyError>>,
{
    let mut attempt = 0u32;
    loop {
        if owner.stopping() {
            return None;
        }
        match op().await {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(
                        message = "Applied after retrying.",
                        what,
                        auction = auction_id,
                        attempts = attempt + 1
                    );
                }
                return Some(v);
            }
            Err(e @ store::ApplyError::Fenced { .. }) => {
                tracing::warn!(message = "A newer owner holds the partition; stopping.", what, auction = auction_id, error = %e);
                metrics::counter!("bulwark_auction_fenced_total").increment(1);
                owner.lost.cancel();
                return None;
            }
            Err(store::ApplyError::Db(e)) => {
                metrics::counter!("bulwark_auction_apply_retries_total").increment(1);
                if attempt == 0 || attempt.is_power_of_two() {
                    tracing::warn!(message = "Applying failed; retrying before anything later of the partition.", what, auction = auction_id, attempt, error = %e);
                }
                for d in deliveries {
                    let _ = d.in_progress().await;
                }
                let wait = retry_backoff(attempt, inner.cfg.ack_wait);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = owner.stopped() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Apply a run of bids on one auction, then answer each bidder, tell the room, and ack.
/// False when the owner stopped before the run applied (the run is left in `run`).
async fn flush(
    inner: &AuctionShared,
    owner: &Owner,
    run: &mut Vec<(Delivery, BidCommand)>,
) -> bool {
    if run.is_empty() {
        return true;
    }
    let started = Instant::now();
    let cmds: Vec<BidCommand> = run.iter().map(|(_, c)| c.clone()).collect();
    let auction_id = cmds[0].auction_id;
    let deliveries: Vec<&Delivery> = run.iter().map(|(d, _)| d).collect();
    let Some(results) = until_applied(inner, owner, "bids", auction_id, &deliveries, || {
        store::apply_bids(&inner.db, owner.fence.as_ref(), &cmds)
    })
    .await
    else {
        return false;
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
    true
}

/// Apply a close command (retried in place like a run); false when the owner stopped first
/// (the delivery was handed back).
async fn close(
    inner: &AuctionShared,
    owner: &Owner,
    d: Delivery,
    auction_id: i64,
    ends_at_ms: i64,
) -> bool {
    let closed = until_applied(inner, owner, "close", auction_id, &[&d], || {
        store::close(&inner.db, owner.fence.as_ref(), auction_id, ends_at_ms)
    })
    .await;
    match closed {
        Some(Closed::Now(msg)) => {
            metrics::counter!("bulwark_auction_closed_total").increment(1);
            tracing::info!(message = "Auction closed.", auction = auction_id);
            broadcast(inner, auction_id, None, msg).await;
            ack(d).await;
        }
        Some(Closed::Already(msg)) => {
            broadcast(inner, auction_id, None, msg).await;
            ack(d).await;
        }
        Some(Closed::NotDue | Closed::UnknownAuction) => ack(d).await,
        None => {
            give_back(std::iter::once(d)).await;
            return false;
        }
    }
    true
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
