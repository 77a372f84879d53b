//! The composition root of the `bulwark` binary: it wires the kernel's services and the
//! compiled-in modules into one process. It holds no module logic.

pub mod commands;
pub mod modules;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bulwark_kernel::auth::Authenticator;
use bulwark_kernel::config::Settings;
use bulwark_kernel::module::{Context, Module, ModuleParts, ProcessRole, Worker, WorkerKind};
use bulwark_kernel::readiness::{FnCheck, Readiness, ReadinessCheck};
use bulwark_kernel::services::Services;
use bulwark_kernel::shutdown::Shutdown;
use bulwark_kernel::{bus, db, http, kv, telemetry};
use sea_orm::DatabaseConnection;

/// Version line: the crate version and the compiled-in modules.
pub fn version_line() -> String {
    let modules = modules::compiled_names();
    let listed = if modules.is_empty() {
        "none".to_owned()
    } else {
        modules.join(", ")
    };
    format!("{} (modules: {listed})", env!("CARGO_PKG_VERSION"))
}

/// The PostgreSQL advisory-lock key that serialises migrations between replicas starting at
/// once: any fixed number that no other code of ours locks (the value is historical).
pub const MIGRATION_LOCK_KEY: i64 = 7_262_353;

/// Apply every compiled-in migration set, kernel first.
///
/// Several replicas may start at once against one PostgreSQL database: they take turns under a
/// session advisory lock, held on a dedicated one-connection pool so that every migration
/// statement runs in the session that holds it. The first applies; the others find nothing
/// pending.
pub async fn migrate_up(
    db: &DatabaseConnection,
    cfg: &bulwark_kernel::config::DatabaseConfig,
) -> anyhow::Result<()> {
    use sea_orm::{ConnectionTrait, DbBackend};
    if db.get_database_backend() != DbBackend::Postgres {
        return apply_all(db).await;
    }
    let mut single = cfg.clone();
    single.max_connections = 1;
    single.min_connections = 1;
    let conn = db::connect(&single).await.context("migration connection")?;
    conn.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await
        .context("take the migration lock")?;
    let result = apply_all(&conn).await;
    let _ = conn
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await;
    let _ = conn.close().await;
    result
}

/// Apply what is pending in each set and log one line per migration applied, or one summary
/// line when nothing was pending (sea-orm-migration's own per-set lines are filtered out at
/// `warn`, see `telemetry::init`).
async fn apply_all(db: &DatabaseConnection) -> anyhow::Result<()> {
    let mut applied_before = 0usize;
    let mut applied_now = 0usize;
    for set in bulwark_migrations::sets() {
        let pending: Vec<String> = set
            .status(db)
            .await
            .with_context(|| format!("migration status of `{}`", set.module()))?
            .into_iter()
            .filter_map(|(name, applied)| {
                applied_before += usize::from(applied);
                (!applied).then_some(name)
            })
            .collect();
        if pending.is_empty() {
            continue;
        }
        set.up(db)
            .await
            .with_context(|| format!("migrations of `{}`", set.module()))?;
        for name in pending {
            applied_now += 1;
            tracing::info!(message = "Applied migration.", module = set.module(), migration = %name);
        }
    }
    if applied_now == 0 {
        tracing::info!(
            message = "Database schema is up to date.",
            applied_migrations = applied_before
        );
    }
    Ok(())
}

/// A built, bound, not yet running Bulwark process.
pub struct Application {
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    router: axum::Router,
    metrics_router: Option<axum::Router>,
    workers: Vec<Worker>,
    readiness: Readiness,
    shutdown: Shutdown,
    settings: Settings,
    role: ProcessRole,
    modules: Vec<&'static str>,
}

/// What the started modules handed back, merged.
struct StartedModules {
    routes: axum::Router,
    openapi: utoipa::openapi::OpenApi,
    workers: Vec<Worker>,
    checks: Vec<Arc<dyn ReadinessCheck>>,
    /// Each module's pages, for the home page.
    pages: Vec<(&'static str, Vec<bulwark_kernel::home::Page>)>,
}

impl Application {
    /// Connect, migrate, start modules and bind the listener(s). Port 0 picks a free port.
    pub async fn build(settings: Settings, role: ProcessRole) -> anyhow::Result<Self> {
        Self::build_with_modules(settings, role, modules::compiled()).await
    }

