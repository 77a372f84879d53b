//! Auction load generator (issue 4): prints figures, asserts nothing but integrity.
//!
//! Against a running Bulwark: creates an auction, connects `--watchers` viewer sockets and
//! `--clients` bidder sockets, and has every bidder place `--bids` bids one after another
//! (send, wait for `ack`, wait for `bid_result`). Reports bids/s, ACK latency (stored in the
//! durable queue), result latency (applied by the worker), bid→broadcast latency at the
//! watchers, and — as the baseline measured in the same run on the same sockets — the `sync`
//! round trip (one state read, no durable write). Then checks integrity: every acknowledged bid
//! is in the database exactly once.
//!
//! `bench-auction --base-url http://127.0.0.1:8080 --jwt-secret-file data/jwt-secret`
//! (`scripts/bench-auction` builds release binaries, starts Bulwark on real services, runs it).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_kernel::auth::{Authenticator, Role};
use bulwark_kernel::config::AuthConfig;
use clap::Parser;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Auction load generator: bids/s and ACK, apply and broadcast latency")]
struct Args {
    /// Bulwark's HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// The HS256 secret (embedded mode writes it to data/jwt-secret).
    #[arg(long)]
    jwt_secret_file: std::path::PathBuf,
    /// Bidder sockets (one bidder each).
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Bids per bidder, placed one after another.
    #[arg(long, default_value_t = 25)]
    bids: usize,
    /// Viewer sockets that only watch the room.
    #[arg(long, default_value_t = 20)]
    watchers: usize,
    /// `sync` round trips per bidder for the baseline.
    #[arg(long, default_value_t = 10)]
    syncs: usize,
    /// End the auction this many seconds after the bids and wait for its close.
    #[arg(long)]
    close_after: Option<u64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let p50 = pct(&v, 0.5);
    println!(
        "{name:<28} n={:<6} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        v.len(),
        p50,
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    );
    p50
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no frame within 30 s")?
            .context("socket closed")??;
        match f {
            Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
            Message::Close(c) => bail!("closed by server: {c:?}"),
            _ => {}
        }
    }
}

