//! The HTTP surface every process shares: the home page `/`, `/livez`, `/readyz`, `/metrics`,
//! `/api/openapi.json` and its Swagger UI at `/api/docs/`, and the middleware stack around every module's routes (request id,
//! tracing with W3C `traceparent`, RED metrics by route template, CORS, compression, timeout,
//! body limit, and problem+json for every error).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::auth::{Auth, Authenticator, Role, require};
use crate::config::ServerConfig;
use crate::problem::{self, Problem};
use crate::readiness::{Readiness, ReadinessReport};

/// Shared state of the kernel's own endpoints.
#[derive(Clone)]
pub struct KernelHttp {
    pub readiness: Readiness,
    pub prometheus: PrometheusHandle,
    /// The merged OpenAPI document, rendered once.
    pub openapi: Arc<String>,
    /// The effective configuration, secrets redacted (for `GET /api/admin/config`).
    pub effective_config: Arc<serde_json::Value>,
    /// What the home page (`/`) lists: version, modules, their pages.
    pub home: Arc<crate::home::Home>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bulwark", description = "One binary, five modules. Errors are RFC 9457 problem+json."),
    paths(livez, readyz, openapi_json, admin_config, issue_token),
    components(schemas(Problem, ReadinessReport, TokenRequest, TokenResponse)),
    modifiers(&BearerAuth)
)]
struct KernelApi;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The kernel's OpenAPI document, to merge module documents into.
pub fn kernel_openapi(version: &str) -> utoipa::openapi::OpenApi {
    let mut doc = KernelApi::openapi();
    doc.info.version = version.to_owned();
    doc
}

/// Liveness: the process answers. Never checks dependencies.
#[utoipa::path(get, path = "/livez", tag = "kernel", responses((status = 200, description = "The process is alive")))]
async fn livez() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

/// Readiness: every configured dependency answers and the process is not draining.
#[utoipa::path(get, path = "/readyz", tag = "kernel", responses(
    (status = 200, description = "Ready", body = ReadinessReport),
    (status = 503, description = "Not ready or draining: a problem with `state` and `checks`", body = Problem, content_type = "application/problem+json")
))]
async fn readyz(State(k): State<KernelHttp>) -> impl IntoResponse {
    let report = k.readiness.report().await;
    if report.is_ready() {
        return Json(report).into_response();
    }
    // Errors are problem+json everywhere, probes included; the report rides along.
    let failing: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, v)| v.as_str() != "ok")
        .map(|(k, _)| k.as_str())
        .collect();
    let detail = if report.status == "draining" {
        "draining: shutting down".to_owned()
    } else {
        format!("unavailable: {}", failing.join(", "))
    };
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
        .detail(detail)
        .extension("state", report.status.into())
        .extension(
            "checks",
            serde_json::to_value(&report.checks).unwrap_or_default(),
        )
        .into_response()
}

/// The OpenAPI document of this build (kernel and every compiled-in module).
#[utoipa::path(get, path = "/api/openapi.json", tag = "kernel", responses((status = 200, description = "OpenAPI 3.1 document")))]
async fn openapi_json(State(k): State<KernelHttp>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        k.openapi.as_str().to_owned(),
    )
}

/// The effective configuration of this process, secrets redacted.
#[utoipa::path(get, path = "/api/admin/config", tag = "kernel", security(("bearer" = [])), responses(
    (status = 200, description = "Effective configuration"),
    (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
    (status = 403, description = "Role admin required", body = Problem, content_type = "application/problem+json")
))]
async fn admin_config(
    _auth: Auth<require::Admin>,
    State(k): State<KernelHttp>,
) -> impl IntoResponse {
    Json(k.effective_config.as_ref().clone())
}

/// Mint a token (HS256 deployments only).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Subject (user name).
    pub sub: String,
    pub role: Role,
    /// Lifetime such as `1h` (default) or `15m`; at most 30 days.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub token: String,
    /// Lifetime in seconds.
    pub expires_in: u64,
}