    /// [`Application::build`] with an explicit module list, in start order (the test harness
    /// adds modules that exercise kernel mechanisms this way). `candidates` are the modules
    /// compiled into this "binary"; `modules.enabled` picks which run.
    pub async fn build_with_modules(
        settings: Settings,
        role: ProcessRole,
        candidates: Vec<Arc<dyn Module>>,
    ) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        bulwark_kernel::install_crypto_provider();
        let kernel = &settings.kernel;
        let prometheus = telemetry::init(&kernel.telemetry)?;
        let compiled: Vec<&'static str> = candidates.iter().map(|m| m.name()).collect();
        let effective = commands::check(&settings, &candidates)?;
        let enabled: Vec<_> = candidates
            .into_iter()
            .filter(|m| settings.module_enabled(m.name()))
            .collect();
        let names: Vec<&'static str> = enabled.iter().map(|m| m.name()).collect();
        telemetry::record_build_info(env!("CARGO_PKG_VERSION"), &modules::compiled_names());

        let ctx = connect_kernel(
            &settings,
            role,
            Services::new(compiled.clone(), names.clone()),
        )
        .await?;
        let mut checks = kernel_checks(&ctx);
        let StartedModules {
            routes,
            mut openapi,
            mut workers,
            checks: module_checks,
            pages,
        } = start_modules(&ctx, &enabled).await?;
        checks.extend(module_checks);
        workers.push(pool_gauges(&ctx));
        // Lag of every durable consumer this process holds, whichever module took it.
        workers.push(Worker {
            name: "bus-consumer-lag".into(),
            kind: WorkerKind::Worker,
            run: Box::pin(bus::report_consumer_lag(
                ctx.bus.clone(),
                bus::CONSUMER_LAG_EVERY,
                ctx.shutdown.closing_token(),
            )),
        });

        let readiness = Readiness::new(checks, ctx.shutdown.clone());
        // Every module's operations get the kernel's shared error responses documented.
        http::document_common_responses(&mut openapi);
        let openapi = Arc::new(openapi.to_json().context("render OpenAPI")?);
        let effective_config =
            Arc::new(serde_json::to_value(effective).context("render effective config")?);
        let kernel_http = http::KernelHttp {
            readiness: readiness.clone(),
            prometheus: prometheus.clone(),
            openapi,
            effective_config,
            home: Arc::new(bulwark_kernel::home::Home::new(
                env!("CARGO_PKG_VERSION"),
                compiled,
                pages,
            )),
        };
        let router = http::app(&kernel.server, kernel_http, ctx.auth.clone(), routes);

        let listener = tokio::net::TcpListener::bind(kernel.server.listen)
            .await
            .with_context(|| format!("bind server.listen {}", kernel.server.listen))?;
        let (metrics_listener, metrics_router) = match kernel.server.metrics_listen {
            Some(addr) => (
                Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("bind server.metrics_listen {addr}"))?,
                ),
                Some(http::metrics_router(prometheus)),
            ),
            None => (None, None),
        };
        metrics::histogram!("bulwark_startup_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let shutdown = ctx.shutdown.clone();
        Ok(Self {
            listener,
            metrics_listener,
            router,
            metrics_router,
            workers,
            readiness,
            shutdown,
            settings,
            role,
            modules: names,
        })
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.kernel.server.listen)
    }
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }
    /// A handle to begin the drain (what SIGTERM does).
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Serve until a signal (or [`Shutdown::trigger`]) and the drain complete.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            router,
            metrics_router,
            workers,
            readiness,
            shutdown,
            settings,
            role,
            modules,
        } = self;
        let addr = listener.local_addr()?;
        for w in workers {
            tracing::info!(message = "Starting worker.", worker = %w.name);
            shutdown.spawn(w.run);
        }
        readiness.spawn_monitor(std::time::Duration::from_secs(5));
        let closing = shutdown.closing_token();
        if let (Some(l), Some(r)) = (metrics_listener, metrics_router) {
            let stop = shutdown.deadline_token();
            tokio::spawn(async move {
                let _ = axum::serve(l, r)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            });
        }
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { closing.cancelled().await })
                .await
        });
        tracing::info!(
            message = "Bulwark is ready.",
            url = %format!("http://{addr}"),
            role = role.as_str(),
            modules = %modules.join(","),
            mode = ?settings.kernel.mode,
        );
        let signals = shutdown.clone();
        tokio::spawn(async move { signals.wait_for_signal().await });
        let drain = &settings.kernel.drain;
        let server_done = async move {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(message = "HTTP server ended with an error.", %error)
                }
                Err(error) => tracing::warn!(message = "HTTP server task failed.", %error),
            }
        };
        let finished = shutdown
            .drain(drain.grace, drain.timeout, server_done)
            .await;
        tracing::info!(message = "Stopped.", drained_cleanly = finished);
        Ok(())
    }
}

