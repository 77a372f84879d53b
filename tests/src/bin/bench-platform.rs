//! Platform benchmarks (issue 2): prints figures, asserts nothing.
//!
//! * cold start to ready on embedded defaults, and idle RSS (of the release `bulwark` binary);
//! * `/livez` requests/s vs a bare axum hello-world (same machine, same load generator, same run);
//! * bus publish→ack and publish→consume round trips, p50/p99, embedded vs JetStream.
//!
//! Run: `scripts/bench-platform` (builds release binaries, starts the services, runs this).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bulwark_kernel::bus::{Bus, ConsumerSpec, StreamSpec};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > deadline {
            anyhow::bail!("{url} not ready after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn spawn_bulwark(bin: &PathBuf, dir: &std::path::Path, port: u16) -> anyhow::Result<Server> {
    let child = Command::new(bin)
        .arg("serve")
        .current_dir(dir)
        .env("BULWARK__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("BULWARK__TELEMETRY__LOG_LEVEL", "warn")
        .env("BULWARK__DRAIN__GRACE", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    Ok(Server(child))
}

async fn cold_start(bin: &PathBuf) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut first = Vec::new();
    let mut warm = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir()?;
        for round in 0..2 {
            let port = free_port()?;
            let spawned = Instant::now();
            let server = spawn_bulwark(bin, dir.path(), port)?;
            wait_ready(
                &client,
                &format!("http://127.0.0.1:{port}/readyz"),
                Duration::from_secs(20),
            )
            .await?;
            let t = spawned.elapsed();
            if round == 0 {
                first.push(t)
            } else {
                warm.push(t)
            }
            if round == 1 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                rss.extend(rss_kib(server.0.id()));
            }
            drop(server);
        }
    }
    first.sort();
    warm.sort();
    rss.sort();
    println!("cold start to ready (spawn → /readyz 200), embedded defaults, 5 runs:");
    println!(
        "  first start (creates db, runs migrations, generates secret): median {}",
        ms(percentile(&first, 0.5))
    );
    println!(
        "  restart on an existing data dir:                              median {}   (goal < 300 ms)",
        ms(percentile(&warm, 0.5))
    );
    if let Some(r) = rss.get(rss.len() / 2) {
        println!(
            "idle RSS 1 s after ready: median {:.1} MiB   (goal < 40 MiB)",
            *r as f64 / 1024.0
        );
    }
    Ok(())
}

/// Keep-alive HTTP GET load: `conns` concurrent clients for `secs` seconds; returns requests/s.
async fn load(url: &str, conns: usize, secs: u64) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?;
        let (count, errors, stop, url) =
            (count.clone(), errors.clone(), stop.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = count.load(Ordering::Relaxed) - c0;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        println!("  ({e} failed requests)");
    }
    Ok(rate)
}

