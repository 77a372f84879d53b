//! The `auction` module: real-time WebSocket bidding that never loses an acknowledged bid
//! (A1–A11). See docs/auction.md for the design and docs/protocol/auction.md for the socket.
//!
//! * [`gateway`] — one task per socket: validates, stamps and stores bids in JetStream
//!   before it ACKs; sends the full `state` on every (re)connect.
//! * [`worker`] — applies bids in order per auction, once each, in one transaction; the
//!   scheduler closes auctions exactly once; every web instance fans room messages out.
//! * [`store`] — the database side; [`protocol`] — the messages.

pub mod api;
pub mod config;
pub mod entity;
pub mod gateway;
pub mod hub;
pub mod protocol;
pub mod store;
pub mod worker;

#[cfg(feature = "client")]
pub mod client;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use bulwark_kernel::auth::Role;
use bulwark_kernel::bus::{Bus, StreamSpec};
use bulwark_kernel::config::{ConfigError, Section, Settings};
use bulwark_kernel::home::Page;
use bulwark_kernel::kv::KvStore;
use bulwark_kernel::module::{
    Context, Module, ModuleError, ModuleParts, Worker, WorkerKind, status_route,
};
use bulwark_kernel::shutdown::Shutdown;

pub use config::AuctionConfig;

/// The durable stream of bids and close commands.
pub const STREAM: &str = "AUCTION_BIDS";

/// What the gateway, worker and API share.
pub struct AuctionShared {
    pub cfg: AuctionConfig,
    pub db: sea_orm::DatabaseConnection,
    pub bus: Arc<dyn Bus>,
    pub kv: Arc<dyn KvStore>,
    pub hub: hub::Hub,
    pub shutdown: Shutdown,
    pub limiter: gateway::RateLimiter,
    /// This process, in presence entries.
    pub instance: String,
}

impl AuctionShared {
    /// The ordered partition subject of an auction's bids.
    pub fn bid_subject(&self, auction_id: i64) -> String {
        let p = auction_id.rem_euclid(i64::from(self.cfg.partitions));
        format!("auction.bids.{p}.{auction_id}")
    }
}

/// The ephemeral subject of an auction's room messages.
pub fn room_subject(auction_id: i64) -> String {
    format!("auction.room.{auction_id}")
}

/// The presence set of an auction's room.
pub fn presence_set(auction_id: i64) -> String {
    format!("auction:presence:{auction_id}")
}

/// `Nats-Msg-Id` of a bid: the client's id, scoped to auction and bidder so that one client's
/// id can never shadow another bidder's bid.
pub fn bid_message_id(auction_id: i64, bidder: &str, id: &str) -> String {
    format!("bid.{auction_id}.{}.{id}", bidder.escape_default())
}

/// Metric descriptions (names are the dashboard's and alerts' contract).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bulwark_auction_messages_total",
        "WebSocket messages by direction (in|out) and type."
    );
    describe_histogram!(
        "bulwark_auction_bid_ack_seconds",
        Unit::Seconds,
        "From a bid frame's arrival to its ack (stored in JetStream)."
    );
    describe_histogram!(
        "bulwark_auction_bid_apply_seconds",
        Unit::Seconds,
        "Time to apply one bid in the database (worker)."
    );
    describe_histogram!(
        "bulwark_auction_bid_broadcast_seconds",
        Unit::Seconds,
        "From a bid's received_at to its bid_placed reaching a web instance."
    );
    describe_counter!(
        "bulwark_auction_bids_total",
        "Bids applied by the worker, by outcome."
    );
    describe_counter!(
        "bulwark_auction_duplicates_total",
        "Resent bids recognised, by layer (stream: JetStream's window; database: unique key)."
    );
    describe_counter!(
        "bulwark_auction_rejections_total",
        "Bid and protocol messages refused by the gateway, by reason."
    );
    describe_counter!(
        "bulwark_auction_redeliveries_total",
        "Bid deliveries after the first (a worker crashed or failed before ack)."
    );
    describe_counter!(
        "bulwark_auction_resyncs_total",
        "Fresh states sent because a socket lagged or saw a gap, by cause."
    );
    describe_counter!(
        "bulwark_auction_slow_clients_total",
        "Sockets closed because the client did not read (4008)."
    );
    describe_counter!(
        "bulwark_auction_closed_total",
        "Auctions closed by this process."
    );
    describe_counter!("bulwark_auction_created_total", "Auctions created.");
    describe_counter!(
        "bulwark_auction_apply_retries_total",
        "Failed applications of a run or close, retried in place before anything later of its partition."
    );
    describe_counter!(
        "bulwark_auction_handover_waits_total",
        "Partition take-overs that waited ack_wait for a dead owner's unsettled deliveries before fetching."
    );
    describe_counter!(
        "bulwark_auction_fenced_total",
        "Writes refused because a newer owner claimed the partition (this worker's lease ran out)."
    );
    describe_counter!(
        "bulwark_auction_close_commands_total",
        "Close commands the scheduler published."
    );
    describe_gauge!(
        "bulwark_auction_partitions_owned",
        "Bid partitions this worker process owns."
    );
    // Series exist from the start (at 0), so dashboards and alerts see a rate of 0, not
    // "no data", and a scrape shows every name.
    use metrics::counter;
    for name in [
        "bulwark_auction_redeliveries_total",
        "bulwark_auction_slow_clients_total",
        "bulwark_auction_closed_total",
        "bulwark_auction_created_total",
        "bulwark_auction_close_commands_total",
        "bulwark_auction_apply_retries_total",
        "bulwark_auction_fenced_total",
        "bulwark_auction_handover_waits_total",
    ] {
        counter!(name).increment(0);
    }
    for cause in ["lagged", "gap"] {
        counter!("bulwark_auction_resyncs_total", "cause" => cause).increment(0);
    }
    for layer in ["stream", "database"] {
        counter!("bulwark_auction_duplicates_total", "layer" => layer).increment(0);
    }
    for outcome in ["accepted", "too_low", "closed", "not_started"] {
        counter!("bulwark_auction_bids_total", "outcome" => outcome).increment(0);
    }
    for reason in [
        "bad_message",
        "invalid_bid",
        "forbidden",
        "rate_limited",
        "unavailable",
    ] {
        counter!("bulwark_auction_rejections_total", "reason" => reason).increment(0);
    }
}

