//! K4: the kernel reports `bulwark_bus_consumer_pending{stream,consumer}` for every durable
//! consumer its bus hands out (`bus::report_consumer_lag`), read here from the process's
//! Prometheus recorder — the one `/metrics` renders. Runs on the embedded bus (SQLite,
//! PostgreSQL with `BULWARK_TEST_POSTGRES_URL`) and on NATS (`BULWARK_TEST_NATS_URL`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use bulwark_kernel::bus::{self, Bus, ConsumerSpec, Delivery, StreamSpec};
use bulwark_kernel::config::{BusConfig, SecretUrl};
use bulwark_kernel::shutdown::Shutdown;
use bulwark_tests::services::{TestDatabase, default_settings, eventually, nats_url, unique};

const STREAM: &str = "LAG";
/// Published and left unacked.
const N: usize = 4;
/// Refresh period under test: short, so the suite is quick.
const EVERY: Duration = Duration::from_millis(100);
/// Upper bound for anything that should happen "soon" (NATS updates consumer state lazily).
const SOON: Duration = Duration::from_secs(10);

fn config(url: Option<String>) -> BusConfig {
    let mut cfg = default_settings().kernel.bus;
    cfg.url = url.map(SecretUrl::new);
    cfg.prefix = unique("lag");
    cfg.poll_interval = Duration::from_millis(25);
    cfg
}

/// The gauge's current value for `durable`, as a scrape would show it.
fn pending_gauge(durable: &str) -> Option<f64> {
    let text = bulwark_kernel::telemetry::prometheus().ok()?.render();
    let consumer = format!("consumer=\"{durable}\"");
    let stream = format!("stream=\"{STREAM}\"");
    text.lines()
        .find(|l| {
            l.starts_with("bulwark_bus_consumer_pending{")
                && l.contains(&consumer)
                && l.contains(&stream)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn gauge_reaches(durable: &str, want: usize, what: &str) -> anyhow::Result<()> {
    let want = want as f64;
    eventually(SOON, || async {
        (pending_gauge(durable) == Some(want)).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "{what}: pending of `{durable}` should be {want}, is {:?}",
            pending_gauge(durable)
        )
    })
}

async fn fetch_n(consumer: &dyn bus::Consumer, n: usize) -> anyhow::Result<Vec<Delivery>> {
    let deadline = tokio::time::Instant::now() + SOON;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        out.extend(
            consumer
                .fetch(n - out.len(), Duration::from_millis(500))
                .await?,
        );
    }
    ensure!(out.len() == n, "fetched {} of {n}", out.len());
    Ok(out)
}

async fn lag_is_reported_until_acked_or_released(bus: Arc<dyn Bus>) -> anyhow::Result<()> {
    // Installed before the refresher's first write, which would otherwise go nowhere.
    bulwark_kernel::telemetry::prometheus()?;
    bus.ensure_stream(&StreamSpec {
        name: STREAM.into(),
        subjects: vec!["lag.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: Some(Duration::from_secs(3600)),
    })
    .await?;
    // Unique: every test in this binary shares one recorder.
    let durable = unique("lagging");
    let consumer = bus
        .consumer(&ConsumerSpec {
            stream: STREAM.into(),
            durable: durable.clone(),
            filter_subject: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dead_letter_subject: None,
        })
        .await?;
    let shutdown = Shutdown::new();
    let stop = shutdown.closing_token();
    let refresher = tokio::spawn(bus::report_consumer_lag(bus.clone(), EVERY, stop.clone()));

    for i in 0..N {
        bus.publish(&format!("lag.{i}"), None, Default::default(), "x".into())
            .await?;
    }
    gauge_reaches(&durable, N, "published, not delivered").await?;

    let delivered = fetch_n(&*consumer, N).await?;
    // Several refreshes later a delivered but unacked message still counts.
    tokio::time::sleep(EVERY * 5).await;
    gauge_reaches(&durable, N, "delivered, not acked").await?;

    for d in delivered {
        d.ack().await?;
    }
    gauge_reaches(&durable, 0, "all acked").await?;

    // A consumer this process lets go of is reported as 0 although its message waits: the
    // process that binds it next reports it.
    bus.publish("lag.more", None, Default::default(), "x".into())
        .await?;
    gauge_reaches(&durable, 1, "one more published").await?;
    drop(consumer);
    gauge_reaches(&durable, 0, "consumer released").await?;

    stop.cancel();
    tokio::time::timeout(SOON, refresher)
        .await
        .context("the refresher stops when its token fires")??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sqlite() -> anyhow::Result<()> {
    let db = TestDatabase::sqlite()?;
    let bus = bus::from_config(&config(None), db.connect_migrated().await?).await?;
    lag_is_reported_until_acked_or_released(bus).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_postgres() -> anyhow::Result<()> {
    let Some(db) = TestDatabase::postgres().await? else {
        eprintln!("note: PostgreSQL not configured; embedded-on-PostgreSQL lag skipped");
        return Ok(());
    };
    let bus = bus::from_config(&config(None), db.connect_migrated().await?).await?;
    lag_is_reported_until_acked_or_released(bus).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream() -> anyhow::Result<()> {
    let Some(url) = nats_url() else {
        eprintln!("note: NATS not configured; JetStream lag skipped");
        return Ok(());
    };
    let nats: Arc<dyn Bus> = Arc::new(bus::nats::NatsBus::connect(&config(Some(url))).await?);
    // Connecting happens in the background.
    eventually(SOON, || async { nats.health().await.ok() })
        .await
        .context("NATS did not become healthy")?;
    lag_is_reported_until_acked_or_released(Arc::new(bus::Metered::new(nats))).await
}