async fn livez_vs_hello(bin: &PathBuf, self_exe: &PathBuf) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let server = spawn_bulwark(bin, dir.path(), port)?;
    wait_ready(
        &client,
        &format!("http://127.0.0.1:{port}/readyz"),
        Duration::from_secs(20),
    )
    .await?;
    let hello_port = free_port()?;
    let hello = Server(
        Command::new(self_exe)
            .args(["--hello-server", &hello_port.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_ready(
        &client,
        &format!("http://127.0.0.1:{hello_port}/"),
        Duration::from_secs(10),
    )
    .await?;
    let (conns, secs, rounds) = (64, 4, 3);
    // Interleaved rounds, medians: the machine's speed drifts over a run.
    let (mut b, mut h) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        b.push(load(&format!("http://127.0.0.1:{port}/livez"), conns, secs).await?);
        h.push(load(&format!("http://127.0.0.1:{hello_port}/"), conns, secs).await?);
    }
    b.sort_by(f64::total_cmp);
    h.sort_by(f64::total_cmp);
    let (bulwark, baseline) = (b[rounds / 2], h[rounds / 2]);
    println!(
        "/livez over loopback, {conns} keep-alive connections, {rounds} interleaved rounds of {secs} s, medians (load generator shares the 2 cores):"
    );
    println!("  bulwark /livez (full middleware stack): {bulwark:>9.0} req/s");
    println!("  bare axum hello-world (baseline):       {baseline:>9.0} req/s");
    println!("  ratio: {:.2}x   (goal ≥ 0.8x)", bulwark / baseline);
    drop(server);
    drop(hello);
    Ok(())
}

async fn bus_round_trips(name: &str, bus: Arc<dyn Bus>, n: usize) -> anyhow::Result<()> {
    let stream = StreamSpec {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: None,
    };
    bus.ensure_stream(&stream).await?;
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        bus.publish(
            "bench.ack",
            Some(&format!("ack-{i}-{}", uuid::Uuid::new_v4())),
            Default::default(),
            bytes::Bytes::from_static(b"x"),
        )
        .await?;
        acks.push(t.elapsed());
    }
    let consumer = bus
        .consumer(&ConsumerSpec {
            stream: "BENCH".into(),
            durable: "bench_rt".into(),
            filter_subject: Some("bench.rt".into()),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dead_letter_subject: None,
        })
        .await?;
    let mut rts = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        bus.publish(
            "bench.rt",
            Some(&format!("rt-{i}-{}", uuid::Uuid::new_v4())),
            Default::default(),
            bytes::Bytes::from_static(b"x"),
        )
        .await?;
        loop {
            let got = consumer.fetch(1, Duration::from_secs(5)).await?;
            if let Some(d) = got.into_iter().next() {
                d.ack().await?;
                break;
            }
        }
        rts.push(t.elapsed());
    }
    acks.sort();
    rts.sort();
    println!(
        "  {name:<22} publish→ack p50 {} p99 {}   publish→consume p50 {} p99 {}",
        ms(percentile(&acks, 0.5)),
        ms(percentile(&acks, 0.99)),
        ms(percentile(&rts, 0.5)),
        ms(percentile(&rts, 0.99))
    );
    Ok(())
}

async fn bus_bench() -> anyhow::Result<()> {
    let n = 500;
    println!("bus round trips, {n} sequential messages each:");
    let defaults = bulwark_tests::services::default_settings().kernel;
    let db = bulwark_tests::services::TestDatabase::sqlite()?;
    let conn = db.connect_migrated().await?;
    let embedded: Arc<dyn Bus> = Arc::new(bulwark_kernel::bus::embedded::EmbeddedBus::new(
        conn,
        &defaults.bus,
    ));
    bus_round_trips("embedded (SQLite)", embedded, n).await?;
    if let Some(pg) = bulwark_tests::services::TestDatabase::postgres().await? {
        let conn = pg.connect_migrated().await?;
        let embedded: Arc<dyn Bus> = Arc::new(bulwark_kernel::bus::embedded::EmbeddedBus::new(
            conn,
            &defaults.bus,
        ));
        bus_round_trips("embedded (PostgreSQL)", embedded, n).await?;
    }
    if let Some(url) = bulwark_tests::services::nats_url() {
        let mut cfg = defaults.bus.clone();
        cfg.url = Some(bulwark_kernel::config::SecretUrl::new(url));
        cfg.prefix = bulwark_tests::services::unique("bench");
        let nats: Arc<dyn Bus> = Arc::new(bulwark_kernel::bus::nats::NatsBus::connect(&cfg).await?);
        bus_round_trips("NATS JetStream", nats, n).await?;
    }
    Ok(())
}

fn hello_server(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hello-server") {
        let port = args.get(2).context("--hello-server PORT")?.parse()?;
        return hello_server(port);
    }
    let self_exe = std::env::current_exe()?;
    let bin = std::env::var_os("BULWARK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| self_exe.with_file_name("bulwark"));
    // Servers run in scratch directories: the path must not be relative.
    let bin = std::fs::canonicalize(&bin)
        .with_context(|| format!("{} (build it first)", bin.display()))?;
    println!("bulwark binary: {}", bin.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        cold_start(&bin).await?;
        livez_vs_hello(&bin, &self_exe).await?;
        bus_bench().await
    })
}