/// Mint a token for someone else (role admin). Refused when tokens come from a JWKS provider.
#[utoipa::path(post, path = "/api/admin/tokens", tag = "kernel", security(("bearer" = [])),
    request_body = TokenRequest,
    responses(
        (status = 200, description = "Token minted", body = TokenResponse),
        (status = 400, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role admin required", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json")
))]
async fn issue_token(
    _auth: Auth<require::Admin>,
    Extension(authn): Extension<Arc<Authenticator>>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, Problem> {
    let ttl = req.ttl.unwrap_or(Duration::from_secs(3600));
    if ttl.is_zero() || ttl > Duration::from_secs(30 * 86400) {
        return Err(Problem::bad_request("`ttl` must be between 1s and 30 days")
            .extension("field", "ttl".into()));
    }
    if req.sub.trim().is_empty() {
        return Err(
            Problem::bad_request("`sub` must not be empty").extension("field", "sub".into())
        );
    }
    let token = authn
        .issue(&req.sub, req.role, ttl)
        .map_err(|e| Problem::conflict(e.to_string()))?;
    Ok(Json(TokenResponse {
        token,
        expires_in: ttl.as_secs(),
    }))
}

/// Prometheus text exposition.
pub async fn metrics_handler(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    crate::telemetry::record_process_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

/// Where the interactive API docs are served (Swagger UI, vendored into the binary).
pub const API_DOCS_PATH: &str = "/api/docs/";

/// The Swagger UI at `/api/docs/`, reading the existing `/api/openapi.json`. Its files are
/// compiled in (`utoipa-swagger-ui`'s `vendored` feature) and the online validator is off, so
/// it loads nothing from the network.
fn api_docs_router() -> Router {
    use utoipa_swagger_ui::{Config, SwaggerUi};
    SwaggerUi::new(API_DOCS_PATH)
        .config(
            Config::new(["/api/openapi.json"])
                .validator_url("none")
                .persist_authorization(true)
                .try_it_out_enabled(true)
                .filter(true),
        )
        .into()
}

/// The home page, rendered once: plain HTML, no script, nothing loaded from elsewhere.
fn home_router(html: bytes::Bytes) -> Router {
    Router::new().route(
        "/",
        get(move || {
            let html = html.clone();
            async move {
                (
                    [(
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
                    )],
                    axum::response::Html(html),
                )
            }
        }),
    )
}

/// A router serving only `/metrics` (for `server.metrics_listen`).
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(handle)
        .fallback(not_found)
}

async fn not_found(req: Request) -> Problem {
    Problem::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// The module label of a route template: `/api/<module>/...`, `/ws/<module>/...`, else `kernel`.
fn module_of(route: &str) -> &str {
    let mut parts = route.trim_start_matches('/').split('/');
    match (parts.next(), parts.next()) {
        (Some("api" | "ws"), Some(m))
            if !m.is_empty()
                && !m.starts_with('{')
                && m != "openapi.json"
                && m != "admin"
                && m != "docs" =>
        {
            m
        }
        _ => "kernel",
    }
}

type RedHandles = (metrics::Counter, metrics::Histogram);

/// Metric handles per (route, method, status), built once: registering labels costs
/// allocations and hashing that a hot endpoint should not pay per request.
fn red_handles(route: &str, method: &'static str, status: u16) -> RedHandles {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    type Handles = RwLock<HashMap<String, HashMap<(&'static str, u16), RedHandles>>>;
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    let known = HANDLES.get_or_init(Handles::default);
    if let Ok(map) = known.read()
        && let Some(h) = map.get(route).and_then(|m| m.get(&(method, status)))
    {
        return h.clone();
    }
    let module = module_of(route).to_owned();
    let handles = (
        metrics::counter!("bulwark_http_requests_total",
            "module" => module.clone(), "route" => route.to_owned(), "method" => method, "status" => status.to_string()),
        metrics::histogram!("bulwark_http_request_duration_seconds",
            "module" => module, "route" => route.to_owned(), "method" => method),
    );
    if let Ok(mut map) = known.write() {
        map.entry(route.to_owned())
            .or_default()
            .insert((method, status), handles.clone());
    }
    handles
}

/// RED metrics labelled with the matched route template, never the raw path.
async fn red_metrics(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let res = next.run(req).await;
    let route = route
        .as_ref()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched");
    let (requests, duration) = red_handles(route, method, res.status().as_u16());
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    res
}

/// Turn any error response that is not already problem+json (routing 404/405, timeout 408,
/// body limit 413, extractor rejections) into one, keeping a short text body as `detail`.
async fn problemify(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if status.as_u16() < 400 {
        return res;
    }
    let ct = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with(problem::CONTENT_TYPE) {
        return res;
    }
    let is_text = ct.starts_with("text/plain");
    let (parts, body) = res.into_parts();
    let detail = if is_text {
        axum::body::to_bytes(body, 4096)
            .await
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    } else {
        None
    };
    let mut p = Problem::for_status(status);
    if let Some(d) = detail.filter(|d| !d.is_empty()) {
        p = p.detail(d);
    }
    let mut out = p.into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(id) = parts.headers.get("x-request-id") {
        out.headers_mut().insert("x-request-id", id.clone());
    }
    out
}

fn cors_layer(cfg: &ServerConfig) -> CorsLayer {
    let origins = &cfg.cors_allowed_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            "x-request-id".parse().unwrap_or(header::ACCEPT),
        ])
}

