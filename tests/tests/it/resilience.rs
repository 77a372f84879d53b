//! Dependencies lost and regained under a running process (issue 2, item 11): readiness turns
//! 503 naming the dependency, a metric and a log line say so, the process stays up and
//! recovers on its own; nothing published and acknowledged is lost. Uses private Redis and
//! NATS servers so the shared ones keep serving other tests.

use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::bus::{Bus, ConsumerSpec, StreamSpec};
use bulwark_kernel::config::SecretUrl;
use bulwark_tests::procs::{free_port, start_nats, start_redis};
use bulwark_tests::services::{eventually, unique};
use bulwark_tests::{Backend, TestAppBuilder};
use serde_json::Value;

async fn readiness(app: &bulwark_tests::TestApp) -> (u16, Value) {
    let res = app.get("/readyz", None).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn redis_and_nats_lost_and_regained() {
    // `bulwark_dependency_up{dependency="bus:nats"}` is one gauge per process: another test's
    // application on the shared NATS would set it back to 1 under our feet.
    if !bulwark_tests::isolated!(redis_and_nats_lost_and_regained) {
        return;
    }
    let (redis_port, nats_port) = (free_port(), free_port());
    let nats_dir = tempfile::tempdir().expect("tempdir");
    let Some(mut redis) = start_redis(redis_port) else {
        return;
    };
    let Some(mut nats) = start_nats(nats_port, nats_dir.path()) else {
        return;
    };
    let prefix = unique("res");
    let Some(app) = TestAppBuilder::new(Backend::Real)
        .set("redis.url", format!("redis://127.0.0.1:{redis_port}/0"))
        .set("bus.url", format!("nats://127.0.0.1:{nats_port}"))
        .set("bus.prefix", prefix.clone())
        .set("bus.request_timeout", "1s")
        .set("redis.command_timeout", "500ms")
        .spawn()
        .await
        .expect("spawn")
    else {
        return;
    };
    assert_eq!(readiness(&app).await.0, 200);

    // Publish and get acknowledgements before the outage.
    let mut cfg = app.settings.kernel.bus.clone();
    cfg.url = Some(SecretUrl::new(format!("nats://127.0.0.1:{nats_port}")));
    let bus: Arc<dyn Bus> = Arc::new(
        bulwark_kernel::bus::nats::NatsBus::connect(&cfg)
            .await
            .expect("connect"),
    );
    bus.ensure_stream(&StreamSpec {
        name: "RESILIENCE".into(),
        subjects: vec!["res.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: None,
    })
    .await
    .expect("stream");
    for i in 0..20 {
        let ack = bus
            .publish(
                "res.msg",
                Some(&format!("m{i}")),
                Default::default(),
                format!("{i}").into(),
            )
            .await
            .expect("publish");
        assert!(!ack.duplicate);
    }

    // NATS goes away: readiness names it; the process stays alive.
    nats.kill9();
    let down = eventually(Duration::from_secs(15), || async {
        let (s, body) = readiness(&app).await;
        (s == 503 && body["checks"]["bus:nats"] != "ok").then_some(body)
    })
    .await;
    assert!(down.is_some(), "readiness never reported the NATS outage");
    assert_eq!(
        app.get("/livez", None).await.status(),
        200,
        "liveness is process-only"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"bulwark_dependency_up{dependency="bus:nats"} 0"#),
        "dependency metric shows the outage"
    );

    // NATS returns on the same port and store: recovery on its own, nothing acknowledged lost.
    let Some(_nats2) = start_nats(nats_port, nats_dir.path()) else {
        return;
    };
    let up = eventually(Duration::from_secs(30), || async {
        (readiness(&app).await.0 == 200).then_some(())
    })
    .await;
    assert!(
        up.is_some(),
        "readiness did not recover after NATS returned"
    );
    let consumer = bus
        .consumer(&ConsumerSpec {
            stream: "RESILIENCE".into(),
            durable: "check".into(),
            filter_subject: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
            dead_letter_subject: None,
        })
        .await
        .expect("consumer after recovery");
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let batch = consumer
            .fetch(20, Duration::from_secs(5))
            .await
            .expect("fetch");
        if batch.is_empty() {
            break;
        }
        for d in batch {
            seen.push(String::from_utf8_lossy(&d.payload).into_owned());
            d.ack().await.expect("ack");
        }
    }
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(
        seen, expected,
        "every acknowledged message survives the outage, in order"
    );

    // Redis goes away and returns.
    redis.kill9();
    let down = eventually(Duration::from_secs(15), || async {
        let (s, body) = readiness(&app).await;
        (s == 503 && body["checks"]["kv:redis"] != "ok").then_some(body)
    })
    .await;
    assert!(down.is_some(), "readiness never reported the Redis outage");
    let Some(_redis2) = start_redis(redis_port) else {
        return;
    };
    let up = eventually(Duration::from_secs(30), || async {
        (readiness(&app).await.0 == 200).then_some(())
    })
    .await;
    assert!(
        up.is_some(),
        "readiness did not recover after Redis returned"
    );
}

/// A Redis that stops answering (SIGSTOP: the connection stays open, no reply comes) fails
/// each command after `redis.command_timeout` as `Unavailable` — the client's own per-command
/// timeout, the only one since the store dropped its second, tokio-side timer — and answers
/// again after SIGCONT.
#[tokio::test]
async fn a_redis_that_stops_answering_fails_commands_after_the_command_timeout() {
    use bulwark_kernel::kv::{KvError, KvStore};
    let port = free_port();
    let Some(redis) = start_redis(port) else {
        return;
    };
    let mut cfg = bulwark_tests::services::default_settings().kernel.redis;
    cfg.url = Some(SecretUrl::new(format!("redis://127.0.0.1:{port}/0")));
    cfg.key_prefix = format!("{}:", unique("hang"));
    cfg.command_timeout = Duration::from_millis(300);
    let store = bulwark_kernel::kv::redis::RedisStore::connect(&cfg)
        .await
        .expect("redis");
    store
        .set("k", bytes::Bytes::from_static(b"v"), None)
        .await
        .expect("set while up");
    redis.signal("STOP");
    let hung = tokio::time::timeout(Duration::from_secs(5), store.get("k")).await;
    redis.signal("CONT");
    match hung {
        Ok(Err(KvError::Unavailable(_))) => {}
        Ok(other) => panic!("expected Unavailable from a silent Redis, got {other:?}"),
        Err(_) => panic!("a command to a silent Redis hung past 5 s (command_timeout 300 ms)"),
    }
    let back = eventually(Duration::from_secs(10), || async {
        store.get("k").await.ok().flatten()
    })
    .await;
    assert_eq!(
        back.as_deref(),
        Some(&b"v"[..]),
        "answers again after SIGCONT"
    );
}
