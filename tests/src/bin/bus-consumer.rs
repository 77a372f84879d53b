//! A bus consumer process for the kill -9 test (K4): takes one message, reports it on stdout,
//! and never acks — the test kills it mid-message.
//!
//! `bus-consumer embedded <database-url>` or `bus-consumer nats <nats-url> <prefix>`.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_kernel::bus::{Bus, ConsumerSpec};
use bulwark_kernel::config::SecretUrl;

fn spec() -> ConsumerSpec {
    ConsumerSpec {
        stream: "KILL".into(),
        durable: "killed".into(),
        filter_subject: None,
        ack_wait: Duration::from_secs(1),
        max_deliver: 10,
        dead_letter_subject: None,
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let defaults = bulwark_tests::services::default_settings().kernel;
        let bus: Box<dyn Bus> = match args.get(1).map(String::as_str) {
            Some("embedded") => {
                let url = args.get(2).context("database url")?;
                let db = bulwark_kernel::db::connect_url(url, &defaults.database).await?;
                Box::new(bulwark_kernel::bus::embedded::EmbeddedBus::new(
                    db,
                    &defaults.bus,
                ))
            }
            Some("nats") => {
                let mut cfg = defaults.bus.clone();
                cfg.url = Some(SecretUrl::new(args.get(2).context("nats url")?.clone()));
                cfg.prefix = args.get(3).context("prefix")?.clone();
                Box::new(bulwark_kernel::bus::nats::NatsBus::connect(&cfg).await?)
            }
            _ => anyhow::bail!("usage: bus-consumer embedded <db-url> | nats <url> <prefix>"),
        };
        let consumer = bus.consumer(&spec()).await?;
        loop {
            if let Some(d) = consumer
                .fetch(1, Duration::from_secs(1))
                .await?
                .into_iter()
                .next()
            {
                println!("got {} {}", d.sequence, d.delivered);
                std::io::stdout().flush()?;
                // Hold it, never ack: the parent kills us here.
                let _held = d;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    })
}
