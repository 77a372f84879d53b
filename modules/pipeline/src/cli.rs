//! `bulwark pipeline ...`: `validate [DIR]` checks DAG files for a user's CI (P9);
//! `backfill DAG --from --to` creates a bounded backfill and follows it with a progress bar (P7);
//! `explain DAG TASK --date D` prints a `sql` task's optimised and physical plans (P12);
//! `test DAG TASK --date D` runs one task here, without the scheduler;
//! `ballista-scheduler` / `ballista-executor` run Apache Ballista's nodes from this binary (P11).

use std::path::PathBuf;
use std::time::Duration;

use bulwark_kernel::config::Settings;
use bulwark_kernel::module::ModuleError;
use clap::{Arg, ArgAction, ArgMatches, Command, value_parser};

use crate::PipelineConfig;
use crate::api::{DateArg, Reprocess};
use crate::store::{self, StoreError};

fn err(m: impl Into<String>) -> ModuleError {
    ModuleError::Other(m.into())
}

pub fn command() -> Command {
    Command::new("pipeline")
        .about("Pipelines: check DAG files, backfill a date range")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("validate")
                .about("Parse and check every DAG file of a folder; exit 1 when any is bad (P9)")
                .arg(
                    Arg::new("dir")
                        .value_name("DIR")
                        .value_parser(value_parser!(PathBuf))
                        .help("Default: pipeline.dags_folder"),
                ),
        )
        .subcommand(task_date_args(Command::new("explain").about(
            "Print a sql task's optimised logical plan and its physical plan for a date",
        )))
        .subcommand(task_date_args(Command::new("test").about(
            "Run one task for a date here, without the scheduler; its details as JSON",
        )))
        .subcommand(
            Command::new("ballista-scheduler")
                .about("Run an Apache Ballista scheduler (for pipeline.engine.kind = \"ballista\")")
                .arg(
                    Arg::new("listen")
                        .long("listen")
                        .value_name("ADDR")
                        .value_parser(value_parser!(std::net::SocketAddr))
                        .default_value("127.0.0.1:50050")
                        .help("Where the scheduler listens (gRPC and /readyz)"),
                ),
        )
        .subcommand(
            Command::new("ballista-executor")
                .about("Run an Apache Ballista executor that pulls tasks from a scheduler")
                .arg(
                    Arg::new("scheduler")
                        .long("scheduler")
                        .value_name("ADDR")
                        .value_parser(value_parser!(std::net::SocketAddr))
                        .default_value("127.0.0.1:50050"),
                )
                .arg(
                    Arg::new("listen")
                        .long("listen")
                        .value_name("ADDR")
                        .value_parser(value_parser!(std::net::SocketAddr))
                        .default_value("127.0.0.1:50051")
                        .help("This executor's Arrow Flight address (results and shuffles)"),
                )
                .arg(
                    Arg::new("work-dir")
                        .long("work-dir")
                        .value_name("DIR")
                        .value_parser(value_parser!(PathBuf))
                        .required(true)
                        .help("Where shuffle and spill files go"),
                )
                .arg(
                    Arg::new("vcores")
                        .long("vcores")
                        .value_name("N")
                        .value_parser(value_parser!(usize))
                        .default_value("0")
                        .help("Task slots (0: one per core)"),
                )
                .arg(
                    Arg::new("memory-mb")
                        .long("memory-mb")
                        .value_name("MIB")
                        .value_parser(value_parser!(u64))
                        .default_value("0")
                        .help("Memory pool; it spills beyond it (0: Ballista's default)"),
                ),
        )
        .subcommand(
            Command::new("backfill")
                .about("Run a DAG for every schedule point of a date range (P7)")
                .arg(Arg::new("dag").value_name("DAG").required(true))
                .arg(
                    Arg::new("from")
                        .long("from")
                        .required(true)
                        .value_name("DATE")
                        .help("First logical date: YYYY-MM-DD (in the DAG's timezone) or RFC 3339"),
                )
                .arg(
                    Arg::new("to")
                        .long("to")
                        .required(true)
                        .value_name("DATE")
                        .help("Last logical date, inclusive"),
                )
                .arg(
                    Arg::new("reprocess")
                        .long("reprocess")
                        .value_parser(["none", "failed", "all"])
                        .default_value("none")
                        .help("Dates that already have a run: skip them, rerun failed ones, or rerun all"),
                )
                .arg(
                    Arg::new("max-active-runs")
                        .long("max-active-runs")
                        .value_name("N")
                        .value_parser(value_parser!(u32).range(1..=10_000))
                        .help("Runs of this backfill at once (default: the DAG's max_active_runs)"),
                )
                .arg(
                    Arg::new("dry-run")
                        .long("dry-run")
                        .action(ArgAction::SetTrue)
                        .help("Print the dates and stop"),
                )
                .arg(
                    Arg::new("allow-large")
                        .long("allow-large")
                        .action(ArgAction::SetTrue)
                        .help("Allow more runs than pipeline.max_backfill_runs"),
                )
                .arg(
                    Arg::new("no-wait")
                        .long("no-wait")
                        .action(ArgAction::SetTrue)
                        .help("Create the backfill and return without following it"),
                ),
        )
}

