//! The HTTP surface every process shares: the home page `/`, `/livez`, `/readyz`, `/metrics`,
//! `/api/openapi.json` and its Swagger UI at `/api/docs/`, and the middleware stack around every module's routes (request id,
//! tracing with W3C `traceparent`, RED metrics by route template, CORS, compression, timeout,
//! body limit, and problem+json for every error).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
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
impl BearerAuth {
    fn modify_components(&self, components: &mut utoipa::openapi::Components) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if components.security_schemes.contains_key("bearer") {
            return;
        }
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
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        self.modify_components(openapi.components.get_or_insert_with(Default::default));
    }
}

/// The kernel's OpenAPI document, to merge module documents into (then complete the merged
/// document with [`document_common_responses`]).
pub fn kernel_openapi(version: &str) -> utoipa::openapi::OpenApi {
    let mut doc = KernelApi::openapi();
    doc.info.version = version.to_owned();
    doc
}

/// Liveness: the process answers. Never checks dependencies.
#[utoipa::path(get, path = "/livez", tag = "kernel", responses(
    (status = 200, description = "The process is alive: `{\"status\":\"ok\"}`", body = Object, content_type = "application/json")
))]
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
#[utoipa::path(get, path = "/api/openapi.json", tag = "kernel", responses(
    (status = 200, description = "OpenAPI 3.1 document", body = Object, content_type = "application/json")
))]
async fn openapi_json(State(k): State<KernelHttp>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        k.openapi.as_str().to_owned(),
    )
}

/// The effective configuration of this process, secrets redacted.
#[utoipa::path(get, path = "/api/admin/config", tag = "kernel", security(("bearer" = [])), responses(
    (status = 200, description = "Effective configuration", body = Object),
    (status = 403, description = "Role admin required")
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
    /// Subject (user name): 1 to 256 characters, not blank.
    #[schema(inline)]
    pub sub: Text<256>,
    pub role: Role,
    /// Lifetime: a whole number and one unit (`s`, `m`, `h`, `d`), 1s to 30d; default `1h`.
    #[serde(default)]
    #[schema(inline)]
    pub ttl: Option<TokenTtl>,
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
        (status = 403, description = "Role admin required"),
        (status = 409, description = "Tokens come from the identity provider (`auth.jwks_url` is set)")
))]
async fn issue_token(
    _auth: Auth<require::Admin>,
    Extension(authn): Extension<Arc<Authenticator>>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, Problem> {
    let ttl = req.ttl.map_or(Duration::from_secs(3600), TokenTtl::get);
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
/// (400 malformed/invalid, 415 wrong content type, 413 too large). Every request body of the
/// API is a JSON object: anything else is 400 `invalid-body` (serde would otherwise read a
/// struct from an array, `[null, null]`, by position).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|m| {
                m.strip_prefix("application/")
                    .is_some_and(|sub| sub == "json" || sub.ends_with("+json"))
            });
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .detail("expected `Content-Type: application/json`"));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) => {
                return Err(Problem::for_status(rejection.status()).detail(rejection.body_text()));
            }
        };
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') {
            return Err(invalid(
                "invalid-body",
                "Invalid request body",
                "the request body must be a JSON object".into(),
            ));
        }
        match Json::<T>::from_bytes(&bytes) {
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
                    J::JsonDataError(_) => invalid(
                        "invalid-body",
                        "Invalid request body",
                        rejection.body_text(),
                    ),
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

/// The field a serde error message (as `serde_path_to_error` renders it, which axum's `Json` and
/// `Query` use) is about: `a.b[0]: message` gives `a.b[0]`; at the top level, the field of
/// `missing field `x`` / `unknown field `x``.
fn serde_field(message: &str) -> Option<String> {
    if let Some((head, _)) = message.split_once(": ")
        && !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
    {
        return Some(head.to_owned());
    }
    ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|marker| {
            let rest = &message[message.find(marker)? + marker.len()..];
            rest.split('`').next().map(str::to_owned)
        })
}

/// A 400 problem for a request part that did not deserialize; `text` is the rejection's text
/// (`<what failed>: <serde message>`), and the field it names goes into `field`.
fn invalid(slug: &str, title: &str, text: String) -> Problem {
    let field = text.split_once(": ").and_then(|(_, m)| serde_field(m));
    let p = Problem::new(StatusCode::BAD_REQUEST, slug, title).detail(text);
    match field {
        Some(f) => p.extension("field", f.into()),
        None => p,
    }
}