/// Connect the kernel's services (database and replica, bus, key-value store, auth) and
/// migrate; the result is the context every module starts with.
async fn connect_kernel(
    settings: &Settings,
    role: ProcessRole,
    services: Services,
) -> anyhow::Result<Context> {
    let kernel = &settings.kernel;
    let db = db::connect(&kernel.database).await?;
    if kernel.database.migrate_on_start {
        migrate_up(&db, &kernel.database).await?;
    }
    let db_read = db::connect_read(&kernel.database, &db).await?;
    let bus = bus::from_config(&kernel.bus, db.clone())
        .await
        .context("bus")?;
    // Every consumer's dead letters land here (`dlq.<stream>.<durable>`), kept 14 days.
    bus.ensure_stream(&bus::StreamSpec {
        name: "DEAD_LETTERS".into(),
        subjects: vec!["dlq.>".into()],
        duplicate_window: kernel.bus.duplicate_window,
        max_age: Some(std::time::Duration::from_secs(14 * 86400)),
    })
    .await
    .context("declare the DEAD_LETTERS stream")?;
    let kv = kv::from_config(&kernel.redis).await.context("redis")?;
    telemetry::describe_kernel_metrics(bus.kind());
    let auth = Arc::new(Authenticator::from_config(kernel).await?);
    Ok(Context {
        module: "kernel",
        settings: settings.clone(),
        role,
        db,
        db_read,
        bus,
        kv,
        auth,
        shutdown: Shutdown::new(),
        services,
    })
}

/// Readiness of the kernel's own dependencies: database, bus and key-value store.
fn kernel_checks(ctx: &Context) -> Vec<Arc<dyn ReadinessCheck>> {
    let db = ctx.db.clone();
    let bus = ctx.bus.clone();
    let kv = ctx.kv.clone();
    vec![
        Arc::new(FnCheck::new("database", move || {
            let db = db.clone();
            async move { db::ping(&db).await.map_err(|e| e.to_string()) }
        })),
        Arc::new(FnCheck::new(format!("bus:{}", ctx.bus.kind()), move || {
            let bus = bus.clone();
            async move { bus.health().await.map_err(|e| e.to_string()) }
        })),
        Arc::new(FnCheck::new(format!("kv:{}", ctx.kv.kind()), move || {
            let kv = kv.clone();
            async move { kv.health().await.map_err(|e| e.to_string()) }
        })),
    ]
}

/// Start each enabled module in list order (a provider before its consumers) and merge what
/// they hand back; routes and OpenAPI only where this role serves HTTP, workers by role.
async fn start_modules(
    ctx: &Context,
    enabled: &[Arc<dyn Module>],
) -> anyhow::Result<StartedModules> {
    let mut merged = StartedModules {
        routes: axum::Router::new(),
        openapi: http::kernel_openapi(env!("CARGO_PKG_VERSION")),
        workers: Vec::new(),
        checks: Vec::new(),
        pages: Vec::new(),
    };
    for module in enabled {
        let parts: ModuleParts = module
            .start(&ctx.for_module(module.name()))
            .await
            .with_context(|| format!("start module `{}`", module.name()))?;
        ctx.services.mark_started(module.name());
        if ctx.role.serves_http() {
            merged.routes = merged.routes.merge(parts.routes);
            merged.openapi.merge(parts.openapi);
        }
        merged
            .workers
            .extend(parts.workers.into_iter().filter(|w| ctx.role.runs(w.kind)));
        merged.checks.extend(parts.readiness);
        merged.pages.push((module.name(), parts.pages));
    }
    Ok(merged)
}

/// Pool use for the platform dashboard, every 5 s. The app's own workers (this and the bus lag
/// reporter) are not filtered by role: every process reports its pools and consumers.
fn pool_gauges(ctx: &Context) -> Worker {
    let database = &ctx.settings.kernel.database;
    let (primary, read, max, separate_read) = (
        ctx.db.clone(),
        ctx.db_read.clone(),
        database.max_connections,
        database.read_url.is_some(),
    );
    let stop = ctx.shutdown.closing_token();
    Worker {
        name: "db-pool-gauges".into(),
        kind: WorkerKind::Web,
        run: Box::pin(async move {
            loop {
                db::record_pool_metrics(&primary, "primary", max);
                if separate_read {
                    db::record_pool_metrics(&read, "read", max);
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        }),
    }
}