/// `DAG TASK --date D [--dir DIR]`, the arguments of `explain` and `test`.
fn task_date_args(cmd: Command) -> Command {
    cmd.arg(Arg::new("dag").value_name("DAG").required(true))
        .arg(Arg::new("task").value_name("TASK").required(true))
        .arg(
            Arg::new("date")
                .long("date")
                .required(true)
                .value_name("DATE")
                .help("The logical date: YYYY-MM-DD (in the DAG's timezone) or RFC 3339"),
        )
        .arg(
            Arg::new("dir")
                .long("dir")
                .value_name("DIR")
                .value_parser(value_parser!(PathBuf))
                .help("The DAG folder (default: pipeline.dags_folder)"),
        )
}

pub async fn run(
    settings: &Settings,
    cfg: &PipelineConfig,
    args: &ArgMatches,
) -> Result<(), ModuleError> {
    match args.subcommand() {
        Some(("validate", a)) => validate(settings, cfg, a),
        Some(("explain", a)) => explain(settings, cfg, a).await,
        Some(("test", a)) => test_task(settings, cfg, a).await,
        Some(("backfill", a)) => backfill(settings, cfg, a).await,
        Some(("ballista-scheduler", a)) => {
            let listen = *a
                .get_one::<std::net::SocketAddr>("listen")
                .ok_or_else(|| err("--listen: missing"))?;
            crate::data::cluster::run_scheduler(listen)
                .await
                .map_err(|e| err(e.to_string()))
        }
        Some(("ballista-executor", a)) => {
            let addr = |k: &str| {
                a.get_one::<std::net::SocketAddr>(k)
                    .copied()
                    .ok_or_else(|| err(format!("--{k}: missing")))
            };
            let o = crate::data::cluster::ExecutorOptions {
                scheduler: addr("scheduler")?,
                listen: addr("listen")?,
                work_dir: a
                    .get_one::<PathBuf>("work-dir")
                    .cloned()
                    .ok_or_else(|| err("--work-dir: missing"))?,
                vcores: a.get_one::<usize>("vcores").copied().unwrap_or(0),
                memory_limit_mb: a.get_one::<u64>("memory-mb").copied().unwrap_or(0),
            };
            crate::data::cluster::run_executor(&o)
                .await
                .map_err(|e| err(e.to_string()))
        }
        _ => Err(err("unknown pipeline command")),
    }
}

fn validate(settings: &Settings, cfg: &PipelineConfig, a: &ArgMatches) -> Result<(), ModuleError> {
    let dir = a
        .get_one::<PathBuf>("dir")
        .cloned()
        .unwrap_or_else(|| settings.kernel.data_dir.join(&cfg.dags_folder));
    if !dir.is_dir() {
        return Err(err(format!("DIR: {} is not a folder", dir.display())));
    }
    let engine = crate::data::Engine::new(&cfg.engine, &settings.kernel.data_dir);
    let report = crate::validate::validate_dir(&dir, &crate::data::task_types(&engine));
    for e in &report.errors {
        eprintln!("{e}");
    }
    println!(
        "{} DAG(s) valid, {} problem(s) in {}",
        report.dags.len(),
        report.errors.len(),
        dir.display()
    );
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(err(format!(
            "{} problem(s) in the DAG files of {}",
            report.errors.len(),
            dir.display()
        )))
    }
}