/// Path parameters. A malformed one (`/api/orders/abc`) is a 400 problem of type
/// `invalid-path-parameter` naming the parameter, documented on every operation with
/// parameters by [`document_common_responses`].
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            // A route/type mismatch is a bug of ours, not of the request.
            Err(rejection) if rejection.status().is_server_error() => {
                Err(Problem::for_status(rejection.status()).detail(rejection.body_text()))
            }
            Err(rejection) => {
                let mut key = match &rejection {
                    PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                        ErrorKind::ParseErrorAtKey { key, .. }
                        | ErrorKind::InvalidUtf8InPathParam { key }
                        | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                // A single value (`ApiPath<i64>`) fails without a key: it is the route's only one.
                if key.is_none()
                    && let Ok(raw) =
                        axum::extract::RawPathParams::from_request_parts(parts, state).await
                {
                    let mut names = raw.iter().map(|(name, _)| name);
                    if let (Some(only), None) = (names.next(), names.next()) {
                        key = Some(only.to_owned());
                    }
                }
                let p = Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-path-parameter",
                    "Invalid path parameter",
                )
                .detail(rejection.body_text());
                Err(match key {
                    Some(k) => p.extension("field", k.into()),
                    None => p,
                })
            }
        }
    }
}

/// Query parameters. One that does not deserialize (wrong type, out of range, unknown with
/// `deny_unknown_fields`) is a 400 problem of type `invalid-query` naming it in `field`.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(invalid(
                "invalid-query",
                "Invalid query parameter",
                rejection.body_text(),
            )),
        }
    }
}

/// Characters that do not count as text: a [`Text`] is more than these, and loses them at its
/// ends. Deliberately ASCII, so that every regex engine (Rust, ECMAScript, Python) agrees with
/// the pattern in the schema.
const BLANK: [char; 4] = [' ', '\t', '\n', '\r'];
/// [`Text`]'s pattern: no NUL anywhere, and one character that is neither NUL nor [`BLANK`].
const TEXT_PATTERN: &str = r"^[^\x00]*[^\x00 \t\n\r][^\x00]*$";

/// Text a person typed (a title, a name): 1 to `MAX` characters, at least one of them not a
/// space, tab or line break, and no NUL (PostgreSQL refuses it in text). It deserializes only
/// when its OpenAPI schema (`minLength`, `maxLength`, `pattern`; use `#[schema(inline)]`) says
/// it is valid, so the two cannot drift. The value is the text with blank ends removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Text<const MAX: usize>(String);

impl<const MAX: usize> Text<MAX> {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let n = raw.chars().count();
        if n == 0 || n > MAX {
            return Err(format!("must be 1 to {MAX} characters, not {n}"));
        }
        if raw.contains('\0') {
            return Err("must not contain NUL".into());
        }
        let text = raw.trim_matches(BLANK);
        if text.is_empty() {
            return Err("must not be blank".into());
        }
        Ok(Self(text.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<const MAX: usize> std::ops::Deref for Text<MAX> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de, const MAX: usize> serde::Deserialize<'de> for Text<MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl<const MAX: usize> utoipa::PartialSchema for Text<MAX> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX))
            .pattern(Some(TEXT_PATTERN))
            .into()
    }
}

impl<const MAX: usize> utoipa::ToSchema for Text<MAX> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("Text{MAX}").into()
    }
}

/// Deserializes an integer as JSON Schema defines one: `5`, and also `5.0` or `5e0` (a number
/// with no fractional part), which JSON Schema's `integer` admits and serde's `i64` does not.
/// Query strings and paths give it plain digits.
fn json_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // i64::MAX as f64 rounds up to 2^63, which does not fit: the bound is exclusive.
            if v.fract() == 0.0 && v >= i64::MIN as f64 && v < i64::MAX as f64 {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_i64(Visitor)
}

/// An integer in `MIN..=MAX`: it deserializes only in range and documents the range
/// (`minimum`, `maximum`; use `#[schema(inline)]`/`#[param(inline)]`) from the same constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Bounded<const MIN: i64, const MAX: i64>(i64);

impl<const MIN: i64, const MAX: i64> Bounded<MIN, MAX> {
    pub const fn new(v: i64) -> Option<Self> {
        if v >= MIN && v <= MAX {
            Some(Self(v))
        } else {
            None
        }
    }
    pub const fn get(self) -> i64 {
        self.0
    }
}

/// The minimum.
impl<const MIN: i64, const MAX: i64> Default for Bounded<MIN, MAX> {
    fn default() -> Self {
        Self(MIN)
    }
}

impl<'de, const MIN: i64, const MAX: i64> serde::Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = json_integer(d)?;
        Self::new(v).ok_or_else(|| {
            serde::de::Error::custom(format!("must be between {MIN} and {MAX}, not {v}"))
        })
    }
}

