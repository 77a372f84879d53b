//! Telemetry (K3): tracing logs (JSON or pretty), OpenTelemetry traces over OTLP/HTTP, and
//! Prometheus metrics through metrics-exporter-prometheus with real histogram buckets.
//!
//! Trace context travels as W3C `traceparent`: taken from HTTP requests (see [`crate::http`])
//! and carried in bus message headers ([`inject_context`] / [`extract_context`]).

use std::io::IsTerminal as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::bus::Headers;
use crate::config::{LogFormat, TelemetryConfig};

/// Histogram buckets for every `*_seconds` metric: 0.5 ms … 30 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log_level: {0}")]
    Filter(String),
    #[error("telemetry.otlp_endpoint: {0}")]
    Otlp(String),
    #[error("metrics recorder: {0}")]
    Metrics(String),
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
static TRACER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(h) = PROMETHEUS.get() {
        return Ok(h.clone());
    }
    // Two applications starting at once in one process (tests) must not race the install.
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = PROMETHEUS.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        .install_recorder()
        .or_else(|e| {
            PROMETHEUS
                .get()
                .cloned()
                .ok_or_else(|| TelemetryError::Metrics(e.to_string()))
        })?;
    Ok(PROMETHEUS.get_or_init(|| handle).clone())
}

/// Install logging, tracing and metrics for the process. Safe to call more than once (tests
/// start several applications in one process): later calls reuse what the first installed.
pub fn init(cfg: &TelemetryConfig) -> Result<PrometheusHandle, TelemetryError> {
    let handle = prometheus()?;
    if TRACER.get().is_some() {
        return Ok(handle);
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter_directive(&cfg.log_level)))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let provider = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    cfg.trace_sample_ratio,
                ))))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(cfg.service_name.clone())
                        .build(),
                )
                .build()
        }
        // No exporter: spans still get trace ids, so `traceparent` propagates through us.
        None => SdkTracerProvider::builder().build(),
    };
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("bulwark"));
    let json = match cfg.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(crate::log_format::JsonLines),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    };
    if installed.is_ok() {
        opentelemetry::global::set_tracer_provider(provider.clone());
        let _ = TRACER.set(Some(provider));
    } else {
        let _ = TRACER.set(None);
    }
    Ok(handle)
}

/// The filter for `telemetry.log_level`. A bare level (`info`, `debug`) applies to Bulwark's
/// own crates only; third-party crates log at `warn` (their `info` lines, such as
/// sea-orm-migration's per-set "Applying all pending migrations" or opentelemetry's "Global
/// tracer provider is set", are noise to an operator). A full directive
/// (`info,sqlx=debug`) is used as written.
pub fn filter_directive(log_level: &str) -> String {
    use tracing_subscriber::filter::LevelFilter;
    match log_level.trim().parse::<LevelFilter>() {
        Ok(level) if level > LevelFilter::WARN => format!("warn,bulwark={level}"),
        _ => log_level.to_owned(),
    }
}

/// Flush and stop trace export (at exit).
pub fn shutdown() {
    if let Some(Some(provider)) = TRACER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(message = "Trace exporter did not shut down cleanly.", %error);
    }
}

