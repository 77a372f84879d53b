//! Services between modules (kernel readiness, item 1): a module hands a typed, named handle
//! to another through the kernel's registry, and a consumer whose provider is missing fails at
//! start with a message naming both.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use bulwark_kernel::auth::{Auth, Role, require};
use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts};
use bulwark_kernel::services::ServiceKey;
use bulwark_tests::app::{Backend, TestAppBuilder};

/// The interface the provider offers: a trait object, as a module crate would export it.
trait Greeter: Send + Sync {
    fn greet(&self, who: &str) -> String;
}

const GREETER: ServiceKey<dyn Greeter> = ServiceKey::new("probe_provider", "greeter");

struct Polite(String);
impl Greeter for Polite {
    fn greet(&self, who: &str) -> String {
        format!("{}, {who}", self.0)
    }
}

struct Provider;

#[async_trait::async_trait]
impl Module for Provider {
    fn name(&self) -> &'static str {
        "probe_provider"
    }
    fn check_config(&self, _: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(serde_json::json!({}))
    }
    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        // Built per process, like the cache's loader: the consumer must get this one.
        ctx.provide(
            GREETER,
            Arc::new(Polite(format!("hello from {}", ctx.module))),
        )?;
        Ok(ModuleParts::default())
    }
}

#[derive(Clone)]
struct Used {
    greeter: Arc<dyn Greeter>,
    cache: bulwark_cache::Cache,
}

/// Uses the provider's greeter and the cache module's running loader.
struct Consumer;

#[async_trait::async_trait]
impl Module for Consumer {
    fn name(&self) -> &'static str {
        "probe_consumer"
    }
    fn check_config(&self, _: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(serde_json::json!({}))
    }
    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let used = Used {
            greeter: ctx.service(GREETER)?,
            cache: (*ctx.service(bulwark_cache::LOADER)?).clone(),
        };
        let routes = axum::Router::new()
            .route(
                "/api/probe_consumer/greeting",
                get(
                    |_: Auth<require::Viewer>, State(u): State<Used>| async move {
                        let (body, _) = u
                            .cache
                            .get_or_load("probe", "greeting", move || async move {
                                Ok(bytes::Bytes::from(u.greeter.greet("consumer")))
                            })
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
                    },
                ),
            )
            .with_state(used);
        Ok(ModuleParts {
            routes,
            ..ModuleParts::default()
        })
    }
}

fn builder() -> TestAppBuilder {
    TestAppBuilder::new(Backend::Embedded)
        .set("cache.namespaces.probe.class", "read_mostly")
        .set("cache.namespaces.probe.reason", "services test")
        .set("cache.namespaces.probe.ttl", "1m")
}

#[tokio::test]
async fn a_consumer_uses_the_providers_handle_and_the_running_cache() {
    let app = builder()
        .module(Arc::new(Provider))
        .module(Arc::new(Consumer))
        .spawn()
        .await
        .expect("spawn")
        .expect("embedded");
    let token = app.token(Role::Viewer);
    for _ in 0..3 {
        let res = app.get("/api/probe_consumer/greeting", Some(&token)).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.text().await.expect("body"),
            "hello from probe_provider, consumer"
        );
    }
    // The loads went through the cache module's own instance: its policy report saw them.
    let report: serde_json::Value = app
        .get("/api/cache/policies", Some(&token))
        .await
        .json()
        .await
        .expect("policies");
    let probe = report
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["namespace"] == "probe"))
        .expect("probe namespace in the report");
    assert_eq!(probe["reads"], 3, "{probe}");
    assert_eq!(probe["misses"], 1, "{probe}");
}

async fn start_error(b: TestAppBuilder) -> String {
    match b.spawn().await {
        Ok(_) => panic!("the application started although a service is missing"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_provider_not_compiled_in_fails_the_start_naming_both() {
    let err = start_error(builder().module(Arc::new(Consumer))).await;
    assert!(
        err.contains("`probe_consumer`") && err.contains("`probe_provider`"),
        "{err}"
    );
    assert!(err.contains("not compiled into this binary"), "{err}");
}

#[tokio::test]
async fn a_provider_not_enabled_fails_the_start_naming_both() {
    let err = start_error(
        builder()
            .module(Arc::new(Provider))
            .module(Arc::new(Consumer))
            .set("modules.enabled", ["cache", "probe_consumer"]),
    )
    .await;
    assert!(
        err.contains("`probe_consumer`") && err.contains("`probe_provider`"),
        "{err}"
    );
    assert!(err.contains("not enabled"), "{err}");
}

#[tokio::test]
async fn a_provider_listed_after_its_consumer_fails_the_start_naming_both() {
    let err = start_error(
        builder()
            .module(Arc::new(Consumer))
            .module(Arc::new(Provider)),
    )
    .await;
    assert!(
        err.contains("`probe_consumer`") && err.contains("`probe_provider`"),
        "{err}"
    );
    assert!(err.contains("starts after"), "{err}");
}
