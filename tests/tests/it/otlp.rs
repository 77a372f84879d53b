//! K3: traces leave over OTLP/HTTP when `telemetry.otlp_endpoint` is set, continuing the W3C
//! `traceparent` of the incoming request; the same context is what bus messages carry.
//! (In a process of its own: the tracer and log filter are process-wide and installed by the
//! first application.)

use std::sync::{Arc, Mutex};

use bulwark_tests::{Backend, TestAppBuilder};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn request_spans_are_exported_with_the_callers_trace_id() {
    if !bulwark_tests::isolated!(request_spans_are_exported_with_the_callers_trace_id) {
        return;
    }
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let r = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let r = r.clone();
            async move {
                r.lock().expect("lock").push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let mut app = TestAppBuilder::new(Backend::Embedded)
        .set("telemetry.otlp_endpoint", format!("http://{addr}"))
        // A bare level covers only Bulwark's crates; this test's own span (target `it::otlp`)
        // must be enabled too.
        .set("telemetry.log_level", "warn,bulwark=info,it=info")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let res = app
        .request(reqwest::Method::GET, "/livez", None)
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);

    // The same propagator puts the context into bus headers.
    let mut http_headers = axum::http::HeaderMap::new();
    http_headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .expect("header"),
    );
    let span = tracing::info_span!("publish");
    bulwark_kernel::telemetry::set_parent_from_http(&span, &http_headers);
    let mut headers = bulwark_kernel::bus::Headers::new();
    span.in_scope(|| bulwark_kernel::telemetry::inject_context(&mut headers));
    assert!(
        headers
            .get("traceparent")
            .is_some_and(|t| t.contains(TRACE_ID)),
        "bus headers carry the trace: {headers:?}"
    );

    app.stop().await.expect("stop");
    tokio::task::spawn_blocking(bulwark_kernel::telemetry::shutdown)
        .await
        .expect("flush");
    let id = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[i * 2..i * 2 + 2], 16).expect("hex"))
        .collect::<Vec<u8>>();
    let bodies = received.lock().expect("lock").clone();
    assert!(!bodies.is_empty(), "the collector received no export");
    assert!(
        bodies
            .iter()
            .any(|b| b.windows(16).any(|w| w == id.as_slice())),
        "no exported span carries the caller's trace id"
    );
}
