//! REST surface (utoipa-documented): auctions, state, bid history, result, presence.

use std::sync::Arc;

use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use bulwark_kernel::auth::{Auth, Identity, Role, require};
use bulwark_kernel::http::{ApiJson, ApiPath, ApiQuery, Bounded, Limit, Text};
use bulwark_kernel::problem::Problem;
use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::entity::{auction, bid};
use crate::protocol::{Highest, ResultView, State as RoomState};
use crate::{AuctionShared, store};

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn db_problem(e: sea_orm::DbErr) -> Problem {
    tracing::warn!(message = "Auction database error.", error = %e);
    Problem::unavailable("the auction store is unavailable")
}

/// The largest amount of money (10^15 minor units).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;
/// An amount of money in minor units: 0 to [`MAX_AMOUNT`].
pub type Amount = Bounded<0, MAX_AMOUNT>;
/// The smallest step between bids: 1 to [`MAX_AMOUNT`].
pub type Increment = Bounded<1, MAX_AMOUNT>;
/// The longest soft-close window or extension, in seconds (a day).
pub const MAX_SOFT_CLOSE_SECONDS: i64 = 86_400;
/// A soft-close window or extension: 0 to [`MAX_SOFT_CLOSE_SECONDS`].
pub type SoftCloseSeconds = Bounded<0, MAX_SOFT_CLOSE_SECONDS>;

/// An auction to create. Money in integer minor units (e.g. cents). Every field's range is
/// checked as it is deserialized, from the same types that document it; what JSON Schema
/// cannot say is checked after: `ends_at` after `starts_at` and in the future, and the two
/// soft-close settings both set or both 0 (400 naming the field).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAuction {
    /// 1 to 200 characters, not blank (stored without blank ends).
    #[schema(inline)]
    pub title: Text<200>,
    /// Default: now.
    pub starts_at: Option<DateTime<Utc>>,
    /// After `starts_at`, and in the future.
    pub ends_at: DateTime<Utc>,
    /// The lowest first bid (default 0).
    #[serde(default)]
    #[schema(inline)]
    pub start_price: Amount,
    /// Hidden minimum for a sale; shown only to admins.
    #[schema(inline)]
    pub reserve: Option<Amount>,
    /// Each bid must beat the highest by at least this much (default 1).
    #[serde(default)]
    #[schema(inline)]
    pub min_increment: Increment,
    /// A bid this close to the end extends the auction (soft close); 0 (the default) disables.
    /// Set together with `soft_close_extension_seconds`.
    #[serde(default)]
    #[schema(inline)]
    pub soft_close_window_seconds: SoftCloseSeconds,
    /// ... to the bid's time plus this; 0 (the default) when soft close is disabled.
    #[serde(default)]
    #[schema(inline)]
    pub soft_close_extension_seconds: SoftCloseSeconds,
}

impl CreateAuction {
    fn validate(self, now: i64) -> Result<store::NewAuction, Problem> {
        let bad = |field: &str, m: &str| {
            Err(Problem::bad_request(format!("{field}: {m}"))
                .extension("field", serde_json::json!(field)))
        };
        let starts = self.starts_at.map_or(now, |t| t.timestamp_millis());
        let ends = self.ends_at.timestamp_millis();
        if ends <= starts {
            return bad("ends_at", "must be after starts_at");
        }
        if ends <= now {
            return bad("ends_at", "must be in the future");
        }
        let (window, extension) = (
            self.soft_close_window_seconds.get(),
            self.soft_close_extension_seconds.get(),
        );
        if (window == 0) != (extension == 0) {
            return bad(
                "soft_close_extension_seconds",
                "set both soft_close_window_seconds and soft_close_extension_seconds, or neither",
            );
        }
        Ok(store::NewAuction {
            title: self.title.into_string(),
            starts_at_ms: starts,
            ends_at_ms: ends,
            start_price: self.start_price.get(),
            reserve: self.reserve.map(Bounded::get),
            min_increment: self.min_increment.get(),
            soft_close_window_ms: window * 1000,
            soft_close_extension_ms: extension * 1000,
        })
    }
}

/// Where an auction is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuctionStatus {
    /// Before `starts_at`.
    Scheduled,
    Open,
    Closed,
}

impl AuctionStatus {
    fn of(a: &auction::Model, now: i64) -> Self {
        match store::display_status(a, now) {
            "closed" => Self::Closed,
            "scheduled" => Self::Scheduled,
            _ => Self::Open,
        }
    }
}

/// An auction as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuctionView {
    pub id: i64,
    pub title: String,
    pub status: AuctionStatus,
    pub starts_at: DateTime<Utc>,
    /// Current end (moved by soft-close extensions).
    pub ends_at: DateTime<Utc>,
    /// The end as created.
    pub scheduled_end: DateTime<Utc>,
    pub start_price: i64,
    /// Only for admins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserve: Option<i64>,
    pub min_increment: i64,
    pub soft_close_window_seconds: i64,
    pub soft_close_extension_seconds: i64,
    pub highest: Option<Highest>,
    pub bid_count: i64,
    pub seq: i64,
    pub created_at: DateTime<Utc>,
}

