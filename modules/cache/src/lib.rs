//! The `cache` module: stampede-proof caching (C1–C7).
//!
//! [`Cache::get_or_load`] is the library other modules call, reached through the kernel's
//! services as [`LOADER`] (this process's running instance). The module mounts the admin API
//! (`/api/cache/stats`, `/api/cache/policies`, `POST /api/cache/invalidate`), named cached
//! queries (`/api/cache/queries/{name}`), and follows invalidations broadcast by other
//! instances. See docs/cache.md.

pub mod config;
pub mod loader;
pub mod queries;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::config::{ConfigError, Section, Settings};
use bulwark_kernel::http::{ApiJson, ApiPath, ApiQuery};
use bulwark_kernel::module::{
    Context, Module, ModuleError, ModuleParts, Worker, WorkerKind, status_route,
};
use bulwark_kernel::problem::Problem;
use bulwark_kernel::services::ServiceKey;
use serde::Deserialize;

pub use config::{CacheClass, CacheConfig, Fallback, NamespacePolicy, Strategy};
pub use loader::{Cache, CacheError, Entry, Outcome};

/// The module value the app registers.
pub struct CacheModule;

/// The running [`Cache`] of this process, for other modules (`ctx.service(LOADER)`): loads
/// through it share its single-flight, fill lock, metrics and invalidation broadcast.
pub const LOADER: ServiceKey<Cache> = ServiceKey::new("cache", "loader");

/// `{"namespace", "key"}` or `{"namespace", "tag"}`: exactly one of `key` and `tag` (checked by
/// the handler; the schema below says the same with `oneOf`). Neither may be `null`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    namespace: String,
    /// One key; or
    #[serde(default, deserialize_with = "present")]
    key: Option<String>,
    /// every key filed under this tag (`get_or_load_tagged`).
    #[serde(default, deserialize_with = "present")]
    tag: Option<String>,
}

/// An optional field that, when present, is a string (not `null`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

impl utoipa::PartialSchema for InvalidateRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
        let string = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
        };
        let target = |name: &str, description: &str| {
            ObjectBuilder::new()
                .property("namespace", string("A namespace of `[cache.namespaces]`"))
                .property(name, string(description))
                .required("namespace")
                .required(name)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        OneOfBuilder::new()
            .item(target("key", "The key to drop"))
            .item(target(
                "tag",
                "Drop every key filed under this tag (`get_or_load_tagged`)",
            ))
            .description(Some("Exactly one of `key` and `tag`"))
            .into()
    }
}

impl utoipa::ToSchema for InvalidateRequest {}

/// Drop a key, or every key of a tag, from every tier of every instance (role admin).
#[utoipa::path(post, path = "/api/cache/invalidate", tag = "cache", security(("bearer" = [])),
    request_body = InvalidateRequest,
    responses(
        (status = 204, description = "Invalidated everywhere"),
        (status = 400, description = "Invalid body, or not exactly one of `key` and `tag`"),
        (status = 403, description = "Role admin required"),
        (status = 404, description = "Unknown namespace"),
        (status = 503, description = "The shared tier or the invalidation broadcast is unavailable")
))]
async fn invalidate(
    _auth: Auth<require::Admin>,
    State(cache): State<Cache>,
    ApiJson(req): ApiJson<InvalidateRequest>,
) -> Result<axum::http::StatusCode, Problem> {
    match (req.key, req.tag) {
        (Some(key), None) => cache
            .invalidate(&req.namespace, &key)
            .await
            .map_err(invalidate_problem)?,
        (None, Some(tag)) => {
            cache
                .invalidate_tag(&req.namespace, &tag)
                .await
                .map_err(invalidate_problem)?;
        }
        _ => {
            return Err(Problem::bad_request("give exactly one of `key` and `tag`")
                .extension("field", serde_json::json!("key")));
        }
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn invalidate_problem(e: CacheError) -> Problem {
    match e {
        CacheError::UnknownNamespace(_) => Problem::not_found(e.to_string()),
        other => Problem::unavailable(other.to_string()),
    }
}

/// L1 usage (role viewer).
#[utoipa::path(get, path = "/api/cache/stats", tag = "cache", security(("bearer" = [])),
    responses((status = 200, description = "Cache statistics")))]
async fn stats(
    _auth: Auth<require::Viewer>,
    State(cache): State<Cache>,
) -> axum::Json<serde_json::Value> {
    cache.record_memory().await;
    let bytes = cache.l1_bytes().await;
    axum::Json(serde_json::json!({"l1": {"bytes": bytes}}))
}