/// Help text for the kernel's metrics, and zero-valued series for counters whose first event
/// may never come (so `increase()` sees the first dead letter, and dashboards see a 0, not
/// "no data").
pub fn describe_kernel_metrics(bus: &str) {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bulwark_http_requests_total",
        "HTTP requests by module, route template, method and status."
    );
    describe_histogram!(
        "bulwark_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route template."
    );
    describe_histogram!(
        "bulwark_startup_duration_seconds",
        Unit::Seconds,
        "Time from start to serving."
    );
    describe_gauge!(
        "bulwark_dependency_up",
        "1 when the dependency answers its readiness check, else 0."
    );
    describe_counter!(
        "bulwark_dependency_failures_total",
        "Transitions of a dependency from up to down."
    );
    describe_gauge!(
        "bulwark_websocket_connections",
        "Open WebSocket connections by module."
    );
    describe_counter!(
        "bulwark_websocket_closed_for_restart_total",
        "WebSockets closed with 1012 during a drain."
    );
    metrics::describe_gauge!(
        "bulwark_db_pool_connections",
        "Database pool connections by pool (primary, read) and state (in_use, idle)."
    );
    metrics::describe_gauge!(
        "bulwark_db_pool_max_connections",
        "Configured maximum of each database pool (database.max_connections)."
    );
    describe_counter!(
        "bulwark_websocket_dropped_unread_total",
        "WebSockets dropped because the client stopped reading and the last frames could not be flushed."
    );
    describe_counter!(
        "bulwark_bus_published_total",
        "Durable publishes by outcome (stored, duplicate, error)."
    );
    describe_histogram!(
        "bulwark_bus_publish_duration_seconds",
        Unit::Seconds,
        "Publish to store acknowledgement."
    );
    describe_counter!(
        "bulwark_bus_deliveries_total",
        "Deliveries to durable consumers, redeliveries included."
    );
    describe_counter!(
        "bulwark_bus_redeliveries_total",
        "Deliveries after the first (unacked, nak'd or timed out)."
    );
    describe_counter!(
        "bulwark_bus_dead_letters_total",
        "Messages moved to a dead-letter subject after max_deliver."
    );
    describe_counter!(
        "bulwark_bus_acks_total",
        "Consumer acknowledgements by kind (ack, nak, progress, term)."
    );
    metrics::describe_gauge!(
        "bulwark_bus_consumer_pending",
        "Messages a durable consumer has not finished (waiting plus unacked), by stream and \
         consumer; reported by the process consuming it."
    );
    describe_counter!(
        "bulwark_kv_errors_total",
        "Key-value store errors by store and operation."
    );
    describe_histogram!(
        "bulwark_kv_command_duration_seconds",
        Unit::Seconds,
        "Redis command latency."
    );
    let bus = bus.to_owned();
    for name in [
        "bulwark_bus_deliveries_total",
        "bulwark_bus_redeliveries_total",
        "bulwark_bus_dead_letters_total",
    ] {
        metrics::counter!(name, "bus" => bus.clone()).increment(0);
    }
}

/// `bulwark_build_info{version,modules} 1`.
pub fn record_build_info(version: &str, modules: &[&str]) {
    metrics::describe_gauge!(
        "bulwark_build_info",
        "Build version and compiled-in modules (always 1)."
    );
    metrics::gauge!("bulwark_build_info", "version" => version.to_owned(), "modules" => modules.join(",")).set(1.0);
}

/// Standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// open fds, threads), read at scrape time by metrics-process.
pub fn record_process_metrics() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
}

struct MapInjector<'a>(&'a mut Headers);
impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a Headers);
impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Inject the current span's W3C trace context (`traceparent`, `tracestate`) into `headers`.
pub fn inject_context(headers: &mut Headers) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MapInjector(headers))
    });
}

/// The trace context carried in `headers`.
pub fn extract_context(headers: &Headers) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapExtractor(headers)))
}

/// Make `span` a child of the trace carried in `headers` (a bus message's producer).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &Headers) {
    let _ = span.set_parent(extract_context(headers));
}

struct HttpExtractor<'a>(&'a axum::http::HeaderMap);
impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Make `span` a child of the trace in an HTTP request's `traceparent` header.
pub fn set_parent_from_http(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpExtractor(headers)));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::filter_directive;

    #[test]
    fn a_bare_level_keeps_third_party_crates_at_warn() {
        assert_eq!(filter_directive("info"), "warn,bulwark=info");
        assert_eq!(filter_directive("debug"), "warn,bulwark=debug");
        assert_eq!(filter_directive("warn"), "warn");
        assert_eq!(filter_directive("error"), "error");
        assert_eq!(filter_directive("info,sqlx=debug"), "info,sqlx=debug");
    }
}