impl<const MIN: i64, const MAX: i64> utoipa::PartialSchema for Bounded<MIN, MAX> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(MIN))
            .maximum(Some(MAX))
            .into()
    }
}

impl<const MIN: i64, const MAX: i64> utoipa::ToSchema for Bounded<MIN, MAX> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("Integer{MIN}To{MAX}").replace('-', "Minus").into()
    }
}

/// A page size: 1 to [`Limit::MAX`], [`Limit::DEFAULT`] when absent. Use it as
/// `#[serde(default)] #[param(inline)] limit: Limit` in a query struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Limit(u64);

impl Limit {
    pub const DEFAULT: u64 = 50;
    pub const MAX: u64 = 200;
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl Default for Limit {
    fn default() -> Self {
        Self(Self::DEFAULT)
    }
}

impl<'de> serde::Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = json_integer(d)?;
        if let Some(v) = u64::try_from(v)
            .ok()
            .filter(|v| (1..=Self::MAX).contains(v))
        {
            Ok(Self(v))
        } else {
            Err(serde::de::Error::custom(format!(
                "must be between 1 and {}, not {v}",
                Self::MAX
            )))
        }
    }
}

impl utoipa::PartialSchema for Limit {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1))
            .maximum(Some(Self::MAX))
            .default(Some(Self::DEFAULT.into()))
            .description(Some(format!(
                "Page size: 1 to {} (default {}).",
                Self::MAX,
                Self::DEFAULT
            )))
            .into()
    }
}

impl utoipa::ToSchema for Limit {}

/// A regular expression matching exactly the decimal numbers 1..=`max` (no sign, no leading
/// zero), for a `pattern` derived from the same bound the parser checks.
fn range_pattern(max: u64) -> String {
    if max == 0 {
        return "(?!)".into();
    }
    let digits: Vec<u8> = max.to_string().bytes().map(|b| b - b'0').collect();
    let k = digits.len();
    let mut alternatives = Vec::new();
    // Every number with fewer digits.
    match k {
        1 => {}
        2 => alternatives.push("[1-9]".to_owned()),
        _ => alternatives.push(format!("[1-9][0-9]{{0,{}}}", k - 2)),
    }
    // k digits: agree with `max` on a prefix, then one smaller digit, then anything.
    for i in 0..k {
        let lowest = u8::from(i == 0);
        let d = digits[i];
        if d > lowest {
            let prefix: String = digits[..i].iter().map(|d| char::from(b'0' + d)).collect();
            let rest = k - i - 1;
            let tail = match rest {
                0 => String::new(),
                1 => "[0-9]".to_owned(),
                n => format!("[0-9]{{{n}}}"),
            };
            let digit = if d - 1 == lowest {
                format!("{lowest}")
            } else {
                format!("[{lowest}-{}]", d - 1)
            };
            alternatives.push(format!("{prefix}{digit}{tail}"));
        }
    }
    alternatives.push(max.to_string());
    alternatives.join("|")
}

/// The longest token lifetime `POST /api/admin/tokens` mints.
const MAX_TTL_SECS: u64 = 30 * 86400;
const TTL_UNITS: [(char, u64); 4] = [('s', 1), ('m', 60), ('h', 3600), ('d', 86400)];

/// A token lifetime: a whole number and one unit (`s`, `m`, `h` or `d`: `90s`, `15m`, `1h`,
/// `30d`), from 1 second to 30 days. Its schema's pattern is built from the same bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTtl(Duration);

impl TokenTtl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || format!("`{s}` is not a lifetime from 1s to 30d such as `15m` or `1h`");
        let unit = s.chars().last().ok_or_else(err)?;
        let per = TTL_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, secs)| *secs)
            .ok_or_else(err)?;
        let number = &s[..s.len() - unit.len_utf8()];
        if number.starts_with('0') || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let secs = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .filter(|secs| (1..=MAX_TTL_SECS).contains(secs))
            .ok_or_else(err)?;
        Ok(Self(Duration::from_secs(secs)))
    }
    pub fn pattern() -> String {
        let units: Vec<String> = TTL_UNITS
            .iter()
            .map(|(u, secs)| format!("(?:{}){u}", range_pattern(MAX_TTL_SECS / secs)))
            .collect();
        format!("^(?:{})$", units.join("|"))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> serde::Deserialize<'de> for TokenTtl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for TokenTtl {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(Self::pattern()))
            .examples(["15m", "1h", "30d"])
            .into()
    }
}

impl utoipa::ToSchema for TokenTtl {}

