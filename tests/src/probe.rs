//! A test module that exercises kernel mechanisms through the real application: a tracked,
//! authenticated WebSocket (`/ws/probe/echo`) and a bus worker that takes part in the drain.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::routing::get;
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::bus::{ConsumerSpec, StreamSpec};
use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, Worker, WorkerKind};
use bulwark_kernel::shutdown::Shutdown;
use bulwark_kernel::ws::{self, SocketLimits};
use futures::StreamExt as _;
use tokio::sync::Notify;

pub const STREAM: &str = "PROBE";
pub const SUBJECT: &str = "probe.work";
pub const DURABLE: &str = "probe";

/// What the test observes.
#[derive(Default)]
pub struct ProbeState {
    /// A worker took a message and is "working" on it.
    pub started: Notify,
    /// What `bulwark probe ping` was asked, one entry per run.
    pub commands: std::sync::Mutex<Vec<String>>,
}

pub struct ProbeModule {
    pub state: Arc<ProbeState>,
}

pub fn consumer_spec() -> ConsumerSpec {
    ConsumerSpec {
        stream: STREAM.into(),
        durable: DURABLE.into(),
        filter_subject: Some(SUBJECT.into()),
        ack_wait: Duration::from_secs(30),
        max_deliver: 5,
        dead_letter_subject: None,
    }
}

async fn echo(
    _auth: Auth<require::Viewer>,
    State(shutdown): State<Shutdown>,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    ws::serve(
        upgrade,
        &shutdown,
        "probe",
        SocketLimits::default(),
        |mut s| async move {
            loop {
                tokio::select! {
                    _ = s.closing.cancelled() => break,
                    frame = s.inbound.next() => match frame {
                        Some(Ok(Message::Text(t))) => {
                            if s.outbound.send(Message::Text(t)).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        },
    )
}

#[async_trait::async_trait]
impl Module for ProbeModule {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn check_config(&self, _settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(serde_json::json!({}))
    }

    fn command(&self) -> Option<clap::Command> {
        Some(
            clap::Command::new("probe")
                .subcommand_required(true)
                .subcommand(
                    clap::Command::new("ping").arg(
                        clap::Arg::new("times")
                            .long("times")
                            .required(true)
                            .value_parser(clap::value_parser!(u32)),
                    ),
                ),
        )
    }

    async fn run_command(
        &self,
        _settings: &Settings,
        args: &clap::ArgMatches,
    ) -> Result<(), ModuleError> {
        let Some(("ping", ping)) = args.subcommand() else {
            return Err(ModuleError::Other("unknown probe command".into()));
        };
        let times = ping.get_one::<u32>("times").copied().unwrap_or_default();
        if times == 0 {
            return Err(ModuleError::Other("--times must be at least 1".into()));
        }
        if let Ok(mut c) = self.state.commands.lock() {
            c.push(format!("pong x{times}"));
        }
        Ok(())
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        ctx.bus
            .ensure_stream(&StreamSpec {
                name: STREAM.into(),
                subjects: vec!["probe.>".into()],
                duplicate_window: Duration::from_secs(120),
                max_age: None,
            })
            .await?;
        let consumer = ctx.bus.consumer(&consumer_spec()).await?;
        let routes = axum::Router::new()
            .route("/ws/probe/echo", get(echo))
            .route(
                "/api/probe/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "too late"
                }),
            )
            .with_state(ctx.shutdown.clone());
        let (closing, deadline) = (ctx.shutdown.closing_token(), ctx.shutdown.deadline_token());
        let state = self.state.clone();
        // Takes messages until closing; a message in hand at the drain deadline is nak'd so
        // another process gets it at once instead of after ack_wait.
        let run = async move {
            while !closing.is_cancelled() {
                let batch = tokio::select! {
                    _ = closing.cancelled() => break,
                    b = consumer.fetch(1, Duration::from_millis(200)) => b,
                };
                for d in batch.unwrap_or_default() {
                    state.started.notify_one();
                    tokio::select! {
                        _ = deadline.cancelled() => { let _ = d.nak(Duration::ZERO).await; }
                        _ = tokio::time::sleep(Duration::from_secs(120)) => { let _ = d.ack().await; }
                    }
                }
            }
        };
        Ok(ModuleParts {
            routes,
            workers: vec![Worker {
                name: "probe-worker".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(run),
            }],
            ..ModuleParts::default()
        })
    }
}