/// Assemble the whole HTTP application: kernel endpoints, module routes, middleware.
pub fn app(
    cfg: &ServerConfig,
    kernel: KernelHttp,
    auth: Arc<Authenticator>,
    modules: Router,
) -> Router {
    let mut kernel_routes = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/admin/config", get(admin_config))
        .route("/api/admin/tokens", axum::routing::post(issue_token))
        .with_state(kernel.clone());
    if cfg.metrics_listen.is_none() {
        kernel_routes = kernel_routes.merge(metrics_router(kernel.prometheus.clone()));
    }
    let home = kernel.home.render(cfg.metrics_listen);
    kernel_routes = kernel_routes
        .merge(home_router(bytes::Bytes::from(home)))
        .merge(api_docs_router());
    // Layers are added inside-out; optional ones (CORS, compression) are left out entirely
    // when not configured rather than run as no-ops on every request.
    let mut router = kernel_routes.merge(modules).fallback(not_found).layer(
        ServiceBuilder::new()
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                cfg.request_timeout,
            ))
            .layer(DefaultBodyLimit::max(cfg.body_limit_bytes))
            .layer(Extension(auth)),
    );
    if !cfg.cors_allowed_origins.is_empty() {
        router = router.layer(cors_layer(cfg));
    }
    router = router.layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn(red_metrics))
            .layer(middleware::from_fn(problemify))
            // Outside CORS and Timeout: both need a response body with `Default`; the limit's has none.
            .layer(RequestBodyLimitLayer::new(cfg.body_limit_bytes)),
    );
    if cfg.compression {
        router = router.layer(CompressionLayer::new());
    }
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(FastRequestId::default()))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request<Body>| {
                        if !tracing::enabled!(tracing::Level::INFO) {
                            return tracing::Span::none();
                        }
                        let route = req
                            .extensions()
                            .get::<MatchedPath>()
                            .map(|m| m.as_str())
                            .unwrap_or_default();
                        let request_id = req
                            .headers()
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        let span = tracing::info_span!("http.request",
                            otel.name = %format!("{} {}", req.method(), route),
                            http.request.method = %req.method(),
                            http.route = %route,
                            request_id = %request_id);
                        crate::telemetry::set_parent_from_http(&span, req.headers());
                        span
                    })
                    // 5xx are counted by the RED metrics; a log line each would flood during an outage.
                    .on_failure(
                        tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                    ),
            )
            .layer(PropagateRequestIdLayer::x_request_id()),
    )
}

/// Request ids without a syscall per request: a random per-process prefix and a counter
/// (UUIDv4 would read the OS random source every time).
#[derive(Clone)]
struct FastRequestId {
    prefix: Arc<str>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for FastRequestId {
    fn default() -> Self {
        let prefix: u64 = rand::random();
        Self {
            prefix: format!("{prefix:016x}").into(),
            next: Arc::default(),
        }
    }
}

impl tower_http::request_id::MakeRequestId for FastRequestId {
    fn make_request_id<B>(
        &mut self,
        _req: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix))
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// A JSON body extractor whose rejections are problem+json naming what is wrong
/// (400 malformed/invalid, 415 wrong content type, 413 too large).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                use axum::extract::rejection::JsonRejection as J;
                let p = match &rejection {
                    J::MissingJsonContentType(_) => Problem::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported-media-type",
                        "Unsupported media type",
                    )
                    .detail("expected `Content-Type: application/json`"),
                    J::JsonSyntaxError(_) => {
                        Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON")
                            .detail(rejection.body_text())
                    }
                    J::JsonDataError(_) => Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-body",
                        "Invalid request body",
                    )
                    .detail(rejection.body_text()),
                    _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        Problem::for_status(StatusCode::PAYLOAD_TOO_LARGE)
                            .detail(rejection.body_text())
                    }
                    _ => Problem::for_status(rejection.status()).detail(rejection.body_text()),
                };
                Err(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_labels() {
        assert_eq!(module_of("/api/m1/stats"), "m1");
        assert_eq!(module_of("/ws/m2/{id}"), "m2");
        assert_eq!(module_of("/api/openapi.json"), "kernel");
        assert_eq!(module_of("/api/docs/{*rest}"), "kernel");
        assert_eq!(module_of("/livez"), "kernel");
        assert_eq!(module_of("unmatched"), "kernel");
    }
}
