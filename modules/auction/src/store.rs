//! The auction's database operations. Every write is one transaction that compares-and-sets
//! the auction row's `version`, so two writers can never both apply against the same state;
//! the loser retries against the new state.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, SqlErr, TransactionTrait,
};

use crate::entity::{auction, bid, partition_owner, result};
use crate::protocol::{Highest, Outcome, PlacedBid, ResultView, ServerMsg, State};

mod bidding;
pub use bidding::{Decision, Judgement, Run, Stored, decide_run, judge, min_next};

/// Attempts of a write that lost a version race before giving up (the delivery is then
/// redelivered by the bus).
const CAS_ATTEMPTS: usize = 20;

/// Why a worker's write was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A newer owner claimed the partition: this process's lease ran out. Nothing was written;
    /// the deliveries are left to the new owner (not acked).
    #[error("partition {partition}: fenced out (our token {token}, a newer owner holds it)")]
    Fenced { partition: i32, token: i64 },
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// The proof of partition ownership a worker writes with: its partition and the token it
/// claimed ([`claim_partition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub partition: i32,
    pub token: i64,
}

/// What a new partition owner learns when it claims the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub fence: Fence,
    /// The previous owner released the partition with nothing in flight (or there was none).
    /// When false it died or lost its lease, and deliveries it fetched but did not ack may
    /// still be out: the bus returns them only after `ack_wait`, and the new owner must apply
    /// them before anything later of the partition (issue 14, item 1).
    pub clean_handover: bool,
}