/// The DAG folder, engine and rendered job of `DAG TASK --date D [--dir DIR]`.
fn job_of(
    settings: &Settings,
    cfg: &PipelineConfig,
    a: &ArgMatches,
) -> Result<(crate::data::Engine, crate::exec::Job), ModuleError> {
    let get = |k: &str| a.get_one::<String>(k).cloned().unwrap_or_default();
    let (dag_id, task_id) = (get("dag"), get("task"));
    let dir = a
        .get_one::<PathBuf>("dir")
        .cloned()
        .unwrap_or_else(|| settings.kernel.data_dir.join(&cfg.dags_folder));
    let engine = crate::data::Engine::new(&cfg.engine, &settings.kernel.data_dir);
    let types = crate::data::task_types(&engine);
    let names: Vec<&str> = types.keys().map(String::as_str).collect();
    let (dags, mut errors) = crate::dag::load_dir(&dir, &names);
    let (dags, arg_errors) = crate::registry::check_task_args(dags, &types);
    errors.extend(arg_errors);
    let Some(dag) = dags.into_iter().find(|d| d.dag_id == dag_id) else {
        let why = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(err(format!(
            "DAG: no valid DAG `{dag_id}` in {}{}",
            dir.display(),
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        )));
    };
    let Some(task) = dag.task(&task_id) else {
        return Err(err(format!("TASK: DAG `{dag_id}` has no task `{task_id}`")));
    };
    let logical = date_arg("date", &get("date"))?.resolve(dag.timezone, false);
    let ctx = crate::template::RunContext {
        dag_id: dag.dag_id.clone(),
        task_id: task.task_id.clone(),
        run_id: format!("manual__{}", logical.to_rfc3339()),
        logical_date: logical,
        interval: dag
            .schedule
            .interval_at(dag.start_date, dag.timezone, logical),
        try_number: 1,
        tz: dag.timezone,
        conf: serde_json::json!({}),
    };
    let job = crate::exec::render(task, &ctx).map_err(|e| err(e.to_string()))?;
    Ok((engine, job))
}

async fn explain(
    settings: &Settings,
    cfg: &PipelineConfig,
    a: &ArgMatches,
) -> Result<(), ModuleError> {
    let (engine, job) = job_of(settings, cfg, a)?;
    let crate::exec::JobKind::Plugin { type_name, args } = &job.kind else {
        return Err(err(format!("TASK: `{}` is not a sql task", job.task_id)));
    };
    if type_name != "sql" {
        return Err(err(format!(
            "TASK: `{}` is a {type_name} task, not sql",
            job.task_id
        )));
    }
    let sql_args = crate::data::sql::SqlArgs::parse(args).map_err(err)?;
    let text = crate::data::sql::explain(&engine, &sql_args)
        .await
        .map_err(|e| err(format!("{}.{}: {e}", job.dag_id, job.task_id)))?;
    println!("{text}");
    Ok(())
}

/// `bulwark pipeline test`: run one task for a date here and now, without the scheduler or the
/// metadata database (Airflow's `tasks test`): its log on stderr, its details as JSON on stdout.
async fn test_task(
    settings: &Settings,
    cfg: &PipelineConfig,
    a: &ArgMatches,
) -> Result<(), ModuleError> {
    let (engine, job) = job_of(settings, cfg, a)?;
    let types = crate::data::task_types(&engine);
    let http = reqwest::Client::new();
    let (sink, mut lines) = crate::exec::LogSink::new();
    let printer = tokio::spawn(async move {
        while let Some(l) = lines.recv().await {
            eprint!("{l}");
        }
    });
    let started = std::time::Instant::now();
    let outcome = crate::exec::run(&job, &types, &http, &sink).await;
    drop(sink);
    let _ = printer.await;
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(out) => {
            let report = serde_json::json!({
                "dag_id": job.dag_id, "task_id": job.task_id, "logical_date": job.logical_date,
                "state": "success", "seconds": seconds, "exit_code": out.exit_code,
                "details": out.details,
            });
            println!("{report}");
            Ok(())
        }
        Err(f) => {
            let report = serde_json::json!({
                "dag_id": job.dag_id, "task_id": job.task_id, "logical_date": job.logical_date,
                "state": "failed", "seconds": seconds, "error": f.message,
                "exit_code": f.exit_code, "details": f.details,
            });
            println!("{report}");
            Err(err(format!(
                "{}.{}: {}",
                job.dag_id, job.task_id, f.message
            )))
        }
    }
}