#[derive(Default)]
struct Figures {
    ack: Vec<f64>,
    result: Vec<f64>,
    sync: Vec<f64>,
    broadcast: Vec<f64>,
    acked: Vec<String>,
    outcomes: std::collections::BTreeMap<String, u64>,
    rate_limited: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = std::fs::read(&args.jwt_secret_file)
        .with_context(|| format!("read {}", args.jwt_secret_file.display()))?;
    let auth = Authenticator::hs256(
        String::from_utf8_lossy(&secret).trim().as_bytes(),
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
    let admin = auth.issue("bench-admin", Role::Admin, ttl)?;
    let http = reqwest::Client::new();
    let base = args.base_url.trim_end_matches('/').to_owned();
    let ws_base = base.replacen("http", "ws", 1);
    let ends = chrono::Utc::now() + chrono::Duration::minutes(30);
    let created: Value = http
        .post(format!("{base}/api/auction/auctions"))
        .bearer_auth(&admin)
        .json(&json!({"title": "bench", "ends_at": ends.to_rfc3339(), "min_increment": 1, "start_price": 1}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_i64().context("auction id")?;
    println!(
        "auction {id}: {} bidders x {} bids, {} watchers, against {base}",
        args.clients, args.bids, args.watchers
    );

    let figures = Arc::new(Mutex::new(Figures::default()));
    let received = Arc::new(AtomicU64::new(0));
    // Watchers: count room messages and measure bid_placed latency from the gateway's stamp.
    let mut watchers = Vec::new();
    for i in 0..args.watchers {
        let token = auth.issue(&format!("bench-watcher-{i}"), Role::Viewer, ttl)?;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "{ws_base}/ws/auction/{id}?access_token={token}"
        ))
        .await
        .context("watcher connect")?;
        let (figures, received) = (figures.clone(), received.clone());
        watchers.push(tokio::spawn(async move {
            while let Ok(m) = next_json(&mut ws).await {
                received.fetch_add(1, Ordering::Relaxed);
                if m["type"] == "bid_placed"
                    && let Some(at) = m["received_at_ms"].as_i64()
                {
                    figures.lock().await.broadcast.push((now_ms() - at) as f64);
                }
                if m["type"] == "closed" {
                    break;
                }
            }
        }));
    }

    let amount = Arc::new(AtomicI64::new(1));
    let started = Instant::now();
    let mut bidders = Vec::new();
    for i in 0..args.clients {
        let token = auth.issue(&format!("bench-bidder-{i}"), Role::Bidder, ttl)?;
        let url = format!("{ws_base}/ws/auction/{id}?access_token={token}");
        let (figures, amount) = (figures.clone(), amount.clone());
        let (bids, syncs) = (args.bids, args.syncs);
        bidders.push(tokio::spawn(async move {
            let run = async {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
                let mut f = Figures::default();
                let first = next_json(&mut ws).await?;
                anyhow::ensure!(first["type"] == "state", "first message is the state");
                for _ in 0..syncs {
                    let t = Instant::now();
                    ws.send(Message::text(r#"{"type":"sync"}"#)).await?;
                    while next_json(&mut ws).await?["type"] != "state" {}
                    f.sync.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                for _ in 0..bids {
                    let bid_id = uuid::Uuid::new_v4().simple().to_string();
                    let amt = amount.fetch_add(1, Ordering::Relaxed);
                    let frame = json!({"type": "bid", "id": bid_id, "amount": amt}).to_string();
                    let t = Instant::now();
                    ws.send(Message::text(frame.clone())).await?;
                    let mut acked = false;
                    loop {
                        let m = next_json(&mut ws).await?;
                        let mine = m["id"].as_str() == Some(bid_id.as_str());
                        match m["type"].as_str() {
                            Some("ack") if mine => {
                                f.ack.push(t.elapsed().as_secs_f64() * 1000.0);
                                f.acked.push(bid_id.clone());
                                acked = true;
                            }
                            Some("error") if mine && m["code"] == "rate_limited" => {
                                // What a real client does: wait, resend the same id.
                                f.rate_limited += 1;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                ws.send(Message::text(frame.clone())).await?;
                            }
                            Some("error") if mine => bail!("bid refused: {m}"),
                            Some("bid_result") if mine && acked => {
                                f.result.push(t.elapsed().as_secs_f64() * 1000.0);
                                let o = m["outcome"].as_str().unwrap_or("?").to_owned();
                                *f.outcomes.entry(o).or_default() += 1;
                                break;
                            }
                            _ => {}
                        }
                    }
                }
                let _ = ws.close(None).await;
                Ok::<_, anyhow::Error>(f)
            };
            match run.await {
                Ok(f) => {
                    let mut all = figures.lock().await;
                    all.ack.extend(f.ack);
                    all.result.extend(f.result);
                    all.sync.extend(f.sync);
                    all.acked.extend(f.acked);
                    all.rate_limited += f.rate_limited;
                    for (k, v) in f.outcomes {
                        *all.outcomes.entry(k).or_default() += v;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }));
    }
    let mut failed = 0;
    for b in bidders {
        if let Err(e) = b.await? {
            eprintln!("bidder failed: {e:#}");
            failed += 1;
        }
    }
    let wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let f = figures.lock().await;
    let total = f.result.len();
    println!(
        "bids applied: {total} in {:.2} s = {:.0} bids/s (each bidder waits for its result before the next bid); failed bidders: {failed}; rate-limited resends: {}",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64(),
        f.rate_limited
    );
    println!("outcomes: {:?}", f.outcomes);
    let sync_p50 = summary("baseline: sync round trip", f.sync.clone());
    let ack_p50 = summary("bid -> ack (stored)", f.ack.clone());
    summary("bid -> bid_result (applied)", f.result.clone());
    drop(f);
    // Watchers finish on `closed`; without a close, stop them now.
    let close_after = args.close_after;
    if close_after.is_none() {
        for w in &watchers {
            w.abort();
        }
    }
    let viewer = auth.issue("bench-viewer", Role::Viewer, ttl)?;
    let state: Value = http
        .get(format!("{base}/api/auction/auctions/{id}/state"))
        .bearer_auth(&viewer)
        .send()
        .await?
        .json()
        .await?;
    let f = figures.lock().await;
    let accepted = f.outcomes.get("accepted").copied().unwrap_or(0);
    println!(
        "integrity: acknowledged {} bids, accepted {accepted}; server bid_count {} -> {}",
        f.acked.len(),
        state["bid_count"],
        if state["bid_count"].as_u64() == Some(accepted) {
            "ok, nothing lost or doubled"
        } else {
            "MISMATCH"
        }
    );
    println!(
        "ratio: ACK p50 / sync p50 = {:.2} (a durable bus write vs one database read)",
        ack_p50 / sync_p50
    );
    drop(f);
    if let Some(secs) = close_after {
        // Shorten nothing on the server: wait for the scheduler at the real end is too long
        // for a bench, so create a second, short auction and time its close.
        let ends = chrono::Utc::now() + chrono::Duration::seconds(secs as i64);
        let short: Value = http
            .post(format!("{base}/api/auction/auctions"))
            .bearer_auth(&admin)
            .json(&json!({"title": "bench-close", "ends_at": ends.to_rfc3339()}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let sid = short["id"].as_i64().context("id")?;
        let t = Instant::now();
        loop {
            let r = http
                .get(format!("{base}/api/auction/auctions/{sid}/result"))
                .bearer_auth(&viewer)
                .send()
                .await?;
            if r.status() == 200 {
                println!(
                    "close: result written {:.2} s after creation (ends_at + close_settle)",
                    t.elapsed().as_secs_f64()
                );
                break;
            }
            if t.elapsed() > Duration::from_secs(secs + 60) {
                println!("close: no result within {} s", secs + 60);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for w in &watchers {
            w.abort();
        }
    }
    for w in watchers {
        let _ = w.await;
    }
    let f = figures.lock().await;
    summary("bid -> broadcast (watchers)", f.broadcast.clone());
    println!(
        "room messages received by watchers: {}",
        received.load(Ordering::Relaxed)
    );
    Ok(())
}