fn view(a: auction::Model, who: &Identity) -> AuctionView {
    let now = store::now_ms();
    AuctionView {
        status: AuctionStatus::of(&a, now),
        id: a.id,
        title: a.title,
        starts_at: at(a.starts_at_ms),
        ends_at: at(a.ends_at_ms),
        scheduled_end: at(a.scheduled_end_ms),
        start_price: a.start_price,
        reserve: if who.has(Role::Admin) {
            a.reserve
        } else {
            None
        },
        min_increment: a.min_increment,
        soft_close_window_seconds: a.soft_close_window_ms / 1000,
        soft_close_extension_seconds: a.soft_close_extension_ms / 1000,
        highest: match (a.highest_amount, a.highest_bidder) {
            (Some(amount), Some(bidder)) => Some(Highest { amount, bidder }),
            _ => None,
        },
        bid_count: a.bid_count,
        seq: a.seq,
        created_at: at(a.created_at_ms),
    }
}

pub type Shared = Arc<AuctionShared>;

/// Create an auction (role admin).
#[utoipa::path(post, path = "/api/auction/auctions", tag = "auction", security(("bearer" = [])),
    request_body = CreateAuction,
    responses(
        (status = 201, description = "Created", body = AuctionView),
        (status = 400, description = "Invalid field (named in `field`)"),
        (status = 403, description = "Role admin required"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn create(
    auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiJson(req): ApiJson<CreateAuction>,
) -> Result<(axum::http::StatusCode, axum::Json<AuctionView>), Problem> {
    let new = req.validate(store::now_ms())?;
    let a = store::create(&s.db, new).await.map_err(db_problem)?;
    metrics::counter!("bulwark_auction_created_total").increment(1);
    Ok((axum::http::StatusCode::CREATED, axum::Json(view(a, &auth))))
}

/// The statuses `GET /api/auction/auctions` filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListStatus {
    Open,
    Closed,
}

impl ListStatus {
    fn as_str(self) -> &'static str {
        match self {
            ListStatus::Open => "open",
            ListStatus::Closed => "closed",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only auctions with this status.
    #[param(inline)]
    pub status: Option<ListStatus>,
    /// Cursor: the last id of the previous page.
    pub after: Option<i64>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

/// A page of results with the cursor of the next page.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` (auctions) or `before` (bids); absent on the last page.
    pub next: Option<i64>,
}

/// List auctions by id (role viewer), keyset-paginated.
#[utoipa::path(get, path = "/api/auction/auctions", tag = "auction", security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of auctions", body = Page<AuctionView>),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn list(
    auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<axum::Json<Page<AuctionView>>, Problem> {
    let limit = p.limit.get();
    let status = p.status.map(ListStatus::as_str);
    let rows = store::list(&s.db, status, p.after, limit)
        .await
        .map_err(db_problem)?;
    let next = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|a| a.id))
        .flatten();
    Ok(axum::Json(Page {
        items: rows.into_iter().map(|a| view(a, &auth)).collect(),
        next,
    }))
}

async fn find(s: &AuctionShared, id: i64) -> Result<auction::Model, Problem> {
    store::get(&s.db, id)
        .await
        .map_err(db_problem)?
        .ok_or_else(|| Problem::not_found(format!("no auction {id}")))
}

