//! K4: a consumer process killed (SIGKILL) while holding a message does not lose it: a
//! restarted consumer with the same durable name gets it again after ack_wait.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulwark_kernel::bus::{Bus, ConsumerSpec, StreamSpec};
use bulwark_kernel::config::SecretUrl;
use bulwark_tests::procs::Proc;
use bulwark_tests::services::{TestDatabase, default_settings, nats_url, unique};

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

async fn killed_mid_message_is_redelivered(bus: &dyn Bus, child_args: &[String]) {
    bus.ensure_stream(&StreamSpec {
        name: "KILL".into(),
        subjects: vec!["kill.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: None,
    })
    .await
    .expect("stream");
    // Bind the durable before publishing so the child resumes it.
    drop(bus.consumer(&spec()).await.expect("consumer"));
    let ack = bus
        .publish(
            "kill.job",
            Some("job-1"),
            Default::default(),
            "payload".into(),
        )
        .await
        .expect("publish");

    let child = Command::new(env!("CARGO_BIN_EXE_bus-consumer"))
        .args(child_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn consumer");
    let mut proc = Proc { child };
    let stdout = proc.child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read");
    assert_eq!(
        line.trim(),
        format!("got {} 1", ack.sequence),
        "the child took the message"
    );
    proc.kill9();

    let consumer = bus
        .consumer(&spec())
        .await
        .expect("consumer after the kill");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.is_empty() && tokio::time::Instant::now() < deadline {
        got = consumer
            .fetch(1, Duration::from_secs(2))
            .await
            .expect("fetch");
    }
    assert_eq!(
        got.len(),
        1,
        "the message held by the killed process comes back"
    );
    let d = got.remove(0);
    assert_eq!(d.sequence, ack.sequence);
    assert_eq!(d.delivered, 2);
    assert_eq!(d.message_id.as_deref(), Some("job-1"));
    d.ack().await.expect("ack");
    assert!(
        consumer
            .fetch(1, Duration::from_millis(1500))
            .await
            .expect("fetch")
            .is_empty(),
        "acked: gone"
    );
}

#[tokio::test]
async fn embedded_sqlite() {
    let db = TestDatabase::sqlite().expect("db");
    let conn = db.connect_migrated().await.expect("migrate");
    let bus = bulwark_kernel::bus::embedded::EmbeddedBus::new(conn, &default_settings().kernel.bus);
    killed_mid_message_is_redelivered(&bus, &["embedded".into(), db.url.clone()]).await;
}

#[tokio::test]
async fn embedded_postgres() {
    let Some(db) = TestDatabase::postgres().await.expect("db") else {
        return;
    };
    let conn = db.connect_migrated().await.expect("migrate");
    let bus = bulwark_kernel::bus::embedded::EmbeddedBus::new(conn, &default_settings().kernel.bus);
    killed_mid_message_is_redelivered(&bus, &["embedded".into(), db.url.clone()]).await;
}

#[tokio::test]
async fn nats_jetstream() {
    let Some(url) = nats_url() else { return };
    let prefix = unique("kill");
    let mut cfg = default_settings().kernel.bus;
    cfg.url = Some(SecretUrl::new(url.clone()));
    cfg.prefix = prefix.clone();
    let bus = bulwark_kernel::bus::nats::NatsBus::connect(&cfg)
        .await
        .expect("connect");
    killed_mid_message_is_redelivered(&bus, &["nats".into(), url, prefix]).await;
}