fn date_arg(flag: &str, raw: &str) -> Result<DateArg, ModuleError> {
    let v = serde_json::Value::String(raw.to_owned());
    serde_json::from_value(v).map_err(|e| err(format!("--{flag}: {e}")))
}

/// A store error as a CLI message naming the flag the field came from.
fn cli_error(e: StoreError) -> ModuleError {
    match e {
        StoreError::Invalid { field, message } => {
            let flag = match field {
                "from_date" => "--from",
                "to_date" => "--to",
                "allow_large" => "--allow-large",
                "reprocess_behavior" => "--reprocess",
                "dag_id" => "DAG",
                other => other,
            };
            err(format!("{flag}: {message}"))
        }
        StoreError::NotFound(m) => err(format!("DAG: {m}")),
        other => err(other.to_string()),
    }
}

async fn backfill(
    settings: &Settings,
    cfg: &PipelineConfig,
    a: &ArgMatches,
) -> Result<(), ModuleError> {
    let dag = a
        .get_one::<String>("dag")
        .ok_or_else(|| err("DAG is required"))?;
    let from = date_arg(
        "from",
        a.get_one::<String>("from").map_or("", String::as_str),
    )?;
    let to = date_arg("to", a.get_one::<String>("to").map_or("", String::as_str))?;
    let reprocess = match a.get_one::<String>("reprocess").map(String::as_str) {
        Some("failed") => Reprocess::Failed,
        Some("all") => Reprocess::All,
        _ => Reprocess::None,
    };
    let db = bulwark_kernel::db::connect(&settings.kernel.database)
        .await
        .map_err(|e| err(e.to_string()))?;
    let plan = crate::api::plan_backfill(
        &db,
        cfg.max_backfill_runs,
        dag,
        from,
        to,
        reprocess,
        a.get_flag("allow-large"),
    )
    .await
    .map_err(cli_error)?;
    let total = plan.new_runs.len() + plan.rerun_runs.len();
    if a.get_flag("dry-run") {
        let mut dates: Vec<String> = plan
            .new_runs
            .iter()
            .map(|r| crate::scheduler::run_id_for("backfill", at(r.logical_date_ms)))
            .chain(
                plan.rerun_dates
                    .iter()
                    .map(|d| format!("{} (rerun)", crate::scheduler::run_id_for("backfill", *d))),
            )
            .collect();
        dates.sort();
        for d in &dates {
            println!("{d}");
        }
        println!(
            "{total} run(s) would be created or rerun; {} date(s) skipped (they have a run)",
            plan.skipped.len()
        );
        return Ok(());
    }
    if total == 0 {
        return Err(err(
            "--reprocess: every date in the range has a run already; use --reprocess failed or all",
        ));
    }
    let max = a
        .get_one::<u32>("max-active-runs")
        .map(|m| i32::try_from(*m).unwrap_or(i32::MAX));
    let b = crate::api::start_backfill(&db, plan, reprocess, max, "cli")
        .await
        .map_err(cli_error)?;
    println!(
        "backfill {} of {dag}: {total} run(s), at most {} at once",
        b.id, b.max_active_runs
    );
    if a.get_flag("no-wait") {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(u64::try_from(total).unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} runs [{bar:30}] {msg} ({elapsed}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    loop {
        let (done, failed) = store::backfill_progress(&db, b.id)
            .await
            .map_err(|e| err(e.to_string()))?;
        bar.set_position(u64::try_from(done).unwrap_or(0));
        bar.set_message(format!("{failed} failed"));
        let row = store::backfill_by_id(&db, b.id)
            .await
            .map_err(|e| err(e.to_string()))?;
        if row.state == "done" {
            bar.finish();
            println!("backfill {} done: {done} run(s), {failed} failed", b.id);
            return if failed > 0 {
                Err(err(format!("{failed} run(s) of backfill {} failed", b.id)))
            } else {
                Ok(())
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn at(ms: i64) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone as _;
    chrono::Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
}