/// Each namespace's declared policy next to what this instance observed (reads, hit rate,
/// reads per write), with contradictions flagged (role viewer).
#[utoipa::path(get, path = "/api/cache/policies", tag = "cache", security(("bearer" = [])),
    responses((status = 200, description = "Declared versus observed, per namespace")))]
async fn policies(
    _auth: Auth<require::Viewer>,
    State(cache): State<Cache>,
) -> axum::Json<Vec<loader::PolicyReport>> {
    axum::Json(cache.policy_report())
}

#[derive(Clone)]
struct QueriesState {
    cache: Cache,
    queries: Arc<BTreeMap<String, queries::QueryConfig>>,
    db: sea_orm::DatabaseConnection,
}

/// Run a named query through the cache (role viewer). The body is the rows as a JSON array;
/// `x-cache` says `hit`, `stale` or `miss`.
#[utoipa::path(get, path = "/api/cache/queries/{name}", tag = "cache", security(("bearer" = [])),
    params(("name" = String, Path, description = "Query name from `[cache.queries.NAME]`")),
    responses(
        (status = 200, description = "Rows as a JSON array"),
        (status = 400, description = "Unknown, missing or wrongly typed parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown query", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The query failed or no value within lock_wait", body = Problem, content_type = "application/problem+json")
))]
async fn run_query(
    _auth: Auth<require::Viewer>,
    State(s): State<QueriesState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let q = s
        .queries
        .get(&name)
        .cloned()
        .ok_or_else(|| Problem::not_found(format!("no query named `{name}`")))?;
    let values = q.bind(&params).map_err(Problem::bad_request)?;
    let key = q.cache_key(&name, &params);
    let db = s.db.clone();
    let ns = q.namespace.clone();
    let loaded = s
        .cache
        .get_or_load(&ns, &key, move || async move {
            q.run(&db, values).await.map(bytes::Bytes::from)
        })
        .await;
    match loaded {
        Ok((body, outcome)) => Ok((
            [
                (axum::http::header::CONTENT_TYPE, "application/json"),
                (
                    axum::http::HeaderName::from_static("x-cache"),
                    outcome.label(),
                ),
            ],
            body,
        )
            .into_response()),
        Err(CacheError::Loader(e)) => {
            tracing::warn!(message = "Named query failed.", query = %name, error = %e);
            Err(Problem::unavailable(format!("query `{name}` failed")))
        }
        Err(e) => Err(Problem::unavailable(e.to_string())),
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(invalidate, stats, policies, run_query),
    components(schemas(InvalidateRequest))
)]
struct CacheApi;

#[async_trait::async_trait]
impl Module for CacheModule {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<CacheConfig>(self.name())?
            .effective)
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let Section {
            value: cfg,
            effective,
        } = ctx.section::<CacheConfig>()?;
        let cache = Cache::new(&cfg, ctx.kv.clone());
        // The running loader, with its metrics and invalidation broadcast, for other modules.
        ctx.provide(LOADER, Arc::new(cache.clone()))?;
        let (status, mut openapi) = status_route(self.name(), effective);
        openapi.merge(<CacheApi as utoipa::OpenApi>::openapi());
        let routes = axum::Router::new()
            .route("/api/cache/invalidate", post(invalidate))
            .route("/api/cache/stats", get(stats))
            .route("/api/cache/policies", get(policies))
            .with_state(cache.clone())
            .route("/api/cache/queries/{name}", get(run_query))
            .with_state(QueriesState {
                cache: cache.clone(),
                queries: Arc::new(cfg.queries.clone()),
                db: ctx.db_read.clone(),
            })
            .merge(status);
        let closing = ctx.shutdown.closing_token();
        let (gauges_cache, gauges_stop) = (cache.clone(), ctx.shutdown.closing_token());
        let gauges = Worker {
            name: "cache-memory-gauges".into(),
            kind: WorkerKind::Web,
            run: Box::pin(async move {
                loop {
                    gauges_cache.record_memory().await;
                    tokio::select! {
                        _ = gauges_stop.cancelled() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                    }
                }
            }),
        };
        let follower = Worker {
            name: "cache-invalidations".into(),
            kind: WorkerKind::Web,
            run: Box::pin(
                cache
                    .clone()
                    .follow_invalidations(async move { closing.cancelled().await }),
            ),
        };
        Ok(ModuleParts {
            routes,
            openapi,
            workers: vec![follower, gauges],
            ..ModuleParts::default()
        })
    }
}
