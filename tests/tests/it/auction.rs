//! The auction module end to end (A1–A11) against the real application, on the embedded
//! backend and — when the services run — on PostgreSQL + NATS JetStream + Redis.

use std::time::Duration;

use bulwark_auction::client::{AuctionClient, ClientConfig, View};
use bulwark_auction::protocol::{AckStatus, Outcome, ServerMsg};
use bulwark_kernel::auth::Role;
use bulwark_kernel::module::ProcessRole;
use bulwark_tests::{Backend, TestApp, TestAppBuilder};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

fn iso(offset_ms: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(offset_ms);
    t.to_rfc3339()
}

async fn app(backend: Backend) -> TestApp {
    builder(backend).start().await
}

fn builder(backend: Backend) -> TestAppBuilder {
    TestAppBuilder::new(backend)
        .set("auction.close_settle", "200ms")
        .set("auction.scheduler_interval", "100ms")
        .set("auction.partition_lease", "2s")
}

/// Create an auction ending in `ends_in_ms`; returns its id.
async fn create(app: &TestApp, ends_in_ms: i64, extra: Value) -> i64 {
    let mut body = json!({"title": "Lot 1", "ends_at": iso(ends_in_ms), "start_price": 100, "min_increment": 10});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let res = app
        .post_json(
            "/api/auction/auctions",
            Some(&app.token(Role::Admin)),
            &body,
        )
        .await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id")
}

fn client(app: &TestApp, id: i64, who: &str, role: Role) -> AuctionClient {
    AuctionClient::start(ClientConfig::new(
        app.ws_url(""),
        id,
        app.token_for(who, role),
    ))
}

/// The result of auction `id` once `app` reports it closed (read through the API, so through
/// the database: on the embedded backend another instance's room broadcasts are not heard).
async fn closed_result(app: &TestApp, id: i64, timeout: Duration) -> Value {
    let viewer = app.token(Role::Viewer);
    bulwark_tests::services::eventually(timeout, || async {
        let res = app
            .get(&format!("/api/auction/auctions/{id}/result"), Some(&viewer))
            .await;
        if res.status() != 200 {
            return None;
        }
        res.json::<Value>().await.ok()
    })
    .await
    .expect("closed in time")
}

async fn until(c: &AuctionClient, what: &str, pred: impl Fn(&View) -> bool) -> View {
    let (ok, v) = c.wait_until(WAIT, pred).await;
    assert!(ok, "timed out waiting for {what}; view: {:?}", v.log);
    v
}

fn highest(v: &View) -> Option<i64> {
    v.state.as_ref()?.highest.as_ref().map(|h| h.amount)
}

// ---------------------------------------------------------------- REST

#[tokio::test]
async fn rest_creates_lists_and_rejects_bad_input() {
    let app = app(Backend::Embedded).await;
    let admin = app.token(Role::Admin);
    let bidder = app.token(Role::Bidder);
    // A bidder may not create; nobody may create without a token.
    let body = json!({"title": "x", "ends_at": iso(60_000)});
    assert_eq!(
        app.post_json("/api/auction/auctions", Some(&bidder), &body)
            .await
            .status(),
        403
    );
    let res = app.post_json("/api/auction/auctions", None, &body).await;
    assert_eq!(res.status(), 401);
    // Bad input names the field and is problem+json.
    for (bad, field) in [
        (json!({"title": "", "ends_at": iso(60_000)}), "title"),
        (json!({"title": "x", "ends_at": iso(-1_000)}), "ends_at"),
        (
            json!({"title": "x", "ends_at": iso(60_000), "min_increment": 0}),
            "min_increment",
        ),
        (
            json!({"title": "x", "ends_at": iso(60_000), "start_price": -1}),
            "start_price",
        ),
        (
            json!({"title": "x", "ends_at": iso(60_000), "soft_close_window_seconds": 10}),
            "soft_close_extension_seconds",
        ),
    ] {
        let res = app
            .post_json("/api/auction/auctions", Some(&admin), &bad)
            .await;
        assert_eq!(res.status(), 400, "{bad}");
        assert_eq!(
            res.headers()["content-type"].to_str().expect("ct"),
            "application/problem+json"
        );
        let p: Value = res.json().await.expect("json");
        assert_eq!(p["field"], field, "{p}");
    }
    let res = app
        .post_json(
            "/api/auction/auctions",
            Some(&admin),
            &json!({"title": "x", "ends_at": iso(60_000), "price": 1}),
        )
        .await;
    assert_eq!(res.status(), 400, "unknown fields are refused");
    let res = app
        .post_json(
            "/api/auction/auctions",
            Some(&admin),
            &json!({"title": "x", "ends_at": "tomorrow"}),
        )
        .await;
    assert_eq!(res.status(), 400);

    // Create three; list pages by cursor; the reserve is shown to admins only.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create(&app, 60_000, json!({"reserve": 5000})).await);
    }
    let viewer = app.token(Role::Viewer);
    let page: Value = app
        .get("/api/auction/auctions?limit=2", Some(&viewer))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().expect("items").len(), 2);
    assert!(
        page["items"][0].get("reserve").is_none(),
        "reserve hidden from viewers"
    );
    let next = page["next"].as_i64().expect("next cursor");
    let page2: Value = app
        .get(
            &format!("/api/auction/auctions?limit=2&after={next}"),
            Some(&viewer),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page2["items"][0]["id"].as_i64(), Some(ids[2]));
    assert!(page2["next"].is_null());
    let one: Value = app
        .get(&format!("/api/auction/auctions/{}", ids[0]), Some(&admin))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["reserve"], 5000);
    assert_eq!(one["status"], "open");
    for (path, status) in [
        ("/api/auction/auctions/999999".to_owned(), 404),
        ("/api/auction/auctions/999999/state".to_owned(), 404),
        ("/api/auction/auctions?limit=0".to_owned(), 400),
        ("/api/auction/auctions?status=maybe".to_owned(), 400),
        (
            format!("/api/auction/auctions/{}/bids?limit=500", ids[0]),
            400,
        ),
        (format!("/api/auction/auctions/{}/result", ids[0]), 404),
        ("/api/auction/auctions/abc".to_owned(), 400),
    ] {
        assert_eq!(
            app.get(&path, Some(&viewer)).await.status(),
            status,
            "{path}"
        );
    }
    let spec: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    for p in [
        "/api/auction/auctions",
        "/api/auction/auctions/{id}/state",
        "/api/auction/auctions/{id}/bids",
        "/ws/auction/{id}",
    ] {
        assert!(spec["paths"].get(p).is_some(), "{p} documented");
    }
}