/// Paths that need a token by convention: everything under `/api/` and `/ws/` except the
/// OpenAPI document itself.
fn needs_token(path: &str) -> bool {
    (path.starts_with("/api/") && path != "/api/openapi.json") || path.starts_with("/ws/")
}

/// Complete the merged OpenAPI document with what every route shares, so that no module can
/// forget it and a module added later gets it too (call it once on the merged document):
///
/// * operations under `/api/` and `/ws/` (except `/api/openapi.json`) require the bearer token;
/// * an operation that requires it documents 401 (with `WWW-Authenticate`), 403 and 503 (the
///   identity provider's keys unavailable);
/// * an operation with a request body documents 400, 413 and 415;
/// * an operation with parameters documents 400;
/// * every error response the document has without a body gets the problem+json `Problem` body.
///
/// What a route documents itself (its own description of 404, say) is kept.
pub fn document_common_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{Content, HeaderBuilder, Ref, RefOr};

    let components = doc.components.get_or_insert_with(Default::default);
    if !components.schemas.contains_key("Problem") {
        components.schemas.insert(
            "Problem".into(),
            <Problem as utoipa::PartialSchema>::schema(),
        );
    }
    BearerAuth.modify_components(components);
    for (path, item) in doc.paths.paths.iter_mut() {
        let shared_params = item.parameters.as_ref().is_some_and(|p| !p.is_empty());
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            if needs_token(path) && op.security.is_none() {
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
            let secured = op
                .security
                .as_ref()
                .is_some_and(|s| s.iter().any(|r| *r != SecurityRequirement::default()));
            let has_params = shared_params || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let has_body = op.request_body.is_some();
            let mut add = |status: &str, description: &str| {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| RefOr::T(problem::openapi_response(description)));
            };
            if has_body {
                add(
                    "400",
                    "Invalid request body (named in `field`), or an invalid parameter",
                );
                add("413", "Request body too large (`server.body_limit_bytes`)");
                add("415", "Request body is not `application/json`");
            }
            if has_params {
                add("400", "Invalid parameter (named in `field`)");
            }
            if secured {
                add(
                    "401",
                    "Missing, malformed, expired or wrongly signed bearer token",
                );
                add("403", "The token's role does not grant this operation");
                add(
                    "503",
                    "The identity provider's signing keys are unavailable (`auth.jwks_url`)",
                );
            }
            for (status, response) in op.responses.responses.iter_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                let is_error = status.starts_with('4') || status.starts_with('5');
                if is_error && response.content.is_empty() {
                    response.content.insert(
                        problem::CONTENT_TYPE.to_owned(),
                        Content::new(Some(Ref::from_schema_name("Problem"))),
                    );
                }
                if status == "401" && !response.headers.contains_key("WWW-Authenticate") {
                    response.headers.insert(
                        "WWW-Authenticate".into(),
                        HeaderBuilder::new()
                            .schema(
                                utoipa::openapi::schema::ObjectBuilder::new()
                                    .schema_type(utoipa::openapi::schema::Type::String)
                                    .enum_values(Some(["Bearer"])),
                            )
                            .description(Some("The scheme to authenticate with"))
                            .build(),
                    );
                }
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

    #[test]
    fn range_patterns_match_exactly_the_range() {
        assert_eq!(range_pattern(30), "[1-9]|[1-2][0-9]|30");
        assert_eq!(
            range_pattern(720),
            "[1-9][0-9]{0,1}|[1-6][0-9]{2}|7[0-1][0-9]|720"
        );
        assert_eq!(range_pattern(7), "[1-6]|7");
        assert_eq!(range_pattern(10), "[1-9]|10");
        assert_eq!(range_pattern(100), "[1-9][0-9]{0,1}|100");
        assert_eq!(
            range_pattern(2_592_000),
            "[1-9][0-9]{0,5}|1[0-9]{6}|2[0-4][0-9]{5}|25[0-8][0-9]{4}|259[0-1][0-9]{3}|2592000"
        );
        // A small matcher for the patterns range_pattern writes (alternatives of literal digits,
        // `[a-b]` classes and `{n}`/`{0,n}` repeats), checked against the numbers themselves.
        fn matches(pattern: &str, s: &str) -> bool {
            pattern.split('|').any(|alt| {
                let mut rest = s.as_bytes();
                let mut p = alt.as_bytes();
                while !p.is_empty() {
                    let (lo, hi, consumed) = if p[0] == b'[' {
                        (p[1], p[3], 5)
                    } else {
                        (p[0], p[0], 1)
                    };
                    p = &p[consumed..];
                    let (min, max) = if p.first() == Some(&b'{') {
                        let end = p.iter().position(|&c| c == b'}').unwrap_or(0);
                        let inner = std::str::from_utf8(&p[1..end]).unwrap_or("");
                        p = &p[end + 1..];
                        match inner.split_once(',') {
                            Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(0)),
                            None => (inner.parse().unwrap_or(0), inner.parse().unwrap_or(0)),
                        }
                    } else {
                        (1, 1)
                    };
                    let mut n = 0;
                    while n < max && n < rest.len() && (lo..=hi).contains(&rest[n]) {
                        n += 1;
                    }
                    // Greedy is exact here: a repeat is always the last part of its alternative.
                    if n < min {
                        return false;
                    }
                    rest = &rest[n..];
                }
                rest.is_empty()
            })
        }
        for max in [1, 7, 9, 10, 30, 99, 100, 101, 720, 999, 1000, 43_200] {
            let pattern = range_pattern(max);
            for n in 0..=max + 20 {
                assert_eq!(
                    matches(&pattern, &n.to_string()),
                    (1..=max).contains(&n),
                    "{n} against {pattern}"
                );
            }
            assert!(!matches(&pattern, "01"));
        }
    }

    #[test]
    fn token_ttl_parses_what_its_pattern_says() {
        assert_eq!(
            TokenTtl::parse("90s").map(TokenTtl::get),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(
            TokenTtl::parse("30d").map(TokenTtl::get),
            Ok(Duration::from_secs(30 * 86400))
        );
        assert_eq!(
            TokenTtl::parse("720h").map(TokenTtl::get),
            Ok(Duration::from_secs(30 * 86400))
        );
        assert_eq!(
            TokenTtl::parse("2592000s").map(TokenTtl::get),
            Ok(Duration::from_secs(30 * 86400))
        );
        for bad in [
            "",
            "s",
            "0s",
            "01m",
            "31d",
            "721h",
            "43201m",
            "2592001s",
            "1h30m",
            "1 h",
            "1hour",
            "-1s",
            "1é",
            "99999999999999999999d",
        ] {
            assert!(TokenTtl::parse(bad).is_err(), "{bad}");
        }
        let p = TokenTtl::pattern();
        assert!(p.starts_with("^(?:(?:") && p.ends_with("d)$"), "{p}");
        assert!(p.contains("(?:[1-9]|[1-2][0-9]|30)d"), "{p}");
    }

    #[test]
    fn text_is_trimmed_bounded_and_not_blank() {
        assert_eq!(
            Text::<5>::parse(" ab ").map(Text::into_string),
            Ok("ab".to_owned())
        );
        assert_eq!(
            Text::<3>::parse("éèê").map(Text::into_string),
            Ok("éèê".to_owned())
        );
        for bad in ["", "   ", "\t\n\r ", "abcdef", "a\0b"] {
            assert!(Text::<5>::parse(bad).is_err(), "{bad:?}");
        }
        // Counted before trimming, as JSON Schema's maxLength counts.
        assert!(Text::<3>::parse(" ab ").is_err());
        // Other Unicode spaces are text (the pattern is ASCII so every engine agrees).
        assert!(Text::<3>::parse("\u{2003}").is_ok());
    }

    #[test]
    fn integers_are_json_schema_integers() {
        type Small = Bounded<-5, 10>;
        let ok = |json: &str| serde_json::from_str::<Small>(json).map(Small::get).ok();
        assert_eq!(ok("10"), Some(10));
        assert_eq!(ok("-5"), Some(-5));
        assert_eq!(ok("3.0"), Some(3));
        assert_eq!(ok("1e1"), Some(10));
        for bad in [
            "11",
            "-6",
            "3.5",
            "\"3\"",
            "null",
            "1e300",
            "18446744073709551615",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
        let limit = |json: &str| serde_json::from_str::<Limit>(json).map(Limit::get).ok();
        assert_eq!(limit("200.0"), Some(200));
        assert_eq!(limit("0"), None);
        assert_eq!(limit("201"), None);
        assert_eq!(limit("-1"), None);
    }

    #[test]
    fn serde_messages_name_their_field() {
        assert_eq!(
            serde_field("title: must be 1 to 200 characters at line 1"),
            Some("title".into())
        );
        assert_eq!(
            serde_field("b[0].y: missing field `z`"),
            Some("b[0].y".into())
        );
        assert_eq!(
            serde_field("missing field `ends_at` at line 1 column 2"),
            Some("ends_at".into())
        );
        assert_eq!(
            serde_field("unknown field `price`, expected one of `title`"),
            Some("price".into())
        );
        assert_eq!(
            serde_field("invalid type: integer `5`, expected struct X"),
            None
        );
    }
}