/// One auction (role viewer).
#[utoipa::path(get, path = "/api/auction/auctions/{id}", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id")),
    responses(
        (status = 200, description = "The auction", body = AuctionView),
        (status = 404, description = "No such auction"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn get_one(
    auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<AuctionView>, Problem> {
    Ok(axum::Json(view(find(&s, id).await?, &auth)))
}

/// The room's full state, as sent on the socket (role viewer).
#[utoipa::path(get, path = "/api/auction/auctions/{id}/state", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id")),
    responses(
        (status = 200, description = "Full state", body = RoomState),
        (status = 404, description = "No such auction"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn state(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<RoomState>, Problem> {
    store::state(&s.db, id, u64::from(s.cfg.state_bids))
        .await
        .map_err(db_problem)?
        .map(axum::Json)
        .ok_or_else(|| Problem::not_found(format!("no auction {id}")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BidParams {
    /// Cursor: bids with a smaller id than this (the previous page's `next`).
    pub before: Option<i64>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

/// A stored bid with its outcome.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BidView {
    /// Server id (the pagination cursor).
    pub id: i64,
    /// The client's id of the bid.
    pub bid_id: String,
    pub bidder: String,
    pub amount: i64,
    pub received_at: DateTime<Utc>,
    pub outcome: String,
    pub reason: Option<String>,
    /// Room sequence of an accepted bid.
    pub seq: Option<i64>,
}

fn bid_view(b: bid::Model) -> BidView {
    BidView {
        id: b.id,
        bid_id: b.client_bid_id,
        bidder: b.bidder,
        amount: b.amount,
        received_at: at(b.received_at_ms),
        outcome: b.outcome,
        reason: b.reason,
        seq: b.seq,
    }
}

/// Bid history, newest first, keyset-paginated (role viewer).
#[utoipa::path(get, path = "/api/auction/auctions/{id}/bids", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id"), BidParams),
    responses(
        (status = 200, description = "A page of bids", body = Page<BidView>),
        (status = 404, description = "No such auction"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn bids(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(p): ApiQuery<BidParams>,
) -> Result<axum::Json<Page<BidView>>, Problem> {
    let limit = p.limit.get();
    find(&s, id).await?;
    let rows = store::bids_page(&s.db, id, p.before, limit)
        .await
        .map_err(db_problem)?;
    let next = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|b| b.id))
        .flatten();
    Ok(axum::Json(Page {
        items: rows.into_iter().map(bid_view).collect(),
        next,
    }))
}

/// The final result (role viewer); 404 until the auction is closed.
#[utoipa::path(get, path = "/api/auction/auctions/{id}/result", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id")),
    responses(
        (status = 200, description = "The result", body = ResultView),
        (status = 404, description = "No such auction, or not closed yet"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn result(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<ResultView>, Problem> {
    let r = store::result(&s.db, id)
        .await
        .map_err(db_problem)?
        .ok_or_else(|| Problem::not_found(format!("auction {id} has no result (yet)")))?;
    Ok(axum::Json(ResultView {
        winner: r.winner,
        amount: r.amount,
        reserve_met: r.reserve_met,
        closed_at_ms: r.closed_at_ms,
    }))
}

/// One live connection in a room.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceEntry {
    pub instance: String,
    pub connection: String,
    pub user: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Presence {
    pub auction_id: i64,
    pub connections: usize,
    pub users: usize,
    pub entries: Vec<PresenceEntry>,
}

/// Who is connected to a room, across every instance (role viewer). Entries of a crashed
/// instance disappear after `auction.presence_ttl`.
#[utoipa::path(get, path = "/api/auction/auctions/{id}/presence", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id")),
    responses(
        (status = 200, description = "Live connections", body = Presence),
        (status = 404, description = "No such auction"),
        (status = 503, description = "The auction store or the key-value store is unavailable")
))]
pub async fn presence(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<Presence>, Problem> {
    find(&s, id).await?;
    let members =
        s.kv.presence_members(&crate::presence_set(id))
            .await
            .map_err(|e| Problem::unavailable(e.to_string()))?;
    let entries: Vec<PresenceEntry> = members
        .iter()
        .filter_map(|m| {
            let mut parts = m.splitn(3, '/');
            Some(PresenceEntry {
                instance: parts.next()?.to_owned(),
                connection: parts.next()?.to_owned(),
                user: parts.next()?.to_owned(),
            })
        })
        .collect();
    let mut users: Vec<&str> = entries.iter().map(|e| e.user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    Ok(axum::Json(Presence {
        auction_id: id,
        connections: entries.len(),
        users: users.len(),
        entries,
    }))
}

/// The room socket (`?access_token=` at upgrade; viewers watch, bidders bid). Protocol:
/// docs/protocol/auction.md.
#[utoipa::path(get, path = "/ws/auction/{id}", tag = "auction", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Auction id")),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 400, description = "Invalid id, or not a WebSocket upgrade request"),
        (status = 401, description = "Missing or invalid token (header or `access_token`)"),
        (status = 404, description = "No such auction"),
        (status = 503, description = "The auction store is unavailable")
))]
pub async fn socket(
    auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(id): ApiPath<i64>,
    ws: WebSocketUpgrade,
) -> Result<Response, Problem> {
    find(&s, id).await?;
    let limits = bulwark_kernel::ws::SocketLimits {
        send_queue: s.cfg.send_queue,
        max_message_bytes: s.cfg.max_message_bytes,
    };
    let identity = auth.0;
    let inner = s.clone();
    Ok(bulwark_kernel::ws::serve(
        ws,
        &s.shutdown,
        "auction",
        limits,
        move |socket| crate::gateway::run(inner, id, identity, socket),
    ))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create, list, get_one, state, bids, result, presence, socket, page),
    components(schemas(CreateAuction, AuctionView, AuctionStatus, BidView, RoomState, ResultView, Highest,
        crate::protocol::PlacedBid, Presence, PresenceEntry, Page<AuctionView>, Page<BidView>))
)]
pub struct AuctionApi;

/// The browser client (A9, A10): bid, watch live bids, countdown from the server clock. The
/// token comes from `?token=` once and is kept in session storage.
#[utoipa::path(get, path = "/auction/{id}", tag = "auction",
    params(("id" = i64, Path, description = "Auction id")),
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
pub async fn page(ApiPath(_id): ApiPath<i64>) -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../assets/auction.html"))
}
