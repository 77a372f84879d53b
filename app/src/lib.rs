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
    conn.execute_unprepared("SELECT pg_advisory_lock(7262353)")
        .await
        .context("take the migration lock")?;
    let result = apply_all(&conn).await;
    let _ = conn
        .execute_unprepared("SELECT pg_advisory_unlock(7262353)")
        .await;
    let _ = conn.close().await;
    result
}

async fn apply_all(db: &DatabaseConnection) -> anyhow::Result<()> {
    for set in bulwark_migrations::sets() {
        set.up(db)
            .await
            .with_context(|| format!("migrations of `{}`", set.module()))?;
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

impl Application {
    /// Connect, migrate, start modules and bind the listener(s). Port 0 picks a free port.
    pub async fn build(settings: Settings, role: ProcessRole) -> anyhow::Result<Self> {
        Self::build_with_modules(settings, role, modules::compiled()).await
    }

    /// [`Application::build`] with an explicit module list (the test harness adds modules that
    /// exercise kernel mechanisms this way).
    pub async fn build_with_modules(
        settings: Settings,
        role: ProcessRole,
        candidates: Vec<Arc<dyn Module>>,
    ) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        let k = &settings.kernel;
        let prometheus = telemetry::init(&k.telemetry)?;
        let enabled: Vec<_> = candidates
            .into_iter()
            .filter(|m| settings.module_enabled(m.name()))
            .collect();
        let names: Vec<&'static str> = enabled.iter().map(|m| m.name()).collect();
        telemetry::record_build_info(env!("CARGO_PKG_VERSION"), &modules::compiled_names());
        let effective = commands::check(&settings, &enabled)?;

        let db = db::connect(&k.database).await?;
        if k.database.migrate_on_start {
            migrate_up(&db, &k.database).await?;
        }
        let db_read = db::connect_read(&k.database, &db).await?;
        let bus = bus::from_config(&k.bus, db.clone()).await.context("bus")?;
        // Every consumer's dead letters land here (`dlq.<stream>.<durable>`), kept 14 days.
        bus.ensure_stream(&bus::StreamSpec {
            name: "DEAD_LETTERS".into(),
            subjects: vec!["dlq.>".into()],
            duplicate_window: k.bus.duplicate_window,
            max_age: Some(std::time::Duration::from_secs(14 * 86400)),
        })
        .await
        .context("declare the DEAD_LETTERS stream")?;
        let kv = kv::from_config(&k.redis).await.context("redis")?;
        telemetry::describe_kernel_metrics(bus.kind());
        let auth = Arc::new(Authenticator::from_config(k).await?);
        let shutdown = Shutdown::new();

        let ctx = Context {
            settings: settings.clone(),
            role,
            db: db.clone(),
            db_read,
            bus: bus.clone(),
            kv: kv.clone(),
            auth: auth.clone(),
            shutdown: shutdown.clone(),
        };

        let mut checks: Vec<Arc<dyn ReadinessCheck>> = Vec::new();
        let d = db.clone();
        checks.push(Arc::new(FnCheck::new("database", move || {
            let d = d.clone();
            async move { db::ping(&d).await.map_err(|e| e.to_string()) }
        })));
        let b = bus.clone();
        checks.push(Arc::new(FnCheck::new(
            format!("bus:{}", bus.kind()),
            move || {
                let b = b.clone();
                async move { b.health().await.map_err(|e| e.to_string()) }
            },
        )));
        let s = kv.clone();
        checks.push(Arc::new(FnCheck::new(
            format!("kv:{}", kv.kind()),
            move || {
                let s = s.clone();
                async move { s.health().await.map_err(|e| e.to_string()) }
            },
        )));

        let mut routes = axum::Router::new();
        let mut openapi = http::kernel_openapi(env!("CARGO_PKG_VERSION"));
        let mut workers = Vec::new();
        for m in &enabled {
            let ModuleParts {
                routes: r,
                openapi: o,
                workers: w,
                readiness,
            } = m
                .start(&ctx)
                .await
                .with_context(|| format!("start module `{}`", m.name()))?;
            if role.serves_http() {
                routes = routes.merge(r);
                openapi.merge(o);
            }
            workers.extend(w.into_iter().filter(|w| role.runs(w.kind)));
            checks.extend(readiness);
        }
        // Pool use for the platform dashboard, every 5 s in every role.
        {
            let (db, db_read, max, separate_read) = (
                ctx.db.clone(),
                ctx.db_read.clone(),
                k.database.max_connections,
                k.database.read_url.is_some(),
            );
            let stop = shutdown.closing_token();
            workers.push(Worker {
                name: "db-pool-gauges".into(),
                kind: WorkerKind::Web,
                run: Box::pin(async move {
                    loop {
                        db::record_pool_metrics(&db, "primary", max);
                        if separate_read {
                            db::record_pool_metrics(&db_read, "read", max);
                        }
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        }
                    }
                }),
            });
        }
        let readiness = Readiness::new(checks, shutdown.clone());
        http::document_common_responses(&mut openapi);
        let openapi = Arc::new(openapi.to_json().context("render OpenAPI")?);
        let effective_config =
            Arc::new(serde_json::to_value(effective).context("render effective config")?);
        let kernel_http = http::KernelHttp {
            readiness: readiness.clone(),
            prometheus: prometheus.clone(),
            openapi,
            effective_config,
        };
        let router = http::app(&k.server, kernel_http, auth, routes);

        let listener = tokio::net::TcpListener::bind(k.server.listen)
            .await
            .with_context(|| format!("bind server.listen {}", k.server.listen))?;
        let (metrics_listener, metrics_router) = match k.server.metrics_listen {
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
