//! Issue 13 item 7 (P11): the same `sql` DAG on Apache Ballista and on in-process DataFusion.
//! A Ballista scheduler and two executors run as separate processes on loopback (the `bulwark`
//! binary's `pipeline ballista-*` commands, built from the Ballista crates of this workspace);
//! the shipped events DAG runs task by task with `pipeline.engine.kind = "ballista"` into one
//! warehouse and in process into another, and every table it writes must hold the same rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulwark_pipeline::config::EngineConfig;
use bulwark_pipeline::data::Engine;
use bulwark_tests::procs::{Proc, bulwark_binary, free_port, wait_port};
use serde_json::Value;

const TASKS: [&str; 5] = ["extract", "gate", "clean", "aggregate", "export"];
const TABLES: [&str; 6] = [
    "raw_events",
    "checked_events",
    "checked_events_quarantine",
    "clean_events",
    "daily_kind_totals",
    "daily_kind_totals_export",
];

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/pipeline/examples/dags")
}

fn node(args: &[&str], log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(bulwark_binary())
        .args(["pipeline"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn a ballista node");
    Proc { child }
}

/// `bulwark pipeline test events_daily TASK` in `data_dir`, with extra environment.
fn run_task(data_dir: &Path, task: &str, env: &[(&str, String)]) -> (bool, Value, String) {
    let out = Command::new(bulwark_binary())
        .args([
            "pipeline",
            "test",
            "events_daily",
            task,
            "--date",
            "2026-11-01",
        ])
        .arg("--dir")
        .arg(example_dir())
        .env("BULWARK__DATA_DIR", data_dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run bulwark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every row of a warehouse table, sorted, as text (read in process, whoever wrote it).
async fn table_text(data_dir: &Path, table: &str) -> String {
    let engine = Engine::new(&EngineConfig::default(), data_dir);
    let ctx = engine.session().expect("session");
    engine
        .register_table(&ctx, table)
        .await
        .unwrap_or_else(|e| panic!("{table} in {}: {e}", data_dir.display()));
    let df = ctx.table(table).await.expect("table");
    let cols: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| format!("\"{}\"", f.name()))
        .collect();
    let sql = format!(
        "SELECT {} FROM {table} ORDER BY {}",
        cols.iter()
            .map(|c| format!("CAST({c} AS VARCHAR) AS {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        cols.join(", ")
    );
    let batches = ctx
        .sql(&sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("rows");
    arrow::util::pretty::pretty_format_batches(&batches)
        .expect("format")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_dag_gives_the_same_tables_on_ballista() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched_port = free_port();
    let sched = format!("127.0.0.1:{sched_port}");
    let _scheduler = node(
        &["ballista-scheduler", "--listen", &sched],
        &dir.path().join("scheduler.log"),
    );
    assert!(
        wait_port(sched_port, Duration::from_secs(30)),
        "the scheduler did not listen: {}",
        std::fs::read_to_string(dir.path().join("scheduler.log")).unwrap_or_default()
    );
    let mut executors = Vec::new();
    let mut flight = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let work = dir.path().join(format!("executor-{i}"));
        let log = dir.path().join(format!("executor-{i}.log"));
        executors.push(node(
            &[
                "ballista-executor",
                "--scheduler",
                &sched,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--work-dir",
                &work.display().to_string(),
                "--vcores",
                "1",
            ],
            &log,
        ));
        flight.push((port, log));
    }
    for (port, log) in &flight {
        assert!(
            wait_port(*port, Duration::from_secs(30)),
            "an executor did not listen: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    // The scheduler is ready once an executor has registered.
    let http = reqwest::Client::new();
    let ready = format!("http://{sched}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no executor registered with the scheduler"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let on_cluster = dir.path().join("ballista");
    let in_process = dir.path().join("datafusion");
    let ballista = [
        ("BULWARK__PIPELINE__ENGINE__KIND", "ballista".to_owned()),
        (
            "BULWARK__PIPELINE__ENGINE__SCHEDULER_URL",
            format!("df://{sched}"),
        ),
    ];
    for task in TASKS {
        let (ok, report, stderr) = run_task(&on_cluster, task, &ballista);
        assert!(ok, "{task} on ballista: {report} {stderr}");
        // extract reads no table (generate_series): nothing to distribute, it runs in process.
        let want = if task == "extract" {
            "datafusion"
        } else {
            "ballista"
        };
        assert_eq!(report["details"]["engine"], want, "{report}");
        let (ok, report, stderr) = run_task(&in_process, task, &[]);
        assert!(ok, "{task} in process: {report} {stderr}");
        assert_eq!(report["details"]["engine"], "datafusion", "{report}");
    }
    for table in TABLES {
        let a = table_text(&on_cluster, table).await;
        let b = table_text(&in_process, table).await;
        assert!(a.lines().count() > 4, "{table} has rows:\n{a}");
        assert_eq!(a, b, "{table}: ballista vs in process");
    }

    // Bad input: a cluster that is not there is a task failure naming Ballista, not a crash;
    // `kind = "ballista"` without a scheduler is refused naming the key.
    let gone = [
        ("BULWARK__PIPELINE__ENGINE__KIND", "ballista".to_owned()),
        (
            "BULWARK__PIPELINE__ENGINE__SCHEDULER_URL",
            format!("df://127.0.0.1:{}", free_port()),
        ),
    ];
    let (ok, report, stderr) = run_task(&on_cluster, "aggregate", &gone);
    assert!(!ok, "no cluster: {report}");
    assert_eq!(report["state"], "failed", "{report} {stderr}");
    let (ok, _, stderr) = run_task(
        &on_cluster,
        "aggregate",
        &[("BULWARK__PIPELINE__ENGINE__KIND", "ballista".to_owned())],
    );
    assert!(!ok);
    assert!(stderr.contains("pipeline.engine.scheduler_url"), "{stderr}");
    drop(executors);
}