/// Claim partition `partition` for a new owner that just took its lease with the kernel's
/// fencing token `lease_token`, and return the token to write with: the lease's own token
/// when it is newer than the stored one (the normal case), else one above the stored token
/// (the key-value store lost its counter, e.g. the embedded store after a restart). The
/// stored token only ever grows, so every previous owner's writes are refused from now on.
/// The claim also says whether the previous owner handed over cleanly ([`release_partition`]).
pub async fn claim_partition(
    db: &DatabaseConnection,
    partition: i32,
    lease_token: u64,
    owner: &str,
) -> Result<Claim, DbErr> {
    use sea_orm::sea_query::OnConflict;
    let txn = db.begin().await?;
    let row = partition_owner::ActiveModel {
        partition_id: Set(partition),
        token: Set(0),
        owner: Set(owner.to_owned()),
        claimed_at_ms: Set(now_ms()),
        // A partition never owned before has nothing in flight.
        released_at_ms: Set(Some(now_ms())),
    };
    match partition_owner::Entity::insert(row)
        .on_conflict(
            OnConflict::column(partition_owner::Column::PartitionId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
    {
        Ok(_) | Err(DbErr::RecordNotInserted) => {}
        Err(e) => return Err(e),
    }
    // Lock the row (PostgreSQL) before reading it, so two claimers queue.
    partition_owner::Entity::update_many()
        .col_expr(
            partition_owner::Column::Token,
            Expr::col(partition_owner::Column::Token).into(),
        )
        .filter(partition_owner::Column::PartitionId.eq(partition))
        .exec(&txn)
        .await?;
    let row = partition_owner::Entity::find_by_id(partition)
        .one(&txn)
        .await?;
    let stored = row.as_ref().map(|r| r.token).unwrap_or(0);
    let clean_handover = row.is_none_or(|r| r.released_at_ms.is_some());
    let token = i64::try_from(lease_token)
        .unwrap_or(i64::MAX)
        .max(stored.saturating_add(1));
    partition_owner::Entity::update_many()
        .col_expr(partition_owner::Column::Token, Expr::value(token))
        .col_expr(
            partition_owner::Column::Owner,
            Expr::value(owner.to_owned()),
        )
        .col_expr(partition_owner::Column::ClaimedAtMs, Expr::value(now_ms()))
        .col_expr(
            partition_owner::Column::ReleasedAtMs,
            Expr::value(Option::<i64>::None),
        )
        .filter(partition_owner::Column::PartitionId.eq(partition))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(Claim {
        fence: Fence { partition, token },
        clean_handover,
    })
}

/// Record that the owner holding `fence` stopped with nothing in flight: every delivery it
/// fetched was acked or handed back to the bus (which redelivers those first). The next claim
/// then starts at once instead of waiting out `ack_wait`. Fenced: an owner whose lease was
/// taken over records nothing. True when recorded.
pub async fn release_partition(db: &DatabaseConnection, fence: &Fence) -> Result<bool, DbErr> {
    let r = partition_owner::Entity::update_many()
        .col_expr(
            partition_owner::Column::ReleasedAtMs,
            Expr::value(Some(now_ms())),
        )
        .filter(partition_owner::Column::PartitionId.eq(fence.partition))
        .filter(partition_owner::Column::Token.eq(fence.token))
        .exec(db)
        .await?;
    Ok(r.rows_affected == 1)
}

/// The current token of `partition`'s owner, if it was ever claimed.
pub async fn partition_token(
    db: &DatabaseConnection,
    partition: i32,
) -> Result<Option<i64>, DbErr> {
    Ok(partition_owner::Entity::find_by_id(partition)
        .one(db)
        .await?
        .map(|r| r.token))
}

/// The fence check, first in a worker's transaction: a compare-and-set of the partition's
/// token (to itself) that matches only while `fence` is the current owner's. It also takes the
/// partition row's lock, so an owner's transaction and a new owner's claim are ordered.
async fn check_fence(txn: &sea_orm::DatabaseTransaction, fence: &Fence) -> Result<(), ApplyError> {
    let r = partition_owner::Entity::update_many()
        .col_expr(
            partition_owner::Column::Token,
            Expr::col(partition_owner::Column::Token).into(),
        )
        .filter(partition_owner::Column::PartitionId.eq(fence.partition))
        .filter(partition_owner::Column::Token.eq(fence.token))
        .exec(txn)
        .await?;
    if r.rows_affected == 1 {
        Ok(())
    } else {
        Err(ApplyError::Fenced {
            partition: fence.partition,
            token: fence.token,
        })
    }
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A validated auction to create.
#[derive(Debug, Clone)]
pub struct NewAuction {
    pub title: String,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub start_price: i64,
    pub reserve: Option<i64>,
    pub min_increment: i64,
    pub soft_close_window_ms: i64,
    pub soft_close_extension_ms: i64,
}

pub async fn create(db: &DatabaseConnection, n: NewAuction) -> Result<auction::Model, DbErr> {
    let model = auction::ActiveModel {
        title: Set(n.title),
        starts_at_ms: Set(n.starts_at_ms),
        ends_at_ms: Set(n.ends_at_ms),
        scheduled_end_ms: Set(n.ends_at_ms),
        start_price: Set(n.start_price),
        reserve: Set(n.reserve),
        min_increment: Set(n.min_increment),
        soft_close_window_ms: Set(n.soft_close_window_ms),
        soft_close_extension_ms: Set(n.soft_close_extension_ms),
        status: Set("open".into()),
        version: Set(0),
        seq: Set(0),
        highest_amount: Set(None),
        highest_bidder: Set(None),
        highest_bid_id: Set(None),
        bid_count: Set(0),
        created_at_ms: Set(now_ms()),
        ..Default::default()
    };
    model.insert(db).await
}

pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<Option<auction::Model>, DbErr> {
    auction::Entity::find_by_id(id).one(db).await
}

/// Auctions by ascending id after `after`, optionally only those with `status`.
pub async fn list(
    db: &DatabaseConnection,
    status: Option<&str>,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<auction::Model>, DbErr> {
    let mut q = auction::Entity::find().order_by_asc(auction::Column::Id);
    if let Some(s) = status {
        q = q.filter(auction::Column::Status.eq(s));
    }
    if let Some(a) = after {
        q = q.filter(auction::Column::Id.gt(a));
    }
    q.limit(limit).all(db).await
}

/// Accepted and rejected bids of an auction, newest first, before bid id `before`.
pub async fn bids_page(
    db: &DatabaseConnection,
    auction_id: i64,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<bid::Model>, DbErr> {
    let mut q = bid::Entity::find()
        .filter(bid::Column::AuctionId.eq(auction_id))
        .order_by_desc(bid::Column::Id);
    if let Some(b) = before {
        q = q.filter(bid::Column::Id.lt(b));
    }
    q.limit(limit).all(db).await
}

pub async fn result(db: &DatabaseConnection, id: i64) -> Result<Option<result::Model>, DbErr> {
    result::Entity::find_by_id(id).one(db).await
}

pub fn display_status(a: &auction::Model, now: i64) -> &'static str {
    if a.status == "closed" {
        "closed"
    } else if now < a.starts_at_ms {
        "scheduled"
    } else {
        "open"
    }
}

fn result_view(r: result::Model) -> ResultView {
    ResultView {
        winner: r.winner,
        amount: r.amount,
        reserve_met: r.reserve_met,
        closed_at_ms: r.closed_at_ms,
    }
}

/// The full room state (A10), read in one transaction so bids and `seq` agree.
pub async fn state(db: &DatabaseConnection, id: i64, bids: u64) -> Result<Option<State>, DbErr> {
    let txn = db.begin().await?;
    let Some(a) = get(&txn, id).await? else {
        return Ok(None);
    };
    let recent = bid::Entity::find()
        .filter(bid::Column::AuctionId.eq(id))
        .filter(bid::Column::Outcome.eq(Outcome::Accepted.as_str()))
        .order_by_desc(bid::Column::Id)
        .limit(bids)
        .all(&txn)
        .await?;
    let res = result::Entity::find_by_id(id).one(&txn).await?;
    txn.commit().await?;
    let now = now_ms();
    Ok(Some(State {
        auction_id: a.id,
        title: a.title.clone(),
        status: display_status(&a, now).into(),
        starts_at_ms: a.starts_at_ms,
        ends_at_ms: a.ends_at_ms,
        server_now_ms: now,
        start_price: a.start_price,
        min_increment: a.min_increment,
        min_next: min_next(&a),
        reserve_met: reserve_met(&a),
        highest: match (a.highest_amount, a.highest_bidder.clone()) {
            (Some(amount), Some(bidder)) => Some(Highest { amount, bidder }),
            _ => None,
        },
        bid_count: a.bid_count,
        bids: recent
            .into_iter()
            .map(|b| PlacedBid {
                seq: b.seq.unwrap_or_default(),
                amount: b.amount,
                bidder: b.bidder,
                received_at_ms: b.received_at_ms,
            })
            .collect(),
        seq: a.seq,
        result: res.map(result_view),
    }))
}

fn reserve_met(a: &auction::Model) -> bool {
    match (a.highest_amount, a.reserve) {
        (Some(h), Some(r)) => h >= r,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A bid command as the worker applies it.
#[derive(Debug, Clone)]
pub struct BidCommand {
    pub auction_id: i64,
    pub bidder: String,
    pub client_bid_id: String,
    pub amount: i64,
    pub received_at_ms: i64,
    pub stream_seq: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum Applied {
    /// First time this bid was seen: its judgement and the room messages it caused.
    Fresh {
        judgement: Judgement,
        room: Vec<ServerMsg>,
    },
    /// The bid was applied before (a redelivery or a resend after the stream's duplicate
    /// window): its original judgement, nothing applied again.
    Duplicate(Judgement),
    /// No such auction; the bid cannot ever be applied.
    UnknownAuction,
}

impl From<Decision> for Applied {
    fn from(d: Decision) -> Self {
        match d {
            Decision::Fresh {
                judgement, room, ..
            } => Applied::Fresh { judgement, room },
            Decision::Duplicate(j) => Applied::Duplicate(j),
        }
    }
}

/// Begin a write transaction on auction `id`: check the partition `fence` (when the caller is a
/// partition owner), then write to the auction's row: PostgreSQL then
/// holds the row lock (writers of one auction queue instead of failing the version check),
/// and SQLite takes its write lock before the transaction has read anything, so the busy
/// timeout applies instead of an immediate `SQLITE_BUSY_SNAPSHOT`.
async fn begin_on(
    db: &DatabaseConnection,
    fence: Option<&Fence>,
    id: i64,
) -> Result<sea_orm::DatabaseTransaction, ApplyError> {
    let txn = db.begin().await?;
    if let Some(f) = fence
        && let Err(e) = check_fence(&txn, f).await
    {
        txn.rollback().await?;
        return Err(e);
    }
    auction::Entity::update_many()
        .col_expr(
            auction::Column::Version,
            Expr::col(auction::Column::Version).into(),
        )
        .filter(auction::Column::Id.eq(id))
        .exec(&txn)
        .await?;
    Ok(txn)
}

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

async fn existing_bid(
    db: &impl ConnectionTrait,
    cmd: &BidCommand,
) -> Result<Option<bid::Model>, DbErr> {
    bid::Entity::find()
        .filter(bid::Column::AuctionId.eq(cmd.auction_id))
        .filter(bid::Column::Bidder.eq(cmd.bidder.as_str()))
        .filter(bid::Column::ClientBidId.eq(cmd.client_bid_id.as_str()))
        .one(db)
        .await
}

/// Apply one bid exactly once (A6, A7). See [`apply_bids`].
pub async fn apply_bid(
    db: &DatabaseConnection,
    fence: Option<&Fence>,
    cmd: &BidCommand,
) -> Result<Applied, ApplyError> {
    let mut out = apply_bids(db, fence, std::slice::from_ref(cmd)).await?;
    out.pop()
        .ok_or_else(|| DbErr::Custom("apply_bids returned nothing".into()).into())
}

/// Apply a run of bids on **one** auction, in order, exactly once each (A6, A7), in one
/// transaction: the bids already stored are looked up by their unique client id,
/// [`decide_run`] judges the run against the auction row, the new bids are inserted under
/// that key, and the auction row (highest, seq, soft-close end) is written once at the end
/// with a compare-and-set on its version. One commit for the run is what lets a hot
/// auction take hundreds of bids per second on one ordered partition.
///
/// Every command must name the same auction (the caller groups them). With a `fence`, the
/// transaction first checks that the caller still owns the partition; an older owner's run is
/// refused with [`ApplyError::Fenced`] and writes nothing.
pub async fn apply_bids(
    db: &DatabaseConnection,
    fence: Option<&Fence>,
    cmds: &[BidCommand],
) -> Result<Vec<Applied>, ApplyError> {
    let Some(first) = cmds.first() else {
        return Ok(Vec::new());
    };
    let auction_id = first.auction_id;
    if cmds.iter().any(|c| c.auction_id != auction_id) {
        return Err(DbErr::Custom("apply_bids: one auction per run".into()).into());
    }
    'attempt: for _ in 0..CAS_ATTEMPTS {
        let txn = begin_on(db, fence, auction_id).await?;
        let Some(start) = get(&txn, auction_id).await? else {
            txn.rollback().await?;
            return Ok(cmds.iter().map(|_| Applied::UnknownAuction).collect());
        };
        let mut bids = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let stored = existing_bid(&txn, cmd).await?.map(|b| Stored {
                outcome: Outcome::parse(&b.outcome).unwrap_or(Outcome::TooLow),
                reason: b.reason,
            });
            bids.push((cmd, stored));
        }
        let Run {
            decisions,
            state: mut a,
            highest,
        } = decide_run(&start, &bids);
        for (i, (cmd, decision)) in cmds.iter().zip(&decisions).enumerate() {
            let Decision::Fresh { judgement, seq, .. } = decision else {
                continue;
            };
            let inserted = bid::ActiveModel {
                auction_id: Set(cmd.auction_id),
                bidder: Set(cmd.bidder.clone()),
                client_bid_id: Set(cmd.client_bid_id.clone()),
                amount: Set(cmd.amount),
                received_at_ms: Set(cmd.received_at_ms),
                processed_at_ms: Set(now_ms()),
                outcome: Set(judgement.outcome.as_str().into()),
                reason: Set(judgement.reason.clone()),
                seq: Set(*seq),
                stream_seq: Set(cmd.stream_seq),
                ..Default::default()
            }
            .insert(&txn)
            .await;
            match inserted {
                Ok(b) if highest == Some(i) => a.highest_bid_id = Some(b.id),
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    // Another process applied one of these bids meanwhile: start over; the
                    // duplicate check will see it.
                    txn.rollback().await?;
                    continue 'attempt;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if a != start {
            let updated = auction::Entity::update_many()
                .col_expr(auction::Column::Version, Expr::value(start.version + 1))
                .col_expr(auction::Column::Seq, Expr::value(a.seq))
                .col_expr(auction::Column::EndsAtMs, Expr::value(a.ends_at_ms))
                .col_expr(
                    auction::Column::HighestAmount,
                    Expr::value(a.highest_amount),
                )
                .col_expr(
                    auction::Column::HighestBidder,
                    Expr::value(a.highest_bidder.clone()),
                )
                .col_expr(auction::Column::HighestBidId, Expr::value(a.highest_bid_id))
                .col_expr(auction::Column::BidCount, Expr::value(a.bid_count))
                .filter(auction::Column::Id.eq(auction_id))
                .filter(auction::Column::Version.eq(start.version))
                .filter(auction::Column::Status.eq("open"))
                .exec(&txn)
                .await?;
            if updated.rows_affected != 1 {
                txn.rollback().await?;
                continue;
            }
        }
        txn.commit().await?;
        return Ok(decisions.into_iter().map(Applied::from).collect());
    }
    Err(DbErr::Custom(format!(
        "auction {auction_id}: lost the version race {CAS_ATTEMPTS} times"
    ))
    .into())
}

/// What a close command did.
#[derive(Debug, Clone)]
pub enum Closed {
    /// This call closed the auction and wrote its result; broadcast the message.
    Now(ServerMsg),
    /// It was closed before (another scheduler, a redelivery): the original result.
    Already(ServerMsg),
    /// A late bid extended the end past this command's `ends_at`; a later command will close.
    NotDue,
    UnknownAuction,
}

fn closed_msg(seq: i64, r: &result::Model) -> ServerMsg {
    ServerMsg::Closed {
        seq,
        winner: r.winner.clone(),
        amount: r.amount,
        reserve_met: r.reserve_met,
    }
}

/// Close an auction whose end is `ends_at_ms`, exactly once (A8): one conditional update of
/// the status and the result row (primary key = auction id) in one transaction, fenced like
/// [`apply_bids`].
pub async fn close(
    db: &DatabaseConnection,
    fence: Option<&Fence>,
    auction_id: i64,
    ends_at_ms: i64,
) -> Result<Closed, ApplyError> {
    for _ in 0..CAS_ATTEMPTS {
        let txn = begin_on(db, fence, auction_id).await?;
        let Some(a) = get(&txn, auction_id).await? else {
            return Ok(Closed::UnknownAuction);
        };
        if a.status == "closed" {
            let r = result::Entity::find_by_id(auction_id).one(&txn).await?;
            txn.commit().await?;
            return Ok(match r {
                Some(r) => Closed::Already(closed_msg(a.seq, &r)),
                None => Closed::NotDue,
            });
        }
        if a.ends_at_ms > ends_at_ms || a.ends_at_ms > now_ms() {
            txn.commit().await?;
            return Ok(Closed::NotDue);
        }
        let met = reserve_met(&a);
        let r = result::Model {
            auction_id,
            winner: if met { a.highest_bidder.clone() } else { None },
            amount: if met { a.highest_amount } else { None },
            bid_id: if met { a.highest_bid_id } else { None },
            reserve_met: met,
            closed_at_ms: now_ms(),
        };
        let seq = a.seq + 1;
        let updated = auction::Entity::update_many()
            .col_expr(auction::Column::Status, Expr::value("closed"))
            .col_expr(auction::Column::Version, Expr::value(a.version + 1))
            .col_expr(auction::Column::Seq, Expr::value(seq))
            .filter(auction::Column::Id.eq(auction_id))
            .filter(auction::Column::Version.eq(a.version))
            .filter(auction::Column::Status.eq("open"))
            .exec(&txn)
            .await?;
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            continue;
        }
        let am: result::ActiveModel = r.clone().into();
        match am.insert(&txn).await {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                txn.rollback().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        txn.commit().await?;
        return Ok(Closed::Now(closed_msg(seq, &r)));
    }
    Err(DbErr::Custom(format!(
        "auction {auction_id}: close lost the version race {CAS_ATTEMPTS} times"
    ))
    .into())
}

/// One page of the open auctions whose end passed before `cutoff_ms`, as `(id, ends_at_ms)`,
/// in `(ends_at_ms, id)` order after the key `after` (keyset paging: the scheduler reads every
/// due auction each tick, however many there are).
pub async fn due(
    db: &DatabaseConnection,
    cutoff_ms: i64,
    after: Option<(i64, i64)>,
    limit: u64,
) -> Result<Vec<(i64, i64)>, DbErr> {
    use sea_orm::Condition;
    let mut q = auction::Entity::find()
        .filter(auction::Column::Status.eq("open"))
        .filter(auction::Column::EndsAtMs.lte(cutoff_ms));
    if let Some((ends_at, id)) = after {
        q = q.filter(
            Condition::any()
                .add(auction::Column::EndsAtMs.gt(ends_at))
                .add(
                    Condition::all()
                        .add(auction::Column::EndsAtMs.eq(ends_at))
                        .add(auction::Column::Id.gt(id)),
                ),
        );
    }
    Ok(q.order_by_asc(auction::Column::EndsAtMs)
        .order_by_asc(auction::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|a| (a.id, a.ends_at_ms))
        .collect())
}

/// A stored bid by its client id.
pub async fn find_bid(
    db: &DatabaseConnection,
    auction_id: i64,
    bidder: &str,
    client_bid_id: &str,
) -> Result<Option<bid::Model>, DbErr> {
    bid::Entity::find()
        .filter(bid::Column::AuctionId.eq(auction_id))
        .filter(bid::Column::Bidder.eq(bidder))
        .filter(bid::Column::ClientBidId.eq(client_bid_id))
        .one(db)
        .await
}
