//! A6 under crashes, with real processes and real services: a web process and a worker
//! process are SIGKILLed while bids flow. Every bid the client saw acknowledged is applied
//! exactly once, the client's resends after reconnecting are recognised, and the final
//! highest bid is the highest acknowledged amount.

use std::time::Duration;

use bulwark_auction::client::{AuctionClient, ClientConfig};
use bulwark_auction::protocol::Outcome;
use bulwark_kernel::auth::Role;
use bulwark_kernel::module::ProcessRole;
use bulwark_tests::{Backend, ProcessBuilder, TestApp, TestAppBuilder};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A process of `app`'s deployment with short leases, so a killed worker's partitions and
/// unacknowledged bids move on quickly.
fn process(app: &TestApp, role: ProcessRole) -> ProcessBuilder {
    app.process(role)
        .set("auction.partition_lease", "2s")
        .set("auction.ack_wait", "2s")
        .set("auction.bids_per_second", 1000.0)
        .set("auction.bid_burst", 1000.0)
        .set("drain.grace", "0s")
        .set("auction.presence_ttl", "3s")
}

#[tokio::test]
async fn killing_web_and_worker_processes_loses_no_acknowledged_bid() {
    // The in-process instance serves HTTP only: every bid is applied by a worker process.
    if !bulwark_tests::services::real_services() {
        return;
    }
    let web_a = TestAppBuilder::new(Backend::Real)
        .role(ProcessRole::Web)
        .set("auction.bids_per_second", 1000.0)
        .set("auction.bid_burst", 1000.0)
        .start()
        .await;
    // Both wait for their /readyz.
    let mut web_b = process(&web_a, ProcessRole::Web).spawn().await;
    let mut worker1 = process(&web_a, ProcessRole::Worker).spawn().await;

    let res = web_a
        .post_json(
            "/api/auction/auctions",
            Some(&web_a.token(Role::Admin)),
            &json!({"title": "crash lot", "ends_at": (chrono::Utc::now() + chrono::Duration::minutes(5)).to_rfc3339(), "min_increment": 1}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");

    let token = web_a.token_for("gina", Role::Bidder);
    // Connected to the web process first; after it dies, to the in-process instance.
    let client = AuctionClient::start(ClientConfig {
        endpoints: vec![web_b.ws_url(""), web_a.ws_url("")],
        backoff_base: Duration::from_millis(50),
        ..ClientConfig::new("", id, token)
    });
    let mut sent = Vec::new();
    for amount in 1..=60i64 {
        sent.push(client.bid(amount * 10));
        if amount == 20 {
            // Some bids applied, some in flight: kill the worker, then the web process.
            let (ok, _) = client.wait_until(WAIT, |v| v.results.len() >= 10).await;
            assert!(ok, "the first worker applied bids");
            worker1.kill9();
        }
        if amount == 35 {
            web_b.kill9();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked_before_restart = client.view().acks.len();
    assert!(
        acked_before_restart > 20,
        "bids were acknowledged while the worker was down"
    );
    let worker2 = process(&web_a, ProcessRole::Worker).spawn().await;

    let (ok, v) = client
        .wait_until(Duration::from_secs(60), |v| {
            sent.iter().all(|id| v.results.contains_key(id))
        })
        .await;
    assert!(
        ok,
        "every bid resolved: {} of {} (acked {}); the new worker's log:\n{}",
        v.results.len(),
        sent.len(),
        v.acks.len(),
        worker2.log_tail(30)
    );
    assert!(v.connects >= 2, "the client reconnected after the kill");
    // Resends after the reconnect may arrive after higher bids, and are then `too_low`: that
    // is the auction working. What must hold: one outcome per bid, the database agrees.
    let accepted = v
        .results
        .values()
        .filter(|o| **o == Outcome::Accepted)
        .count();
    assert!(accepted >= 1, "bids were accepted");

    // The database agrees: 60 bids, each id once, highest = the highest acknowledged amount.
    let viewer = web_a.token(Role::Viewer);
    let mut ids = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let q = before.map(|b| format!("&before={b}")).unwrap_or_default();
        let page: Value = web_a
            .get(
                &format!("/api/auction/auctions/{id}/bids?limit=200{q}"),
                Some(&viewer),
            )
            .await
            .json()
            .await
            .expect("json");
        for b in page["items"].as_array().expect("items") {
            ids.push(b["bid_id"].as_str().expect("bid_id").to_owned());
        }
        match page["next"].as_i64() {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!((n, ids.len()), (60, 60), "each bid stored exactly once");
    let state: Value = web_a
        .get(&format!("/api/auction/auctions/{id}/state"), Some(&viewer))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        state["highest"]["amount"], 600,
        "the highest bid was applied"
    );
    assert_eq!(
        state["bid_count"].as_u64(),
        Some(accepted as u64),
        "accepted bids as the client saw them = as the database has them"
    );
    // A3: the killed web process cannot remove its presence entry; it expires (TTL 3 s) and
    // only the live connection, on the in-process instance, remains.
    let presence = bulwark_tests::services::eventually(Duration::from_secs(20), || async {
        let p: Value = web_a
            .get(
                &format!("/api/auction/auctions/{id}/presence"),
                Some(&viewer),
            )
            .await
            .json()
            .await
            .ok()?;
        (p["connections"] == 1).then_some(p)
    })
    .await;
    assert!(
        presence.is_some(),
        "the dead instance's presence entry expired"
    );
    client.stop().await;
}
