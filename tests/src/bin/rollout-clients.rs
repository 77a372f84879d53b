//! Real clients for the rolling-update rehearsal (`scripts/rehearse-rollout`, issues 4 and 5).
//!
//! Through the load balancer it creates an auction, then runs until `--stop-file` exists:
//! `--clients` auction clients (the reconnecting Rust client) bid continuously, and
//! `--http-workers` keep-alive HTTP clients read the auction's state in a loop. Then it waits for
//! every bid to be resolved and prints a summary. Exit code 0 only if: no HTTP request failed,
//! every socket client was told 1012 at least `--expect-restarts` times and reconnected, every
//! acknowledged bid got its outcome, and the server's bid count equals the accepted bids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bulwark_auction::client::{AuctionClient, ClientConfig};
use bulwark_auction::protocol::{Outcome, ServerMsg};
use bulwark_kernel::auth::{Authenticator, Role};
use bulwark_kernel::config::AuthConfig;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// The load balancer's base URL.
    #[arg(long)]
    base_url: String,
    /// The HS256 secret every Bulwark process uses.
    #[arg(long)]
    secret: String,
    #[arg(long, default_value_t = 20)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    http_workers: usize,
    /// Pause between one client's bids.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    bid_every: Duration,
    /// Stop bidding once this file exists.
    #[arg(long)]
    stop_file: std::path::PathBuf,
    /// Written once the clients are connected.
    #[arg(long)]
    ready_file: std::path::PathBuf,
    /// How many 1012 closes each socket client must have seen (web instances replaced).
    #[arg(long, default_value_t = 1)]
    expect_restarts: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let auth = Authenticator::hs256(
        args.secret.as_bytes(),
        AuthConfig {
            hs256_secret: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            issuer: "bulwark".into(),
            audience: "bulwark".into(),
            role_claim: "role".into(),
            leeway: Duration::from_secs(30),
        },
    );
    let ttl = Duration::from_secs(3600);
    let base = args.base_url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.http_workers)
        .build()?;
    let admin = auth.issue("rollout-admin", Role::Admin, ttl)?;
    let created: Value = http
        .post(format!("{base}/api/auction/auctions"))
        .bearer_auth(&admin)
        .json(&json!({"title": "rollout rehearsal", "ends_at": (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339(), "min_increment": 1}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_i64().context("auction id")?;

    let ws_base = base.replacen("http", "ws", 1);
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let token = auth.issue(&format!("rollout-bidder-{i}"), Role::Bidder, ttl)?;
        clients.push(AuctionClient::start(ClientConfig {
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(2),
            ..ClientConfig::new(ws_base.clone(), id, token)
        }));
    }
    for c in &clients {
        let (ok, _) = c
            .wait_until(Duration::from_secs(20), |v| v.state.is_some())
            .await;
        anyhow::ensure!(ok, "a client did not connect through {base}");
    }

    let viewer = auth.issue("rollout-viewer", Role::Viewer, ttl)?;
    let (http_ok, http_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..args.http_workers {
        let (http, url, viewer) = (
            http.clone(),
            format!("{base}/api/auction/auctions/{id}/state"),
            viewer.clone(),
        );
        let (ok, bad, failures, stopping) = (
            http_ok.clone(),
            http_failed.clone(),
            failures.clone(),
            stopping.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                match http.get(&url).bearer_auth(&viewer).send().await {
                    Ok(r) if r.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        let status = r.status();
                        let server = r
                            .headers()
                            .get("x-request-id")
                            .map_or("haproxy (no x-request-id)", |_| "bulwark");
                        let body = r.text().await.unwrap_or_default();
                        failures.lock().await.push(format!(
                            "HTTP {status} from {server}: {}",
                            body.chars().take(160).collect::<String>()
                        ));
                    }
                    Err(e) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        failures.lock().await.push(format!("transport: {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    std::fs::write(&args.ready_file, id.to_string())?;
    println!(
        "rollout-clients: auction {id}, {} socket clients and {} HTTP readers connected through {base}",
        args.clients, args.http_workers
    );

    // Bid until the stop file appears: each client raises by one over the highest it knows.
    let started = Instant::now();
    let mut sent = 0u64;
    while !args.stop_file.exists() {
        for c in &clients {
            let v = c.view();
            let next = v.state.as_ref().map_or(1, |s| s.min_next).max(1);
            c.bid(next + (sent as i64 % 7));
            sent += 1;
        }
        tokio::time::sleep(args.bid_every).await;
    }
    stopping.store(true, Ordering::Relaxed);
    stop.notify_waiters();
    for r in readers {
        let _ = r.await;
    }
    // Every bid must be resolved (acked and applied); resends after reconnects included.
    let mut unresolved = 0;
    let mut accepted = 0u64;
    let mut restarts_ok = true;
    let mut min_restarts = usize::MAX;
    let views = futures::future::join_all(clients.iter().map(|c| {
        c.wait_until(Duration::from_secs(30), |v| {
            v.unacked.is_empty() && v.unresolved.is_empty()
        })
    }))
    .await;
    for (_, v) in views {
        for id in v.unacked.keys() {
            let answers: Vec<String> = v
                .log
                .iter()
                .filter(|m| matches!(m, ServerMsg::Error { id: Some(e), .. } if e == id))
                .map(|m| format!("{m:?}"))
                .collect();
            println!(
                "rollout-clients: never acknowledged: {id} (connected {}, connects {}); errors: {answers:?}",
                v.connected, v.connects
            );
        }
        for id in v.unresolved.keys() {
            println!("rollout-clients: acknowledged, no outcome: {id}");
        }
        unresolved += v.unacked.len() + v.unresolved.len();
        accepted += v
            .results
            .values()
            .filter(|o| **o == Outcome::Accepted)
            .count() as u64;
        let restarts = v
            .log
            .iter()
            .filter(|m| matches!(m, ServerMsg::State(_)))
            .count()
            .saturating_sub(1);
        min_restarts = min_restarts.min(restarts);
        if v.connects < 1 + args.expect_restarts as u32 {
            restarts_ok = false;
        }
    }
    let closes_1012 = {
        // The client records the last close code only; count reconnections instead and check
        // that the last drop was a 1012.
        clients
            .iter()
            .filter(|c| c.view().last_close == Some(1012))
            .count()
    };
    let state: Value = http
        .get(format!("{base}/api/auction/auctions/{id}/state"))
        .bearer_auth(&viewer)
        .send()
        .await?
        .json()
        .await?;
    let server_count = state["bid_count"].as_u64().unwrap_or(u64::MAX);
    let ok = http_failed.load(Ordering::Relaxed) == 0
        && unresolved == 0
        && restarts_ok
        && closes_1012 == clients.len()
        && server_count == accepted;
    println!(
        "rollout-clients: {:.1} s; bids sent {sent}, accepted {accepted}, server bid_count {server_count}, unresolved {unresolved}",
        started.elapsed().as_secs_f64()
    );
    println!(
        "rollout-clients: HTTP ok {}, failed {}; socket clients reconnected (fewest states after the first) {min_restarts}; last close 1012 for {closes_1012}/{}",
        http_ok.load(Ordering::Relaxed),
        http_failed.load(Ordering::Relaxed),
        clients.len()
    );
    for f in failures.lock().await.iter().take(10) {
        println!("rollout-clients: failure: {f}");
    }
    for c in clients {
        c.stop().await;
    }
    if ok {
        println!(
            "rollout-clients: PASS — no request failed, every client moved on 1012, nothing acknowledged was lost"
        );
        Ok(())
    } else {
        anyhow::bail!("rollout rehearsal failed (see the figures above)")
    }
}