/// The module value the app registers.
pub struct AuctionModule;

#[async_trait::async_trait]
impl Module for AuctionModule {
    fn name(&self) -> &'static str {
        "auction"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<AuctionConfig>(self.name())?
            .effective)
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let Section {
            value: cfg,
            effective,
        } = ctx.section::<AuctionConfig>()?;
        describe_metrics();
        ctx.bus
            .ensure_stream(&StreamSpec {
                name: STREAM.into(),
                subjects: vec!["auction.bids.>".into()],
                duplicate_window: ctx.settings.kernel.bus.duplicate_window,
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            })
            .await?;
        let inner = Arc::new(AuctionShared {
            hub: hub::Hub::new(cfg.room_buffer),
            cfg,
            db: ctx.db.clone(),
            bus: ctx.bus.clone(),
            kv: ctx.kv.clone(),
            shutdown: ctx.shutdown.clone(),
            limiter: gateway::RateLimiter::default(),
            instance: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        });
        let (status, mut openapi) = status_route(self.name(), effective);
        openapi.merge(<api::AuctionApi as utoipa::OpenApi>::openapi());
        let routes = axum::Router::new()
            .route("/api/auction/auctions", get(api::list).post(api::create))
            .route("/api/auction/auctions/{id}", get(api::get_one))
            .route("/api/auction/auctions/{id}/state", get(api::state))
            .route("/api/auction/auctions/{id}/bids", get(api::bids))
            .route("/api/auction/auctions/{id}/result", get(api::result))
            .route("/api/auction/auctions/{id}/presence", get(api::presence))
            .route("/ws/auction/{id}", get(api::socket))
            .route("/auction/{id}", get(api::page))
            .with_state(inner.clone())
            .merge(status);
        let sd = &ctx.shutdown;
        let workers = vec![
            Worker {
                name: "auction-room-fanout".into(),
                kind: WorkerKind::Web,
                run: Box::pin(worker::fan_out(inner.clone(), sd.closing_token())),
            },
            Worker {
                name: "auction-bid-worker".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(worker::run(
                    inner.clone(),
                    sd.closing_token(),
                    sd.deadline_token(),
                )),
            },
            Worker {
                name: "auction-scheduler".into(),
                kind: WorkerKind::Scheduler,
                run: Box::pin(worker::schedule(inner, sd.closing_token())),
            },
        ];
        let room = Page::new(
            "Auction room",
            "/auction/{id}?token=TOKEN",
            "Bid and watch one auction live, with a countdown from the server clock. Fill in an \
             auction id (GET /api/auction/auctions lists them; try it in the API docs) and a \
             token: bidder to bid, viewer to watch. The page keeps the token for the tab and \
             removes it from the address bar.",
        )
        .role(Role::Viewer);
        Ok(ModuleParts {
            routes,
            openapi,
            workers,
            pages: vec![room],
            ..ModuleParts::default()
        })
    }
}