// ---------------------------------------------------------------- bidding

async fn bid_is_acked_after_store_applied_and_broadcast(backend: Backend) {
    let app = app(backend).await;
    let id = create(&app, 60_000, json!({})).await;
    let alice = client(&app, id, "alice", Role::Bidder);
    let watcher = client(&app, id, "watcher", Role::Viewer);
    until(&alice, "state", |v| v.state.is_some()).await;
    until(&watcher, "state", |v| v.state.is_some()).await;

    // A5: ack only once stored; then the worker's outcome; the room sees bid_placed.
    let b1 = alice.bid(150);
    let v = until(&alice, "result", |v| v.results.contains_key(&b1)).await;
    assert_eq!(v.acks.get(&b1), Some(&AckStatus::Stored));
    assert_eq!(v.results.get(&b1), Some(&Outcome::Accepted));
    let ack_at = v
        .log
        .iter()
        .position(|m| matches!(m, ServerMsg::Ack { .. }));
    let res_at = v
        .log
        .iter()
        .position(|m| matches!(m, ServerMsg::BidResult { .. }));
    assert!(ack_at < res_at, "ack before result: {:?}", v.log);
    let w = until(&watcher, "broadcast", |v| highest(v) == Some(150)).await;
    assert!(w.log.iter().any(
        |m| matches!(m, ServerMsg::BidPlaced { amount: 150, bidder, .. } if bidder == "alice")
    ));
    // The watcher gets no bid_result meant for alice.
    assert!(
        !w.log
            .iter()
            .any(|m| matches!(m, ServerMsg::BidResult { .. }))
    );

    // Too low: below highest + min_increment.
    let b2 = alice.bid(155);
    let v = until(&alice, "too_low", |v| v.results.contains_key(&b2)).await;
    assert_eq!(v.results.get(&b2), Some(&Outcome::TooLow));

    // A7: the same id again is a duplicate with the original outcome, applied once.
    alice.bid_with_id(&b1, 150);
    let (_, v) = alice
        .wait_until(WAIT, |v| {
            v.log
                .iter()
                .filter(|m| matches!(m, ServerMsg::Ack { id, .. } if *id == b1))
                .count()
                == 2
        })
        .await;
    assert_eq!(v.acks.get(&b1), Some(&AckStatus::Duplicate));
    let state: Value = app
        .get(
            &format!("/api/auction/auctions/{id}/state"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        state["bid_count"], 1,
        "a resend is not applied twice: {state}"
    );
    assert_eq!(state["highest"]["amount"], 150);
    let bids: Value = app
        .get(
            &format!("/api/auction/auctions/{id}/bids"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    let outcomes: Vec<&str> = bids["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|b| b["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, vec!["too_low", "accepted"], "newest first");
    alice.stop().await;
    watcher.stop().await;
}

bulwark_tests::each_backend!(bid_is_acked_after_store_applied_and_broadcast);

async fn resend_after_the_duplicate_window_is_caught_by_the_database(backend: Backend) {
    // A resend after the stream's duplicate window is still caught by the database.
    let app = builder(backend)
        .set("bus.duplicate_window", "1s")
        .start()
        .await;
    let id = create(&app, 60_000, json!({})).await;
    let alice = client(&app, id, "alice", Role::Bidder);
    let b = alice.bid(200);
    until(&alice, "result", |v| v.results.contains_key(&b)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let db_dups = || async {
        app.metric("bulwark_auction_duplicates_total", &[("layer", "database")])
            .await
            .unwrap_or(0.0)
    };
    let before = db_dups().await;
    let log_len = alice.view().log.len();
    alice.bid_with_id(&b, 200);
    let (ok, v) = alice
        .wait_until(WAIT, |v| {
            v.log[log_len..]
                .iter()
                .any(|m| matches!(m, ServerMsg::BidResult { id, .. } if *id == b))
        })
        .await;
    assert!(ok, "the resend got an outcome: {:?}", &v.log[log_len..]);
    let after: Vec<&ServerMsg> = v.log[log_len..].iter().collect();
    assert!(
        after
            .iter()
            .any(|m| matches!(m, ServerMsg::Ack { id, status: AckStatus::Stored } if *id == b)),
        "the stream no longer knew the id, so it stored it again: {after:?}"
    );
    assert!(
        after.iter().any(
            |m| matches!(m, ServerMsg::BidResult { id, outcome: Outcome::Accepted, .. } if *id == b)
        ),
        "the original outcome came back: {after:?}"
    );
    let caught = bulwark_tests::services::eventually(WAIT, || async {
        (db_dups().await > before).then_some(())
    })
    .await;
    assert!(caught.is_some(), "the database's unique key caught it");
    let state = v.state.expect("state");
    assert_eq!(state.bid_count, 1);
    alice.stop().await;
}

bulwark_tests::each_backend!(resend_after_the_duplicate_window_is_caught_by_the_database);

#[tokio::test]
async fn socket_rejects_bad_input_with_named_errors() {
    let app = app(Backend::Embedded).await;
    let id = create(&app, 60_000, json!({})).await;
    // No token, bad token, unknown auction: refused at upgrade.
    for (url, status) in [
        (app.ws_url(&format!("/ws/auction/{id}")), 401),
        (
            app.ws_url(&format!("/ws/auction/{id}?access_token=nope")),
            401,
        ),
        (
            app.ws_url(&format!(
                "/ws/auction/999999?access_token={}",
                app.token(Role::Viewer)
            )),
            404,
        ),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), status, "{url}")
            }
            other => panic!("expected {status} at upgrade, got {other:?}"),
        }
    }
    let url = app.ws_url(&format!(
        "/ws/auction/{id}?access_token={}",
        app.token_for("bob", Role::Bidder)
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let mut frames = Vec::new();
    let cases = [
        ("not json", "bad_message"),
        (r#"{"type":"bid","id":"x","amount":"ten"}"#, "bad_message"),
        (r#"{"type":"dance"}"#, "bad_message"),
        (
            r#"{"type":"bid","id":"has space","amount":300}"#,
            "invalid_bid",
        ),
        (r#"{"type":"bid","id":"ok1","amount":0}"#, "invalid_bid"),
    ];
    let first = read_json(&mut ws).await;
    assert_eq!(first["type"], "state", "state comes first: {first}");
    for (frame, code) in cases {
        ws.send(Message::text(frame)).await.expect("send");
        let reply = read_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        frames.push(reply);
    }
    assert_eq!(frames[3]["id"], "has space", "the error names the bid");
    // The socket still works after bad input, and nothing was applied.
    ws.send(Message::text(r#"{"type":"sync"}"#))
        .await
        .expect("send");
    let s = read_json(&mut ws).await;
    assert_eq!(s["type"], "state");
    assert_eq!(s["bid_count"], 0);
    // Viewers may watch but not bid.
    let url = app.ws_url(&format!(
        "/ws/auction/{id}?access_token={}",
        app.token(Role::Viewer)
    ));
    let (mut vws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(read_json(&mut vws).await["type"], "state");
    vws.send(Message::text(r#"{"type":"bid","id":"v1","amount":500}"#))
        .await
        .expect("send");
    let r = read_json(&mut vws).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    // Oversized frames close the socket with 1009.
    ws.send(Message::text("x".repeat(10_000))).await.ok();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed");
    assert_eq!(closed, Some(1009));
}

async fn read_json<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let f = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("socket open")
            .expect("frame ok");
        if let Message::Text(t) = f {
            return serde_json::from_str(t.as_str()).expect("json");
        }
    }
}

#[tokio::test]
async fn bids_are_rate_limited_per_bidder() {
    let app = builder(Backend::Embedded)
        .set("auction.bids_per_second", 1.0)
        .set("auction.bid_burst", 2.0)
        .start()
        .await;
    let id = create(&app, 60_000, json!({})).await;
    let url = app.ws_url(&format!(
        "/ws/auction/{id}?access_token={}",
        app.token_for("rapid", Role::Bidder)
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(read_json(&mut ws).await["type"], "state");
    let mut limited = 0;
    for i in 0..4 {
        ws.send(Message::text(format!(
            r#"{{"type":"bid","id":"r{i}","amount":{}}}"#,
            100 + i * 10
        )))
        .await
        .expect("send");
    }
    let mut seen = 0;
    while seen < 4 {
        let m = read_json(&mut ws).await;
        match m["type"].as_str() {
            Some("ack") => seen += 1,
            Some("error") => {
                assert_eq!(m["code"], "rate_limited", "{m}");
                limited += 1;
                seen += 1;
            }
            _ => {}
        }
    }
    assert_eq!(limited, 2, "burst of 2, then limited");
}

// ---------------------------------------------------------------- closing

async fn auction_closes_exactly_once_with_its_winner(backend: Backend) {
    let app = app(backend).await;
    let id = create(&app, 1_500, json!({"reserve": 120})).await;
    let alice = client(&app, id, "alice", Role::Bidder);
    let bob = client(&app, id, "bob", Role::Bidder);
    until(&alice, "state", |v| v.state.is_some()).await;
    until(&bob, "state", |v| v.state.is_some()).await;
    let a = alice.bid(110);
    until(&alice, "result", |v| v.results.contains_key(&a)).await;
    let b = bob.bid(130);
    until(&bob, "result", |v| {
        v.results.get(&b) == Some(&Outcome::Accepted)
    })
    .await;
    let v = until(&alice, "closed", |v| {
        v.state.as_ref().is_some_and(|s| s.status == "closed")
    })
    .await;
    let r = v.state.and_then(|s| s.result).expect("result in state");
    assert_eq!(r.winner.as_deref(), Some("bob"));
    assert_eq!(r.amount, Some(130));
    assert!(r.reserve_met);
    // A bid after the end is answered `closed` and terminates (never redelivered forever).
    let late = alice.bid(500);
    let v = until(&alice, "late result", |v| v.results.contains_key(&late)).await;
    assert_eq!(v.results.get(&late), Some(&Outcome::Closed));
    let res: Value = app
        .get(
            &format!("/api/auction/auctions/{id}/result"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(res["winner"], "bob");
    // Exactly once: the scheduler keeps running, the closed message count stays one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let closes = alice
        .view()
        .log
        .iter()
        .filter(|m| matches!(m, ServerMsg::Closed { .. }))
        .count();
    assert_eq!(closes, 1);
    let closed_seq: Vec<i64> = alice
        .view()
        .log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Closed { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let state: Value = app
        .get(
            &format!("/api/auction/auctions/{id}/state"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        state["seq"].as_i64(),
        closed_seq.first().copied(),
        "the close was the last room event"
    );
    alice.stop().await;
    bob.stop().await;
}

bulwark_tests::each_backend!(auction_closes_exactly_once_with_its_winner);

async fn every_due_auction_gets_its_close_however_many_are_due(backend: Backend) {
    // Item 9 of issue 14: 1,200 auctions past their end (more than two pages of the due query)
    // all get a close command from a scheduler that runs only a bounded number of ticks (no
    // worker meanwhile, so nothing it sent leaves the due list); a worker that starts after
    // the scheduler stopped then closes every one of them.
    const N: usize = 1_200;
    let web = builder(backend).role(ProcessRole::Web).start().await;
    let db = web.db.connect_migrated().await.expect("db");
    let now = bulwark_auction::store::now_ms();
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let a = bulwark_auction::store::create(
            &db,
            bulwark_auction::store::NewAuction {
                title: format!("due {i}"),
                starts_at_ms: now - 60_000,
                // Many share an end: the keyset must page through equal `ends_at` by id.
                ends_at_ms: now - 10_000 + (i as i64 % 7),
                start_price: 100,
                reserve: None,
                min_increment: 10,
                soft_close_window_ms: 0,
                soft_close_extension_ms: 0,
            },
        )
        .await
        .expect("create");
        ids.push(a.id);
    }
    // The scheduler runs a bounded number of ticks and stops; whatever it did not publish by
    // then is never closed. (Counted through the closes, not the publish counter: metrics are
    // per test process, shared with the other tests running beside this one.)
    let interval_ms = 500;
    let ticks = 24;
    let mut scheduler = builder(backend)
        .share(&web)
        .set("auction.scheduler_interval", format!("{interval_ms}ms"))
        .role(ProcessRole::Scheduler)
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(ticks * interval_ms)).await;
    scheduler.stop().await.expect("stop the scheduler");
    let _worker = builder(backend)
        .share(&web)
        .role(ProcessRole::Worker)
        .start()
        .await;
    use bulwark_auction::entity::auction;
    use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
    // Until all are closed, or nothing moved for 10 s (then the rest were never sent).
    let count = || async {
        auction::Entity::find()
            .filter(auction::Column::Id.is_in(ids.clone()))
            .filter(auction::Column::Status.eq("closed"))
            .count(&db)
            .await
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    let (mut n, mut moved) = (0, std::time::Instant::now());
    // (The first close may take a while: the worker claims and binds its partitions first.)
    let stall = |n: u64| Duration::from_secs(if n == 0 { 60 } else { 10 });
    while n < N as u64 && moved.elapsed() < stall(n) {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "closing took too long"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = count().await;
        if now != n {
            (n, moved) = (now, std::time::Instant::now());
        }
    }
    assert_eq!(
        n, N as u64,
        "all {N} auctions closed within {ticks} scheduler ticks; closed {n}"
    );
}

bulwark_tests::each_backend!(every_due_auction_gets_its_close_however_many_are_due);

#[tokio::test]
async fn reserve_not_met_means_no_winner_and_soft_close_extends() {
    let app = app(Backend::Embedded).await;
    let id = create(
        &app,
        2_000,
        json!({"reserve": 10_000, "soft_close_window_seconds": 5, "soft_close_extension_seconds": 3}),
    )
    .await;
    let alice = client(&app, id, "alice", Role::Bidder);
    let first = until(&alice, "state", |v| v.state.is_some()).await;
    let ends = first.state.expect("state").ends_at_ms;
    let b = alice.bid(200);
    let v = until(&alice, "extended", |v| {
        v.log
            .iter()
            .any(|m| matches!(m, ServerMsg::Extended { .. }))
    })
    .await;
    assert_eq!(v.results.get(&b), Some(&Outcome::Accepted));
    let new_end = v.state.as_ref().expect("state").ends_at_ms;
    assert!(
        new_end > ends,
        "bid inside the window moved the end: {ends} -> {new_end}"
    );
    let v = until(&alice, "closed", |v| {
        v.state.as_ref().is_some_and(|s| s.status == "closed")
    })
    .await;
    let r = v.state.and_then(|s| s.result).expect("result");
    assert_eq!(r.winner, None, "reserve not met");
    assert!(!r.reserve_met);
    alice.stop().await;
}

async fn backlog_before_the_end_is_applied_before_the_close(backend: Backend) {
    // Bids stored before the end are applied even when the worker only comes back after it
    // (A8): a web-only instance takes the bids; the worker+scheduler starts after ends_at.
    let web = builder(backend).role(ProcessRole::Web).start().await;
    let id = create(&web, 1_500, json!({})).await;
    let alice = client(&web, id, "alice", Role::Bidder);
    let bob = client(&web, id, "bob", Role::Bidder);
    let mut acked = Vec::new();
    for (c, amount) in [(&alice, 100), (&bob, 120), (&alice, 150), (&bob, 170)] {
        let b = c.bid(amount);
        until(c, "ack", |v| v.acks.contains_key(&b)).await;
        acked.push(b);
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(
        web.get(
            &format!("/api/auction/auctions/{id}/result"),
            Some(&web.token(Role::Viewer))
        )
        .await
        .status(),
        404,
        "nothing applied or closed without a worker"
    );
    let worker = builder(backend)
        .share(&web)
        .role(ProcessRole::All)
        .start()
        .await;
    // Read the result through the database: on the embedded backend the room broadcast is
    // in-process, so clients of the web instance would not hear the worker's `closed`.
    let r = closed_result(&worker, id, WAIT).await;
    assert_eq!(
        (r["winner"].as_str(), r["amount"].as_i64()),
        (Some("bob"), Some(170)),
        "every bid before the end counted"
    );
    let state: Value = worker
        .get(
            &format!("/api/auction/auctions/{id}/state"),
            Some(&worker.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(state["bid_count"], 4);
    alice.stop().await;
    bob.stop().await;
}

bulwark_tests::each_backend!(backlog_before_the_end_is_applied_before_the_close);

// ---------------------------------------------------------------- failures and owners

/// Make every insert of a bid of `amount` fail (`on`) or work again (`!on`): a fault that
/// lasts as long as the test wants, on either database.
async fn fail_bids_of(db: &sea_orm::DatabaseConnection, amount: i64, on: bool) {
    use sea_orm::{ConnectionTrait as _, DbBackend, Statement};
    let backend = db.get_database_backend();
    let sql: Vec<String> = match (backend, on) {
        (DbBackend::Sqlite, true) => vec![format!(
            "CREATE TRIGGER fail_{amount} BEFORE INSERT ON auction_bids WHEN NEW.amount = {amount} \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )],
        (DbBackend::Sqlite, false) => vec![format!("DROP TRIGGER fail_{amount}")],
        (_, true) => vec![
            format!(
                "CREATE FUNCTION fail_{amount}() RETURNS trigger AS $$ BEGIN \
                 IF NEW.amount = {amount} THEN RAISE EXCEPTION 'injected failure'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql"
            ),
            format!(
                "CREATE TRIGGER fail_{amount} BEFORE INSERT ON auction_bids FOR EACH ROW \
                 EXECUTE FUNCTION fail_{amount}()"
            ),
        ],
        (_, false) => vec![format!("DROP TRIGGER fail_{amount} ON auction_bids")],
    };
    for q in sql {
        db.execute(Statement::from_string(backend, q))
            .await
            .expect("fault injection");
    }
}

async fn a_failed_run_blocks_its_auction_until_it_applies(backend: Backend) {
    // Item 2 of issue 14: applying alice's bid fails for a while (a trigger refuses it); bob's
    // later, higher bid must not overtake it. Both are accepted, in stream order.
    let app = app(backend).await;
    let db = app.db.connect_migrated().await.expect("db");
    let id = create(&app, 60_000, json!({})).await;
    let alice = client(&app, id, "alice", Role::Bidder);
    let bob = client(&app, id, "bob", Role::Bidder);
    until(&alice, "state", |v| v.state.is_some()).await;
    until(&bob, "state", |v| v.state.is_some()).await;
    fail_bids_of(&db, 777, true).await;
    let a = alice.bid(777);
    until(&alice, "ack", |v| v.acks.contains_key(&a)).await;
    // The worker has fetched it and failed at least once before bob's bid is stored.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = bob.bid(800);
    until(&bob, "ack", |v| v.acks.contains_key(&b)).await;
    // Long enough for the bus to redeliver alice's bid (1 s) and for bob's to be applied, were
    // the partition not waiting for alice's.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        !bob.view().results.contains_key(&b),
        "bob's bid waits behind alice's failed one"
    );
    fail_bids_of(&db, 777, false).await;
    let va = until(&alice, "alice's result", |v| v.results.contains_key(&a)).await;
    let vb = until(&bob, "bob's result", |v| v.results.contains_key(&b)).await;
    assert_eq!(
        (va.results.get(&a), vb.results.get(&b)),
        (Some(&Outcome::Accepted), Some(&Outcome::Accepted)),
        "applied in stream order: 777, then 800"
    );
    let bids: Value = app
        .get(
            &format!("/api/auction/auctions/{id}/bids"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    let amounts: Vec<i64> = bids["items"]
        .as_array()
        .expect("bids")
        .iter()
        .filter_map(|b| b["amount"].as_i64())
        .collect();
    assert_eq!(amounts, [800, 777], "newest first");
    alice.stop().await;
    bob.stop().await;
}

bulwark_tests::each_backend!(a_failed_run_blocks_its_auction_until_it_applies);

async fn a_stale_partition_owner_cannot_write(backend: Backend) {
    // Item 3 of issue 14: once a newer owner claimed a partition, the previous owner's
    // transactions are refused (the fencing token is checked in the apply transaction), even
    // when the key-value store's counter went back (the embedded store after a restart).
    use bulwark_auction::store::{self, Applied, ApplyError, BidCommand};
    let web = builder(backend).role(ProcessRole::Web).start().await;
    let db = web.db.connect_migrated().await.expect("db");
    let id = create(&web, 60_000, json!({})).await;
    let partition = 900; // no worker runs it
    let old = store::claim_partition(&db, partition, 5, "old")
        .await
        .expect("claim");
    assert_eq!(old.fence.token, 5, "the lease's own token");
    assert!(
        old.clean_handover,
        "a partition never owned has nothing in flight"
    );
    let new = store::claim_partition(&db, partition, 3, "new")
        .await
        .expect("claim");
    assert_eq!(
        new.fence.token, 6,
        "above the stored token when the lease's is older"
    );
    assert!(
        !new.clean_handover,
        "the old owner never released: it may have left deliveries in flight (item 1)"
    );
    let (old, new) = (old.fence, new.fence);
    let cmd = BidCommand {
        auction_id: id,
        bidder: "alice".into(),
        client_bid_id: "b1".into(),
        amount: 500,
        received_at_ms: store::now_ms(),
        stream_seq: None,
    };
    let refused = store::apply_bids(&db, Some(&old), std::slice::from_ref(&cmd)).await;
    assert!(
        matches!(refused, Err(ApplyError::Fenced { .. })),
        "the old owner's run is refused: {refused:?}"
    );
    assert!(
        store::find_bid(&db, id, "alice", "b1")
            .await
            .expect("read")
            .is_none(),
        "and wrote nothing"
    );
    let refused = store::close(&db, Some(&old), id, i64::MAX).await;
    assert!(
        matches!(refused, Err(ApplyError::Fenced { .. })),
        "so is its close: {refused:?}"
    );
    let applied = store::apply_bids(&db, Some(&new), std::slice::from_ref(&cmd))
        .await
        .expect("the new owner applies");
    assert!(matches!(applied.as_slice(), [Applied::Fresh { .. }]));
    assert_eq!(
        store::partition_token(&db, partition).await.expect("read"),
        Some(6)
    );
    assert!(
        !store::release_partition(&db, &old).await.expect("release"),
        "a fenced-out owner cannot declare a clean hand-over"
    );
    assert!(store::release_partition(&db, &new).await.expect("release"));
    let next = store::claim_partition(&db, partition, 7, "next")
        .await
        .expect("claim");
    assert!(next.clean_handover, "released with nothing in flight");
}

bulwark_tests::each_backend!(a_stale_partition_owner_cannot_write);

async fn a_new_owner_applies_a_dead_owners_deliveries_before_later_ones(backend: Backend) {
    // Item 1 of issue 14: an owner fetched alice's winning bid and died without acking it
    // (a kill -9 mid-batch: claimed, fetched, never settled). Bob's lower bid and the close
    // are stored after it. The next owner must apply alice's bid first, although the bus
    // returns it only after `ack_wait`; fetching at once would apply bob's bid and the close,
    // and judge alice's winning bid `closed`.
    use bulwark_auction::entity::{auction, bid};
    use bulwark_auction::store::{self, BidCommand, Decision};
    use bulwark_kernel::bus::{self, ConsumerSpec};
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _};
    let ack_wait = "10s";
    let web = builder(backend)
        .role(ProcessRole::Web)
        .set("auction.ack_wait", ack_wait)
        .start()
        .await;
    let db = web.db.connect_migrated().await.expect("db");
    let id = create(&web, 4_000, json!({})).await;
    let partition = id.rem_euclid(4);
    let alice = client(&web, id, "alice", Role::Bidder);
    let bob = client(&web, id, "bob", Role::Bidder);
    let a = alice.bid(500);
    until(&alice, "ack", |v| v.acks.contains_key(&a)).await;

    // The owner that dies: it claims the partition and fetches alice's bid, nothing more.
    store::claim_partition(&db, i32::try_from(partition).expect("partition"), 1, "dead")
        .await
        .expect("claim");
    let bus = bus::from_config(&web.settings.kernel.bus, db.clone())
        .await
        .expect("bus");
    let consumer = bus
        .consumer(&ConsumerSpec {
            stream: "AUCTION_BIDS".into(),
            durable: format!("auction-worker-p{partition}"),
            filter_subject: Some(format!("auction.bids.{partition}.>")),
            ack_wait: Duration::from_secs(10),
            max_deliver: 10,
            dead_letter_subject: None,
        })
        .await
        .expect("consumer");
    let fetched = consumer
        .fetch(1, Duration::from_secs(5))
        .await
        .expect("fetch");
    assert_eq!(fetched.len(), 1, "the dead owner holds alice's bid");
    drop(fetched);
    drop(consumer);

    let b = bob.bid(300);
    until(&bob, "ack", |v| v.acks.contains_key(&b)).await;
    // Past the end and the close settle: the scheduler will publish the close at once.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let worker = builder(backend)
        .share(&web)
        .role(ProcessRole::All)
        .set("auction.ack_wait", ack_wait)
        .start()
        .await;
    let r = closed_result(&worker, id, Duration::from_secs(40)).await;
    assert_eq!(
        (r["winner"].as_str(), r["amount"].as_i64()),
        (Some("alice"), Some(500)),
        "alice's bid, stored first, wins: {r}"
    );

    // The same as one uninterrupted worker computes from the stored bids in stream order.
    let stored = bid::Entity::find()
        .filter(bid::Column::AuctionId.eq(id))
        .order_by_asc(bid::Column::StreamSeq)
        .all(&db)
        .await
        .expect("bids");
    let fresh = auction::Entity::find_by_id(id)
        .one(&db)
        .await
        .expect("read")
        .map(|a| auction::Model {
            ends_at_ms: a.scheduled_end_ms,
            status: "open".into(),
            version: 0,
            seq: 0,
            highest_amount: None,
            highest_bidder: None,
            highest_bid_id: None,
            bid_count: 0,
            ..a
        })
        .expect("auction");
    let cmds: Vec<BidCommand> = stored
        .iter()
        .map(|b| BidCommand {
            auction_id: id,
            bidder: b.bidder.clone(),
            client_bid_id: b.client_bid_id.clone(),
            amount: b.amount,
            received_at_ms: b.received_at_ms,
            stream_seq: b.stream_seq,
        })
        .collect();
    let run = store::decide_run(&fresh, &cmds.iter().map(|c| (c, None)).collect::<Vec<_>>());
    let expected: Vec<(String, &str)> = cmds
        .iter()
        .zip(&run.decisions)
        .map(|(c, d)| match d {
            Decision::Fresh { judgement, .. } | Decision::Duplicate(judgement) => {
                (c.bidder.clone(), judgement.outcome.as_str())
            }
        })
        .collect();
    let got: Vec<(String, &str)> = stored
        .iter()
        .map(|b| (b.bidder.clone(), b.outcome.as_str()))
        .collect();
    assert_eq!(
        got, expected,
        "outcomes as one uninterrupted worker decides them"
    );
    assert_eq!(got.len(), 2);
    assert_eq!(
        (
            run.state.highest_bidder.as_deref(),
            run.state.highest_amount
        ),
        (Some("alice"), Some(500))
    );
    alice.stop().await;
    bob.stop().await;
}

bulwark_tests::each_backend!(a_new_owner_applies_a_dead_owners_deliveries_before_later_ones);

#[tokio::test]
async fn a_slow_batch_keeps_its_partition_lease() {
    // Item 3 of issue 14: the lease is renewed while a batch works. A bid's apply waits 3.5
    // leases on a row lock the test holds; a second worker of the deployment competes for the
    // partitions meanwhile and must not take this one over (its claim would bump the token).
    if !bulwark_tests::services::real_services() {
        return;
    }
    use sea_orm::{ConnectionTrait as _, Statement, TransactionTrait as _};
    let app = builder(Backend::Real)
        .set("auction.partition_lease", "1s")
        .start()
        .await;
    let db = app.db.connect_migrated().await.expect("db");
    let id = create(&app, 60_000, json!({})).await;
    let partition = i32::try_from(id % 4).expect("partition");
    let token = || async {
        bulwark_auction::store::partition_token(&db, partition)
            .await
            .ok()
            .flatten()
    };
    let before = bulwark_tests::services::eventually(WAIT, token)
        .await
        .expect("the worker claimed the partition");
    let _rival = builder(Backend::Real)
        .share(&app)
        .set("auction.partition_lease", "1s")
        .role(ProcessRole::Worker)
        .start()
        .await;
    let alice = client(&app, id, "alice", Role::Bidder);
    until(&alice, "state", |v| v.state.is_some()).await;
    let txn = db.begin().await.expect("begin");
    txn.execute(Statement::from_string(
        db.get_database_backend(),
        format!("SELECT id FROM auction_auctions WHERE id = {id} FOR UPDATE"),
    ))
    .await
    .expect("lock the auction row");
    let b = alice.bid(100);
    until(&alice, "ack", |v| v.acks.contains_key(&b)).await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let during = token().await;
    txn.commit().await.expect("release");
    let v = until(&alice, "result", |v| v.results.contains_key(&b)).await;
    assert_eq!(v.results.get(&b), Some(&Outcome::Accepted));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        (during, token().await),
        (Some(before), Some(before)),
        "one owner throughout: the slow batch kept its lease"
    );
    alice.stop().await;
}

// ---------------------------------------------------------------- presence, fan-out, drain

async fn presence_lists_connections(backend: Backend) {
    let a = app(backend).await;
    let id = create(&a, 60_000, json!({})).await;
    let c1 = client(&a, id, "carol", Role::Bidder);
    let c2 = client(&a, id, "dave", Role::Viewer);
    until(&c1, "state", |v| v.state.is_some()).await;
    until(&c2, "state", |v| v.state.is_some()).await;
    let viewer = a.token(Role::Viewer);
    let p: Value = a
        .get(
            &format!("/api/auction/auctions/{id}/presence"),
            Some(&viewer),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["connections"], 2, "{p}");
    assert_eq!(p["users"], 2);
    c2.stop().await;
    let gone = bulwark_tests::services::eventually(WAIT, || async {
        let p: Value = a
            .get(
                &format!("/api/auction/auctions/{id}/presence"),
                Some(&viewer),
            )
            .await
            .json()
            .await
            .ok()?;
        (p["connections"] == 1).then_some(())
    })
    .await;
    assert!(gone.is_some(), "a closed socket leaves the room");
    c1.stop().await;
}

bulwark_tests::each_backend!(presence_lists_connections);

#[tokio::test]
async fn two_web_instances_share_rooms_presence_and_drain_moves_clients() {
    // A3, A4, A11 with real services: a bid on instance B is seen on instance A; presence
    // lists both; draining B tells its clients 1012, they reconnect to A and get the state,
    // and no acknowledged bid is lost.
    if !bulwark_tests::services::real_services() {
        return;
    }
    let a = app(Backend::Real).await;
    let mut b = builder(Backend::Real)
        .share(&a)
        .role(ProcessRole::Web)
        .start()
        .await;
    let id = create(&a, 60_000, json!({})).await;
    let on_a = client(&a, id, "erin", Role::Bidder);
    let on_b = AuctionClient::start(ClientConfig {
        endpoints: vec![b.ws_url(""), a.ws_url("")],
        ..ClientConfig::new("", id, a.token_for("frank", Role::Bidder))
    });
    until(&on_a, "state", |v| v.state.is_some()).await;
    until(&on_b, "state", |v| v.state.is_some()).await;
    let p: Value = a
        .get(
            &format!("/api/auction/auctions/{id}/presence"),
            Some(&a.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["connections"], 2, "presence spans instances: {p}");
    let instances: std::collections::HashSet<&str> = p["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["instance"].as_str())
        .collect();
    assert_eq!(instances.len(), 2);

    let fb = on_b.bid(300);
    until(&on_b, "result", |v| v.results.contains_key(&fb)).await;
    until(&on_a, "cross-instance broadcast", |v| {
        highest(v) == Some(300)
    })
    .await;

    // Drain B while frank keeps bidding.
    let f2 = on_b.bid(400);
    b.stop().await.expect("stop b");
    let v = until(&on_b, "reconnected to A", |v| {
        v.connects >= 2 && v.connected
    })
    .await;
    assert_eq!(v.last_close, Some(1012), "told to reconnect elsewhere");
    let v = until(&on_b, "f2 settled", |v| v.results.contains_key(&f2)).await;
    assert_eq!(v.results.get(&f2), Some(&Outcome::Accepted));
    let f3 = on_b.bid(500);
    until(&on_b, "bid after move", |v| {
        v.results.get(&f3) == Some(&Outcome::Accepted)
    })
    .await;
    until(&on_a, "sees it", |v| highest(v) == Some(500)).await;
    on_a.stop().await;
    on_b.stop().await;
}

#[test]
fn asyncapi_document_names_every_message_and_error_code() {
    // The AsyncAPI twin of protocol.rs must not drift: every server message tag, every error
    // code and every outcome the Rust types produce appears in it.
    use bulwark_auction::protocol::{ErrorCode, Outcome};
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/protocol/auction.asyncapi.yaml"
    ))
    .expect("docs/protocol/auction.asyncapi.yaml");
    let samples = [
        ServerMsg::Ack {
            id: "a".into(),
            status: AckStatus::Stored,
        },
        ServerMsg::BidResult {
            id: "a".into(),
            outcome: Outcome::Accepted,
            reason: None,
            highest: None,
        },
        ServerMsg::BidPlaced {
            seq: 1,
            amount: 1,
            bidder: "b".into(),
            received_at_ms: 0,
            ends_at_ms: 0,
        },
        ServerMsg::Extended {
            seq: 1,
            ends_at_ms: 0,
        },
        ServerMsg::Closed {
            seq: 1,
            winner: None,
            amount: None,
            reserve_met: false,
        },
        ServerMsg::Error {
            code: ErrorCode::BadMessage,
            message: String::new(),
            id: None,
        },
    ];
    let mut kinds: Vec<&str> = samples.iter().map(|m| m.kind()).collect();
    kinds.extend(["state", "bid", "sync"]);
    for k in kinds {
        assert!(
            doc.contains(&format!("const: {k}}}")),
            "message `{k}` missing from the AsyncAPI document"
        );
    }
    for code in [
        ErrorCode::BadMessage,
        ErrorCode::InvalidBid,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ] {
        let name = serde_json::to_value(code).expect("json");
        let name = name.as_str().expect("string");
        assert!(doc.contains(name), "error code `{name}` missing");
    }
    for o in [
        Outcome::Accepted,
        Outcome::TooLow,
        Outcome::Closed,
        Outcome::NotStarted,
    ] {
        assert!(doc.contains(o.as_str()), "outcome `{}` missing", o.as_str());
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_not_buffered() {
    // Bounded memory per socket: a client that keeps asking for states but never reads is
    // closed (4008) once its queue stays full for slow_client_timeout, and the connection is
    // dropped; other clients are unaffected.
    let app = builder(Backend::Embedded)
        .set("auction.send_queue", 1)
        .set("auction.slow_client_timeout", "200ms")
        .set("auction.state_bids", 500)
        .set("auction.bids_per_second", 1000.0)
        .set("auction.bid_burst", 1000.0)
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let id = create(&app, 600_000, json!({"title": "x".repeat(200)})).await;
    // Make states big: many accepted bids, each listed in `state` (up to 500).
    let filler = client(&app, id, "filler", Role::Bidder);
    for i in 0..300 {
        filler.bid(100 + i * 10);
    }
    until(&filler, "300 results", |v| v.results.len() == 300).await;
    // A raw WebSocket client that never reads (tungstenite would buffer reads for us).
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let before = slow_count(&app).await;
    let token = app.token_for("sleepy", Role::Viewer);
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.expect("tcp");
    tcp.write_all(
        format!(
            "GET /ws/auction/{id}?access_token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            app.addr
        )
        .as_bytes(),
    )
    .await
    .expect("upgrade request");
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.expect("response");
    assert_eq!(&head, b"HTTP/1.1 101", "upgraded");
    // `{"type":"sync"}` as a masked text frame; a zero mask leaves the payload as is.
    let payload = br#"{"type":"sync"}"#;
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    let mut sent = 0;
    for _ in 0..5000 {
        match tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&frame)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let cut = bulwark_tests::services::eventually(WAIT, || async {
        (slow_count(&app).await > before).then_some(())
    })
    .await;
    assert!(
        cut.is_some(),
        "the unread socket was closed as slow (sent {sent} syncs)"
    );
    // Reading now reaches the end of the connection instead of blocking, and the last frame
    // is the close with 4008: it does not wait behind the full queue (item 7 of issue 14).
    let mut bytes = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection ended");
    let frames = server_frames(&bytes);
    let close = frames.iter().find(|(op, _)| *op == 0x8);
    let code = close.and_then(|(_, p)| Some(u16::from_be_bytes([*p.first()?, *p.get(1)?])));
    assert_eq!(
        code,
        Some(4008),
        "the slow client got the close code ({} frames read)",
        frames.len()
    );
    assert_eq!(
        frames.last().map(|(op, _)| *op),
        Some(0x8),
        "the close is the last frame"
    );
    // The room still works for others.
    let b = filler.bid(1_000_000);
    let v = until(&filler, "bid after", |v| v.results.contains_key(&b)).await;
    assert_eq!(v.results.get(&b), Some(&Outcome::Accepted));
    filler.stop().await;
}

/// The WebSocket frames (opcode, payload) a server sent on a raw connection, after the rest
/// of the HTTP response head (the first 12 bytes were read before). Server frames are not
/// masked; a truncated last frame is left out.
fn server_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let Some(start) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &bytes[start + 4..];
    let mut frames = Vec::new();
    while rest.len() >= 2 {
        let op = rest[0] & 0x0f;
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < head + len {
            break;
        }
        frames.push((op, rest[head..head + len].to_vec()));
        rest = &rest[head + len..];
    }
    frames
}

async fn slow_count(app: &TestApp) -> f64 {
    app.metric("bulwark_auction_slow_clients_total", &[])
        .await
        .unwrap_or(0.0)
}
