//! K7 through the real application: WebSockets authenticate at upgrade and are told 1012 when
//! the process drains; a bus handler still working at the drain deadline naks its message so
//! it is redelivered at once, not lost and not stuck until ack_wait.

use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::auth::Role;
use bulwark_kernel::bus::Bus;
use bulwark_tests::probe::{ProbeModule, ProbeState, SUBJECT, consumer_spec};
use bulwark_tests::{Backend, TestAppBuilder};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_needs_a_token_at_upgrade() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .module(Arc::new(ProbeModule {
            state: Arc::default(),
        }))
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let url = app.ws_url("/ws/probe/echo");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected a 401 at upgrade, got {other:?}"),
    }
    let url = app.ws_url("/ws/probe/echo?access_token=garbage");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected a 401 for a bad token, got {other:?}"),
    }
}

#[tokio::test]
async fn websockets_are_closed_with_1012_on_drain() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .module(Arc::new(ProbeModule {
            state: Arc::default(),
        }))
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let token = app.token(Role::Viewer);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let url = app.ws_url(&format!("/ws/probe/echo?access_token={token}"));
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        ws.send(Message::text("hello")).await.expect("send");
        let echoed = ws.next().await.expect("frame").expect("ok");
        assert_eq!(echoed, Message::text("hello"));
        clients.push(ws);
    }
    let metrics = app.metrics_text().await;
    // The recorder is process-wide: other tests in this binary may hold probe sockets too.
    let open = bulwark_tests::metrics::value(
        &metrics,
        "bulwark_websocket_connections",
        &[("module", "probe")],
    )
    .unwrap_or(0.0);
    assert!(
        open >= 5.0,
        "5 tracked sockets, gauge says {open}: {metrics}"
    );
    let mut app = app;
    let stopping = tokio::spawn(async move { app.stop().await });
    for mut ws in clients {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close in time");
        match frame {
            Some(Ok(Message::Close(Some(cf)))) => assert_eq!(u16::from(cf.code), 1012),
            other => panic!("expected close 1012, got {other:?}"),
        }
    }
    stopping.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn unfinished_bus_work_is_nakd_at_the_drain_deadline() {
    let state = Arc::new(ProbeState::default());
    let mut app = TestAppBuilder::new(Backend::Embedded)
        .module(Arc::new(ProbeModule {
            state: state.clone(),
        }))
        .set("drain.timeout", "300ms")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let db = app.db.connect_migrated().await.expect("db");
    let bus = bulwark_kernel::bus::embedded::EmbeddedBus::new(db, &app.settings.kernel.bus);
    bus.publish(SUBJECT, Some("job-1"), Default::default(), "work".into())
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(10), state.started.notified())
        .await
        .expect("the worker took the job");
    app.stop().await.expect("stop");
    // ack_wait is 30 s: getting it back within 3 s proves the nak.
    let consumer = bus.consumer(&consumer_spec()).await.expect("consumer");
    let again = consumer
        .fetch(1, Duration::from_secs(3))
        .await
        .expect("fetch");
    assert_eq!(again.len(), 1, "the unfinished job is available again");
    assert_eq!(again[0].delivered, 2);
    assert_eq!(again[0].message_id.as_deref(), Some("job-1"));
}

#[tokio::test]
async fn a_draining_instance_refuses_new_sockets_with_503() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .module(Arc::new(ProbeModule {
            state: Arc::default(),
        }))
        .set("drain.grace", "3s")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let url = app.ws_url(&format!(
        "/ws/probe/echo?access_token={}",
        app.token(Role::Viewer)
    ));
    let (mut before, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect before the drain");
    app.shutdown.trigger();
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 503);
            assert_eq!(
                res.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        other => panic!("expected 503 at upgrade while draining, got {other:?}"),
    }
    // A socket opened before the drain keeps working during the grace period.
    before
        .send(Message::text("still here"))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(2), before.next())
        .await
        .expect("echo in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(echoed, Message::text("still here"));
}
