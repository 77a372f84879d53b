//! Annotation benchmarks: prints figures and ratios from one run, asserts nothing.
//!
//! Parts (`--run raw,label-studio,bulwark`, in that order when several are given):
//!
//! * `raw`: the baseline. 1M items in a database of its own (`bench_annotation_raw`) on the same
//!   PostgreSQL, and `--clients` connections each looping {BEGIN; SELECT the next item FOR UPDATE
//!   SKIP LOCKED; INSERT its lock; COMMIT} then {BEGIN; UPDATE the item done; DELETE the lock;
//!   INSERT the annotation; COMMIT}. Also keyset vs OFFSET pages and a COUNT-based progress query
//!   on that table, for reference.
//! * `label-studio`: the same closed loop against a running Label Studio (`GET
//!   /api/projects/{id}/next`, then `POST /api/tasks/{id}/annotations`), one user and one legacy
//!   token per client (scripts/bench-annotation-ls.py seeds it), plus its import API's rate.
//! * `bulwark`: against a running `bulwark serve` with the annotation module: import API
//!   throughput, 1M items, the claim/submit loop (`GET /tasks/next`, `POST /annotations`),
//!   `stats/progress` and deep keyset page latency (with OFFSET on the same table as the
//!   baseline), and an export of 1M annotations with the server's peak RSS.
//!
//! Every loop runs for a fixed time after a warm-up whose cycles are not counted. Ratios are
//! taken between parts of the same run. Run it through `scripts/bench-annotation`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bulwark_kernel::auth::{Authenticator, Role};
use bulwark_kernel::config::AuthConfig;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::sqlx::{self, Connection as _, PgConnection, Row as _};
use serde_json::{Value, json};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Raw,
    LabelStudio,
    Bulwark,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Seed {
    /// Every item through the import API.
    Api,
    /// `--import-lines` through the import API, the rest copied in SQL from an imported row.
    Sql,
}

#[derive(Parser, Debug)]
#[command(
    about = "Annotation benchmarks: claim/submit rate vs raw SQL and Label Studio, stats, pages, export"
)]
struct Args {
    /// Parts to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "raw,bulwark")]
    run: Vec<Part>,
    /// Items in each project.
    #[arg(long, default_value_t = 1_000_000)]
    items: i64,
    /// Concurrent clients of the claim/submit loops.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measured time of each loop.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up before each loop (cycles started in it are not counted).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Sequential requests per latency figure (stats, pages).
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// PostgreSQL server for the raw baseline; its database `bench_annotation_raw` is recreated.
    #[arg(long, env = "BULWARK_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,

    /// Bulwark's HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// The HS256 secret Bulwark verifies tokens with.
    #[arg(long)]
    jwt_secret_file: Option<PathBuf>,
    /// Bulwark's database (the same URL as its `database.url`): deep-page baselines, table
    /// maintenance after seeding, SQL seeding of the export's annotations.
    #[arg(long)]
    database_url: Option<String>,
    /// Bulwark's process id, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Lines of the measured import (the first lines of the seeding).
    #[arg(long, default_value_t = 100_000)]
    import_lines: i64,
    /// Largest import request body (Bulwark's default `server.body_limit_bytes` is 1 MiB).
    #[arg(long, default_value_t = 900 * 1024)]
    import_chunk_bytes: usize,
    /// How the items past `--import-lines` are created.
    #[arg(long, value_enum, default_value = "api")]
    seed: Seed,
    /// Annotations the export covers (the loop's, and the rest copied in SQL from one of them).
    #[arg(long, default_value_t = 1_000_000)]
    export_annotations: i64,
    /// Body of `POST /exports`; `{project}` is replaced by the project id.
    #[arg(long, default_value = r#"{"project": {project}, "format": "jsonl"}"#)]
    export_body: String,
    /// Give up on an export after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    export_timeout: Duration,

    /// Label Studio's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    ls_url: String,
    /// The Label Studio project seeded for the loop.
    #[arg(long)]
    ls_project: Option<i64>,
    /// Label Studio legacy tokens, one a line (one user per client).
    #[arg(long)]
    ls_tokens_file: Option<PathBuf>,
    /// Tasks in that project (printed with the figures).
    #[arg(long)]
    ls_items: Option<i64>,
    /// Measured time of the Label Studio loop (default: `--duration`).
    #[arg(long, value_parser = humantime::parse_duration)]
    ls_duration: Option<Duration>,
    /// Tasks imported through Label Studio's import API into a project of their own.
    #[arg(long, default_value_t = 20_000)]
    ls_import_tasks: usize,
}

// ---------------------------------------------------------------- figures

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latencies in ms: p50, p99, max.
#[derive(Clone, Copy, Debug)]
struct Lat {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Lat {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        Lat {
            n: v.len(),
            p50: pct(&v, 0.5),
            p99: pct(&v, 0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl std::fmt::Display for Lat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            self.p50, self.p99, self.max, self.n
        )
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(what.to_owned());
    pb
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// Everything the run measured, for the closing summary.
#[derive(Default)]
struct Summary {
    raw: Option<LoopFigures>,
    ls: Option<LoopFigures>,
    bulwark: Option<LoopFigures>,
    lines: Vec<String>,
}

// ---------------------------------------------------------------- closed loops

enum Outcome {
    /// One item claimed and submitted.
    Done { claim: Duration, submit: Duration },
    /// Lost a race (the item went to another client, or a 409): try again.
    Retry(String),
    /// Nothing left to claim.
    Empty,
}

trait Worker: Send + 'static {
    fn cycle(&mut self) -> impl Future<Output = anyhow::Result<Outcome>> + Send;
}

#[derive(Clone, Debug)]
struct LoopFigures {
    done: u64,
    seconds: f64,
    claim: Lat,
    submit: Lat,
    retries: std::collections::BTreeMap<String, u64>,
    errors: u64,
    first_error: Option<String>,
    ran_dry: bool,
}

impl LoopFigures {
    fn rate(&self) -> f64 {
        self.done as f64 / self.seconds
    }
}

#[derive(Default)]
struct WorkerFigures {
    claim: Vec<f64>,
    submit: Vec<f64>,
    retries: std::collections::BTreeMap<String, u64>,
    errors: u64,
    first_error: Option<String>,
    ran_dry: bool,
}

/// Runs `workers` concurrently, each starting cycles until `warmup + duration` has passed.
/// Cycles that end inside the measured window (after the warm-up, before its end) count; the
/// rate is their number over the window's length.
async fn closed_loop<W: Worker>(
    name: &str,
    workers: Vec<W>,
    warmup: Duration,
    duration: Duration,
) -> LoopFigures {
    let started = Instant::now();
    let measure_from = started + warmup;
    let until = measure_from + duration;
    let counted = Arc::new(AtomicU64::new(0));
    let pb = bar((warmup + duration).as_secs(), name);
    let ticker = {
        let (pb, counted) = (pb.clone(), counted.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                pb.set_position(started.elapsed().as_secs());
                pb.set_message(format!("{} cycles", counted.load(Ordering::Relaxed)));
            }
        })
    };
    let mut tasks = Vec::new();
    for mut w in workers {
        let counted = counted.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = WorkerFigures::default();
            loop {
                let t = Instant::now();
                if t >= until {
                    break;
                }
                match w.cycle().await {
                    Ok(Outcome::Done { claim, submit }) => {
                        let end = Instant::now();
                        if end >= measure_from && end <= until {
                            f.claim.push(ms(claim));
                            f.submit.push(ms(submit));
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Outcome::Retry(why)) => *f.retries.entry(why).or_default() += 1,
                    Ok(Outcome::Empty) => {
                        f.ran_dry = true;
                        break;
                    }
                    Err(e) => {
                        f.errors += 1;
                        f.first_error.get_or_insert_with(|| format!("{e:#}"));
                        if f.errors > 50 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            f
        }));
    }
    let mut all = WorkerFigures::default();
    for t in tasks {
        let Ok(f) = t.await else {
            all.errors += 1;
            continue;
        };
        all.claim.extend(f.claim);
        all.submit.extend(f.submit);
        for (k, v) in f.retries {
            *all.retries.entry(k).or_default() += v;
        }
        all.errors += f.errors;
        all.first_error = all.first_error.or(f.first_error);
        all.ran_dry |= f.ran_dry;
    }
    ticker.abort();
    pb.finish_and_clear();
    let seconds = duration.as_secs_f64();
    LoopFigures {
        done: all.claim.len() as u64,
        seconds,
        claim: Lat::of(all.claim),
        submit: Lat::of(all.submit),
        retries: all.retries,
        errors: all.errors,
        first_error: all.first_error,
        ran_dry: all.ran_dry,
    }
}

fn print_loop(label: &str, clients: usize, f: &LoopFigures) {
    println!(
        "  {label}: {:.1} claims/s, {:.1} submits/s ({} cycles ended in {:.0} s, {clients} clients)",
        f.rate(),
        f.rate(),
        f.done,
        f.seconds
    );
    println!("    claim  {}", f.claim);
    println!("    submit {}", f.submit);
    if !f.retries.is_empty() {
        println!("    retries (lost races / 409s): {:?}", f.retries);
    }
    if f.errors > 0 {
        println!(
            "    errors: {} (first: {})",
            f.errors,
            f.first_error.as_deref().unwrap_or("?")
        );
    }
    if f.ran_dry {
        println!("    a client found nothing left to claim");
    }
}

async fn timed<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Lat>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for _ in 0..n.min(20) {
        f().await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        v.push(ms(t.elapsed()));
    }
    Ok(Lat::of(v))
}

/// `n` sequential runs of `sql` with the int8 parameters `binds` (after a few unmeasured ones),
/// each expected to return `rows` rows when given.
async fn timed_sql(
    c: &mut PgConnection,
    n: usize,
    sql: &str,
    binds: &[i64],
    rows: Option<usize>,
) -> anyhow::Result<Lat> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + n.min(20) {
        let t = Instant::now();
        let mut query = sqlx::query(sql);
        for b in binds {
            query = query.bind(*b);
        }
        let got = query.fetch_all(&mut *c).await?.len();
        if i >= n.min(20) {
            v.push(ms(t.elapsed()));
        }
        if let Some(want) = rows {
            ensure!(got == want, "{sql}: {got} rows, not {want}");
        }
    }
    Ok(Lat::of(v))
}

// ---------------------------------------------------------------- raw baseline

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, _) = url
        .rsplit_once('/')
        .context("PostgreSQL URL without a database path")?;
    Ok(format!("{base}/{db}"))
}

const RAW_DB: &str = "bench_annotation_raw";
const NEXT_SQL: &str = "SELECT id FROM raw_items i WHERE project = $1 AND NOT done \
     AND NOT EXISTS (SELECT 1 FROM raw_locks l WHERE l.item_id = i.id AND l.expires_at > now()) \
     ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED";

async fn raw_seed(admin_url: &str, items: i64) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {RAW_DB} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {RAW_DB}"))
        .execute(&mut admin)
        .await?;
    let url = with_database(admin_url, RAW_DB)?;
    let mut c = PgConnection::connect(&url).await?;
    for ddl in [
        "CREATE TABLE raw_items (id bigserial PRIMARY KEY, project int NOT NULL, \
         external_id text NOT NULL, uri text, payload jsonb NOT NULL, metadata jsonb NOT NULL DEFAULT '{}', \
         priority int NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false, \
         annotation_count int NOT NULL DEFAULT 0, version int NOT NULL DEFAULT 1, \
         created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (project, external_id))",
        "CREATE TABLE raw_locks (item_id bigint PRIMARY KEY REFERENCES raw_items (id), \
         annotator text NOT NULL, expires_at timestamptz NOT NULL)",
        "CREATE TABLE raw_annotations (id bigserial PRIMARY KEY, project int NOT NULL, \
         item_id bigint NOT NULL REFERENCES raw_items (id), annotator text NOT NULL, \
         labels jsonb NOT NULL, request_id text NOT NULL UNIQUE, created_at timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX ON raw_annotations (item_id)",
    ] {
        sqlx::query(ddl).execute(&mut c).await?;
    }
    let pb = bar(items as u64, "raw: seeding items");
    let step = 100_000;
    let mut from = 1;
    while from <= items {
        let to = (from + step - 1).min(items);
        sqlx::query(
            "INSERT INTO raw_items (project, external_id, payload, priority) \
             SELECT 1, 'item-' || g, jsonb_build_object('text', 'item ' || g), g % 10 \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(from)
        .bind(to)
        .execute(&mut c)
        .await?;
        pb.set_position(to as u64);
        from = to + 1;
    }
    pb.finish_and_clear();
    for ddl in [
        "CREATE INDEX raw_items_next ON raw_items (project, priority DESC, id) WHERE NOT done",
        "CREATE INDEX raw_items_page ON raw_items (project, id)",
        "VACUUM ANALYZE raw_items",
        "VACUUM ANALYZE raw_locks",
        "VACUUM ANALYZE raw_annotations",
    ] {
        sqlx::query(ddl).execute(&mut c).await?;
    }
    Ok(url)
}

struct RawWorker {
    conn: PgConnection,
    annotator: String,
    seq: u64,
}

impl Worker for RawWorker {
    async fn cycle(&mut self) -> anyhow::Result<Outcome> {
        let t = Instant::now();
        let mut tx = self.conn.begin().await?;
        let id: Option<i64> = sqlx::query_scalar(NEXT_SQL)
            .bind(1_i32)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            tx.rollback().await?;
            return Ok(Outcome::Empty);
        };
        // The select's snapshot may predate a lock committed a moment ago: the primary key
        // decides, as a live lock held by another must.
        let locked = sqlx::query(
                "INSERT INTO raw_locks (item_id, annotator, expires_at) \
                 VALUES ($1, $2, now() + interval '30 minutes') \
                 ON CONFLICT (item_id) DO UPDATE SET annotator = EXCLUDED.annotator, expires_at = EXCLUDED.expires_at \
                 WHERE raw_locks.expires_at <= now()",
            )
            .bind(id)
            .bind(&self.annotator)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if locked == 0 {
            tx.rollback().await?;
            return Ok(Outcome::Retry("locked_by_others".into()));
        }
        tx.commit().await?;
        let claim = t.elapsed();

        let t = Instant::now();
        self.seq += 1;
        // The item's row lock first, as a claimer takes it: a claimer that picked this item
        // in the window before our lock was visible to it then waits on nothing of ours.
        let mut tx = self.conn.begin().await?;
        sqlx::query(
            "UPDATE raw_items SET done = true, annotation_count = annotation_count + 1, \
                 version = version + 1 WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let held = sqlx::query(
            "DELETE FROM raw_locks WHERE item_id = $1 AND annotator = $2 AND expires_at > now()",
        )
        .bind(id)
        .bind(&self.annotator)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            tx.rollback().await?;
            return Ok(Outcome::Retry("no_lock".into()));
        }
        sqlx::query(
            "INSERT INTO raw_annotations (project, item_id, annotator, labels, request_id) \
                 VALUES (1, $1, $2, '[\"pos\"]'::jsonb, $3)",
        )
        .bind(id)
        .bind(&self.annotator)
        .bind(format!("{}-{}", self.annotator, self.seq))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Outcome::Done {
            claim,
            submit: t.elapsed(),
        })
    }
}

async fn run_raw(args: &Args, summary: &mut Summary) -> anyhow::Result<()> {
    let admin = args
        .postgres_url
        .as_deref()
        .context("raw: --postgres-url (or BULWARK_TEST_POSTGRES_URL) is needed")?;
    println!(
        "raw baseline: {} items in database {RAW_DB}, {} connections",
        args.items, args.clients
    );
    let t = Instant::now();
    let url = raw_seed(admin, args.items).await?;
    println!(
        "  seeded {} items in {:.1} s (generate_series, then indexes, VACUUM ANALYZE)",
        args.items,
        t.elapsed().as_secs_f64()
    );
    let mut workers = Vec::new();
    for i in 0..args.clients {
        workers.push(RawWorker {
            conn: PgConnection::connect(&url).await?,
            annotator: format!("raw-{i}"),
            seq: 0,
        });
    }
    let f = closed_loop("raw: claim+submit", workers, args.warmup, args.duration).await;
    print_loop("raw SQL loop", args.clients, &f);
    summary.raw = Some(f);

    // Pages and progress on the same table, for reference.
    let mut c = PgConnection::connect(&url).await?;
    let deep = (args.items * 9 / 10).max(1);
    let after: i64 = sqlx::query_scalar(
        "SELECT id FROM raw_items WHERE project = 1 ORDER BY id OFFSET $1 LIMIT 1",
    )
    .bind(deep - 1)
    .fetch_one(&mut c)
    .await?;
    let keyset = timed_sql(
        &mut c,
        args.samples,
        "SELECT * FROM raw_items WHERE project = 1 AND id > $1 ORDER BY id LIMIT 100",
        &[after],
        Some(100),
    )
    .await?;
    let offset = timed_sql(
        &mut c,
        args.samples.min(200),
        "SELECT * FROM raw_items WHERE project = 1 ORDER BY id LIMIT 100 OFFSET $1",
        &[deep],
        Some(100),
    )
    .await?;
    let count = timed_sql(
        &mut c,
        args.samples.min(100),
        "SELECT count(*), count(*) FILTER (WHERE done) FROM raw_items WHERE project = 1",
        &[],
        Some(1),
    )
    .await?;
    println!("  raw SQL page of 100 after item #{deep}: keyset {keyset}");
    println!("  raw SQL page of 100 at OFFSET {deep}:    {offset}");
    println!("  raw SQL progress by COUNT(*) over the table: {count}");
    summary.lines.push(format!(
        "raw table, page at #{deep}: keyset p99 {:.2} ms vs OFFSET p99 {:.2} ms",
        keyset.p99, offset.p99
    ));
    Ok(())
}

// ---------------------------------------------------------------- Label Studio

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?)
}

struct LsWorker {
    http: reqwest::Client,
    base: String,
    project: i64,
    token: String,
}

const LS_RESULT: &str =
    r#"[{"from_name":"label","to_name":"text","type":"choices","value":{"choices":["pos"]}}]"#;

impl Worker for LsWorker {
    async fn cycle(&mut self) -> anyhow::Result<Outcome> {
        let auth = format!("Token {}", self.token);
        let t = Instant::now();
        let r = self
            .http
            .get(format!("{}/api/projects/{}/next", self.base, self.project))
            .header("Authorization", &auth)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Outcome::Empty);
        }
        let task: Value = r.error_for_status()?.json().await?;
        let claim = t.elapsed();
        let id = task["id"].as_i64().context("next task without id")?;
        let result: Value = serde_json::from_str(LS_RESULT)?;
        let t = Instant::now();
        let r = self
            .http
            .post(format!("{}/api/tasks/{id}/annotations", self.base))
            .header("Authorization", &auth)
            .json(&json!({"result": result, "lead_time": 1.0}))
            .send()
            .await?;
        let status = r.status();
        if status.is_client_error() {
            let body = r.text().await.unwrap_or_default();
            return Ok(Outcome::Retry(format!(
                "{status} {}",
                body.chars().take(80).collect::<String>()
            )));
        }
        r.error_for_status()?.bytes().await?;
        Ok(Outcome::Done {
            claim,
            submit: t.elapsed(),
        })
    }
}

async fn run_label_studio(args: &Args, summary: &mut Summary) -> anyhow::Result<()> {
    let project = args
        .ls_project
        .context("label-studio: --ls-project is needed")?;
    let file = args
        .ls_tokens_file
        .as_ref()
        .context("label-studio: --ls-tokens-file is needed")?;
    let tokens: Vec<String> = std::fs::read_to_string(file)
        .with_context(|| format!("read {}", file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(
        tokens.len() >= args.clients,
        "label-studio: {} tokens for {} clients",
        tokens.len(),
        args.clients
    );
    let base = args.ls_url.trim_end_matches('/').to_owned();
    let items = args
        .ls_items
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    println!(
        "Label Studio at {base}: project {project} with {items} tasks, {} users (one legacy token each)",
        args.clients
    );
    let mut workers = Vec::new();
    for token in tokens.into_iter().take(args.clients) {
        workers.push(LsWorker {
            http: http_client()?,
            base: base.clone(),
            project,
            token,
        });
    }
    let f = closed_loop(
        "label studio: next+annotate",
        workers,
        args.warmup,
        args.ls_duration.unwrap_or(args.duration),
    )
    .await;
    print_loop("Label Studio loop", args.clients, &f);
    summary.ls = Some(f);

    if args.ls_import_tasks > 0
        && let Err(e) = ls_import(args, &base).await
    {
        println!("  Label Studio import: failed: {e:#}");
    }
    Ok(())
}

async fn ls_import(args: &Args, base: &str) -> anyhow::Result<()> {
    let file = args
        .ls_tokens_file
        .as_ref()
        .context("label-studio: --ls-tokens-file is needed")?;
    let token = std::fs::read_to_string(file)?
        .lines()
        .next()
        .context("no token")?
        .trim()
        .to_owned();
    let auth = format!("Token {token}");
    let http = http_client()?;
    let config = "<View><Text name=\"text\" value=\"$text\"/><Choices name=\"label\" toName=\"text\">\
                  <Choice value=\"pos\"/><Choice value=\"neg\"/><Choice value=\"neutral\"/></Choices></View>";
    let p: Value = http
        .post(format!("{base}/api/projects"))
        .header("Authorization", &auth)
        .json(&json!({"title": format!("bench-import-{}", std::process::id()), "label_config": config}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = p["id"].as_i64().context("project id")?;
    let chunk = 1000;
    let n = args.ls_import_tasks;
    let pb = bar(n as u64, "label studio: import");
    let mut lat = Vec::new();
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let m = chunk.min(n - sent);
        let tasks: Vec<Value> = (sent..sent + m)
            .map(|k| json!({"data": {"text": format!("item {k}")}}))
            .collect();
        let t = Instant::now();
        http.post(format!("{base}/api/projects/{id}/import"))
            .header("Authorization", &auth)
            .json(&tasks)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        lat.push(ms(t.elapsed()));
        sent += m;
        pb.set_position(sent as u64);
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "  Label Studio import API: {n} tasks in {secs:.1} s = {:.0} tasks/s (JSON arrays of {chunk}, one request at a time; request {})",
        n as f64 / secs,
        Lat::of(lat)
    );
    Ok(())
}

// ---------------------------------------------------------------- Bulwark

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}/api/annotation{path}", self.base)
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await?;
        checked(r, path).await?.json().await.map_err(Into::into)
    }

    async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        checked(r, path).await?.json().await.map_err(Into::into)
    }
}

async fn checked(r: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    let body = r.text().await.unwrap_or_default();
    bail!(
        "{what}: {status}: {}",
        body.chars().take(300).collect::<String>()
    )
}

fn ndjson_line(k: i64) -> String {
    json!({"external_id": format!("item-{k}"), "payload": {"text": format!("item {k}")}, "priority": k % 10})
        .to_string()
}

/// Imports lines `from..to` (1-based item numbers) in bodies of at most `chunk_bytes`,
/// `parallel` requests at a time. Returns (imported, request latencies).
async fn import_range(
    api: &Api,
    project: i64,
    from: i64,
    to: i64,
    chunk_bytes: usize,
    parallel: usize,
    pb: &ProgressBar,
) -> anyhow::Result<(i64, Vec<f64>)> {
    use futures::StreamExt as _;
    let mut bodies = Vec::new();
    let mut body = String::new();
    let mut lines = 0_i64;
    for k in from..to {
        let line = ndjson_line(k);
        if !body.is_empty() && body.len() + line.len() + 1 > chunk_bytes {
            bodies.push((std::mem::take(&mut body), lines));
            lines = 0;
        }
        body.push_str(&line);
        body.push('\n');
        lines += 1;
    }
    if !body.is_empty() {
        bodies.push((body, lines));
    }
    let url = api.url(&format!("/projects/{project}/items"));
    let results: Vec<anyhow::Result<(i64, f64)>> = futures::stream::iter(bodies)
        .map(|(body, lines)| {
            let url = url.clone();
            async move {
                let t = Instant::now();
                let r = api
                    .http
                    .post(&url)
                    .bearer_auth(&api.token)
                    .header("Content-Type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await?;
                let v: Value = checked(r, "import").await?.json().await?;
                let took = ms(t.elapsed());
                let errors = v["errors"].as_array().map_or(0, Vec::len);
                ensure!(
                    errors == 0,
                    "import reported {errors} errors: {}",
                    v["errors"]
                );
                let done =
                    v["imported"].as_i64().unwrap_or(0) + v["existing"].as_i64().unwrap_or(0);
                ensure!(done == lines, "import answered {v} for {lines} lines");
                pb.inc(lines as u64);
                Ok((v["imported"].as_i64().unwrap_or(0), took))
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut imported = 0;
    let mut lat = Vec::new();
    for r in results {
        let (n, t) = r?;
        imported += n;
        lat.push(t);
    }
    Ok((imported, lat))
}

/// A table of Bulwark's database that has all of `columns`.
async fn find_table(c: &mut PgConnection, columns: &[&str]) -> anyhow::Result<String> {
    let names: Vec<String> = columns.iter().map(|s| (*s).to_owned()).collect();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND column_name = ANY($1) \
         GROUP BY table_name HAVING count(DISTINCT column_name) = $2 ORDER BY table_name",
    )
    .bind(&names)
    .bind(names.len() as i64)
    .fetch_all(&mut *c)
    .await?;
    match tables.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no table in Bulwark's database has the columns {columns:?}"),
        many => bail!("several tables have the columns {columns:?}: {many:?}"),
    }
}

/// (name, data type) of each column of `table`.
async fn columns_of(c: &mut PgConnection, table: &str) -> anyhow::Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT column_name::text, data_type::text \
         FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 \
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *c)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// The cast for a value of a column of data type `ty` (JSON may be stored as text).
fn cast(ty: &str) -> &'static str {
    match ty {
        "jsonb" => "jsonb",
        "json" => "json",
        _ => "text",
    }
}

fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Copies the imported row `template` of the items table into items `from..to` of the same
/// project in SQL: the same values but for `id` (its default), `external_id`, `payload`,
/// `priority` and the timestamps.
async fn sql_seed_items(
    c: &mut PgConnection,
    table: &str,
    template: i64,
    from: i64,
    to: i64,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    let cols = columns_of(c, table).await?;
    let mut names = Vec::new();
    let mut exprs = Vec::new();
    for (name, ty) in cols.iter().filter(|(n, _)| n != "id") {
        names.push(q(name));
        exprs.push(match name.as_str() {
            "external_id" => "'item-' || g".to_owned(),
            "payload" => format!("jsonb_build_object('text', 'item ' || g)::{}", cast(ty)),
            "priority" => "(g % 10)::int".to_owned(),
            "created_at" | "updated_at" => "now()".to_owned(),
            other => format!("t.{}", q(other)),
        });
    }
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM {} t CROSS JOIN generate_series($2::bigint, $3::bigint) g WHERE t.id = $1",
        q(table),
        names.join(", "),
        exprs.join(", "),
        q(table)
    );
    let mut k = from;
    while k < to {
        let end = (k + 100_000).min(to);
        sqlx::query(&sql)
            .bind(template)
            .bind(k)
            .bind(end - 1)
            .execute(&mut *c)
            .await
            .with_context(|| format!("seed items: {sql}"))?;
        pb.inc((end - k) as u64);
        k = end;
    }
    Ok(())
}

struct BulwarkWorker {
    http: reqwest::Client,
    base: String,
    project: i64,
    token: String,
    seq: u64,
    name: String,
}

impl Worker for BulwarkWorker {
    async fn cycle(&mut self) -> anyhow::Result<Outcome> {
        let t = Instant::now();
        let r = self
            .http
            .get(format!(
                "{}/api/annotation/tasks/next?project={}",
                self.base, self.project
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Outcome::Empty);
        }
        let next: Value = checked(r, "tasks/next").await?.json().await?;
        let claim = t.elapsed();
        let id = next["item"]["id"]
            .as_i64()
            .context("tasks/next without item.id")?;
        self.seq += 1;
        let t = Instant::now();
        let r = self
                .http
                .post(format!("{}/api/annotation/annotations", self.base))
                .bearer_auth(&self.token)
                .json(&json!({"item_id": id, "labels": ["pos"], "request_id": format!("{}-{}", self.name, self.seq)}))
                .send()
                .await?;
        if r.status() == reqwest::StatusCode::CONFLICT {
            let v: Value = r.json().await.unwrap_or_default();
            return Ok(Outcome::Retry(
                v["reason"].as_str().unwrap_or("409").to_owned(),
            ));
        }
        checked(r, "annotations").await?.bytes().await?;
        Ok(Outcome::Done {
            claim,
            submit: t.elapsed(),
        })
    }
}

async fn run_bulwark(args: &Args, summary: &mut Summary) -> anyhow::Result<()> {
    let secret_file = args
        .jwt_secret_file
        .as_ref()
        .context("bulwark: --jwt-secret-file is needed")?;
    let secret =
        std::fs::read(secret_file).with_context(|| format!("read {}", secret_file.display()))?;
    let auth = Authenticator::hs256(
        String::from_utf8_lossy(&secret).trim().as_bytes(),
        AuthConfig {
            hs256_secret: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            issuer: "bulwark".into(),
            audience: "bulwark".into(),
            role_claim: "role".into(),
            leeway: Duration::from_secs(30),
        },
    );
    let ttl = Duration::from_secs(4 * 3600);
    let base = args.base_url.trim_end_matches('/').to_owned();
    let api = Api {
        http: http_client()?,
        base: base.clone(),
        token: auth.issue("bench-admin", Role::Admin, ttl)?,
    };
    let mut db = match &args.database_url {
        Some(url) => Some(PgConnection::connect(url).await?),
        None => None,
    };
    let rss = |what: &str| {
        if let Some(pid) = args.pid {
            println!(
                "  bulwark RSS {what}: {} (peak so far {})",
                mib(proc_status_kib(pid, "VmRSS:")),
                mib(proc_status_kib(pid, "VmHWM:"))
            );
        }
    };
    println!("Bulwark at {base}");
    rss("at start");

    let created = api
        .post_json(
            "/projects",
            &json!({"name": format!("bench-{}", std::process::id()), "labels": ["pos", "neg", "neutral"], "overlap": 1}),
        )
        .await?;
    let project = created["id"].as_i64().context("project id")?;
    println!("  project {project}");

    // Import: the measured lines, one request at a time.
    let first = args.import_lines.min(args.items);
    let pb = bar(first as u64, "bulwark: import API");
    let t = Instant::now();
    let (imported, lat) =
        import_range(&api, project, 1, first + 1, args.import_chunk_bytes, 1, &pb).await?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  import API: {imported} NDJSON lines in {secs:.1} s = {:.0} lines/s (bodies <= {} KiB, one request at a time; request {})",
        imported as f64 / secs,
        args.import_chunk_bytes / 1024,
        Lat::of(lat)
    );
    summary.lines.push(format!(
        "Bulwark import API: {:.0} lines/s over {imported} lines",
        imported as f64 / secs
    ));

    // The rest of the items.
    if args.items > first {
        let rest = args.items - first;
        let pb = bar(rest as u64, "bulwark: seeding items");
        let t = Instant::now();
        match args.seed {
            Seed::Api => {
                let (n, _) = import_range(
                    &api,
                    project,
                    first + 1,
                    args.items + 1,
                    args.import_chunk_bytes,
                    2,
                    &pb,
                )
                .await?;
                pb.finish_and_clear();
                println!(
                    "  seeded {n} more items through the import API in {:.1} s ({:.0} lines/s, 2 requests in flight)",
                    t.elapsed().as_secs_f64(),
                    n as f64 / t.elapsed().as_secs_f64()
                );
            }
            Seed::Sql => {
                let c = db.as_mut().context("--seed sql needs --database-url")?;
                let table =
                    find_table(c, &["project_id", "external_id", "annotation_count"]).await?;
                let template: i64 = sqlx::query_scalar(&format!(
                    "SELECT id FROM {} WHERE project_id = $1 ORDER BY id LIMIT 1",
                    q(&table)
                ))
                .bind(project)
                .fetch_one(&mut *c)
                .await?;
                sql_seed_items(c, &table, template, first + 1, args.items + 1, &pb).await?;
                pb.finish_and_clear();
                println!(
                    "  seeded {rest} more items in SQL into {table} (copies of imported item {template}) in {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    let table = match db.as_mut() {
        Some(c) => {
            let table = find_table(c, &["project_id", "external_id", "annotation_count"]).await?;
            // The baseline's tables were vacuumed and analyzed after seeding; these get the same.
            sqlx::query(&format!("VACUUM ANALYZE {}", q(&table)))
                .execute(&mut *c)
                .await?;
            Some(table)
        }
        None => None,
    };
    rss("after seeding");

    // Claim + submit.
    let mut workers = Vec::new();
    for i in 0..args.clients {
        let name = format!("bench-annotator-{i}");
        workers.push(BulwarkWorker {
            http: http_client()?,
            base: base.clone(),
            project,
            token: auth.issue(&name, Role::Annotator, ttl)?,
            seq: 0,
            name,
        });
    }
    let f = closed_loop("bulwark: claim+submit", workers, args.warmup, args.duration).await;
    print_loop("Bulwark loop", args.clients, &f);
    summary.bulwark = Some(f);
    rss("after the loop");

    // stats/progress.
    let stats_path = format!("/stats/progress?project={project}");
    let sample = api.get_json(&stats_path).await?;
    let stats = timed(args.samples, || async {
        api.get_json(&stats_path).await?;
        Ok(())
    })
    .await?;
    println!(
        "  GET /stats/progress on {} items: {stats} (goal p99 < 20 ms); items={} completed={}",
        args.items, sample["items"], sample["completed"]
    );
    summary.lines.push(format!(
        "Bulwark stats/progress p99 {:.2} ms (goal < 20 ms)",
        stats.p99
    ));

    // Deep keyset page, and OFFSET on the same table.
    let deep = (args.items * 9 / 10).max(1);
    let after = match (db.as_mut(), &table) {
        (Some(c), Some(t)) => {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT id FROM {} WHERE project_id = $1 ORDER BY id OFFSET $2 LIMIT 1",
                q(t)
            ))
            .bind(project)
            .bind(deep - 1)
            .fetch_one(&mut *c)
            .await?
        }
        _ => {
            let page = api
                .get_json(&format!("/projects/{project}/items?limit=1"))
                .await?;
            page["items"][0]["id"].as_i64().context("first item id")? + deep - 1
        }
    };
    let page_path = format!("/projects/{project}/items?after={after}&limit=100");
    let page = timed(args.samples, || async {
        let v = api.get_json(&page_path).await?;
        let n = v["items"].as_array().map_or(0, Vec::len);
        ensure!(n == 100, "page has {n} items");
        Ok(())
    })
    .await?;
    println!("  GET {page_path} (item #{deep}): {page} (goal p99 < 5 ms)");
    let mut line = format!(
        "Bulwark keyset page at #{deep} over HTTP p99 {:.2} ms (goal < 5 ms)",
        page.p99
    );
    if let (Some(c), Some(t)) = (db.as_mut(), &table) {
        let sql = format!(
            "SELECT * FROM {} WHERE project_id = $1 ORDER BY id LIMIT 100 OFFSET $2",
            q(t)
        );
        let offset = timed_sql(c, args.samples.min(200), &sql, &[project, deep], Some(100)).await?;
        let ksql = format!(
            "SELECT * FROM {} WHERE project_id = $1 AND id > $2 ORDER BY id LIMIT 100",
            q(t)
        );
        let keyset = timed_sql(c, args.samples, &ksql, &[project, after], Some(100)).await?;
        println!("  SQL on {t}: OFFSET {deep} LIMIT 100: {offset}; keyset: {keyset}");
        line.push_str(&format!(
            " vs SQL OFFSET p99 {:.2} ms on the same table = {:.1}x faster",
            offset.p99,
            offset.p99 / page.p99
        ));
    }
    summary.lines.push(line);

    // Export.
    match export(args, &api, project, db.as_mut()).await {
        Ok(line) => summary.lines.push(line),
        Err(e) => {
            println!("  export: not measured: {e:#}");
            summary
                .lines
                .push(format!("Bulwark export: not measured ({e:#})"));
        }
    }
    Ok(())
}

/// Fills the project up to `--export-annotations` annotations in SQL (copies of one the loop
/// made, on items without one), then exports and polls, sampling the server's RSS.
async fn export(
    args: &Args,
    api: &Api,
    project: i64,
    db: Option<&mut PgConnection>,
) -> anyhow::Result<String> {
    let c = db.context("--database-url is needed to seed the export's annotations")?;
    let items = find_table(c, &["project_id", "external_id", "annotation_count"]).await?;
    let ann = find_table(c, &["item_id", "request_id", "labels"]).await?;
    let have: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE project_id = $1",
        q(&ann)
    ))
    .bind(project)
    .fetch_one(&mut *c)
    .await?;
    let want = args.export_annotations;
    if have < want {
        let template: i64 = sqlx::query_scalar(&format!(
            "SELECT id FROM {} WHERE project_id = $1 ORDER BY id LIMIT 1",
            q(&ann)
        ))
        .bind(project)
        .fetch_optional(&mut *c)
        .await?
        .context("no annotation to copy (the loop made none)")?;
        let cols = columns_of(c, &ann).await?;
        let mut names = Vec::new();
        let mut exprs = Vec::new();
        for (name, _) in cols.iter().filter(|(n, _)| n != "id") {
            names.push(q(name));
            exprs.push(match name.as_str() {
                "item_id" => "i.id".to_owned(),
                "request_id" => "'seed-' || i.id".to_owned(),
                "created_at" | "updated_at" => "now()".to_owned(),
                other => format!("t.{}", q(other)),
            });
        }
        let (lo, hi): (i64, i64) = {
            let r = sqlx::query(&format!(
                "SELECT min(id), max(id) FROM {} WHERE project_id = $1",
                q(&items)
            ))
            .bind(project)
            .fetch_one(&mut *c)
            .await?;
            (r.try_get(0)?, r.try_get(1)?)
        };
        let insert = format!(
            "INSERT INTO {ann_q} ({names}) SELECT {exprs} FROM {items_q} i CROSS JOIN \
             (SELECT * FROM {ann_q} WHERE id = $1) t WHERE i.project_id = $2 AND i.id BETWEEN $3 AND $4 \
             AND i.annotation_count = 0 AND NOT EXISTS (SELECT 1 FROM {ann_q} a WHERE a.item_id = i.id) \
             ORDER BY i.id LIMIT $5",
            ann_q = q(&ann),
            items_q = q(&items),
            names = names.join(", "),
            exprs = exprs.join(", "),
        );
        let bump = format!(
            "UPDATE {items_q} i SET annotation_count = 1 WHERE i.project_id = $1 AND i.id BETWEEN $2 AND $3 \
             AND i.annotation_count = 0 AND EXISTS (SELECT 1 FROM {ann_q} a WHERE a.item_id = i.id)",
            items_q = q(&items),
            ann_q = q(&ann),
        );
        let pb = bar((want - have) as u64, "bulwark: seeding annotations");
        let t = Instant::now();
        let mut added = 0_i64;
        let mut k = lo;
        while k <= hi && have + added < want {
            let end = (k + 100_000).min(hi + 1);
            let n = sqlx::query(&insert)
                .bind(template)
                .bind(project)
                .bind(k)
                .bind(end - 1)
                .bind(want - have - added)
                .execute(&mut *c)
                .await
                .with_context(|| format!("seed annotations: {insert}"))?
                .rows_affected() as i64;
            sqlx::query(&bump)
                .bind(project)
                .bind(k)
                .bind(end - 1)
                .execute(&mut *c)
                .await?;
            added += n;
            pb.inc(n as u64);
            k = end;
        }
        pb.finish_and_clear();
        for t in [&ann, &items] {
            sqlx::query(&format!("VACUUM ANALYZE {}", q(t)))
                .execute(&mut *c)
                .await?;
        }
        println!(
            "  seeded {added} annotations in SQL into {ann} (copies of annotation {template} made by the loop, \
             one per unannotated item; {items}.annotation_count set) in {:.1} s; {} in all",
            t.elapsed().as_secs_f64(),
            have + added
        );
    }
    let total: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE project_id = $1",
        q(&ann)
    ))
    .bind(project)
    .fetch_one(&mut *c)
    .await?;

    let body: Value =
        serde_json::from_str(&args.export_body.replace("{project}", &project.to_string()))
            .context("--export-body is not JSON")?;
    let before_rss = args.pid.and_then(|p| proc_status_kib(p, "VmRSS:"));
    let before_hwm = args.pid.and_then(|p| proc_status_kib(p, "VmHWM:"));
    let t = Instant::now();
    let started = api.post_json("/exports", &body).await?;
    let id = started["id"].clone();
    let id = id
        .as_i64()
        .map(|n| n.to_string())
        .or_else(|| id.as_str().map(str::to_owned))
        .context("export id")?;
    let pb = bar(total.max(1) as u64, "bulwark: export");
    let mut max_rss = before_rss;
    let state = loop {
        if let Some(p) = args.pid {
            max_rss = max_rss.max(proc_status_kib(p, "VmRSS:"));
        }
        let v = api.get_json(&format!("/exports/{id}")).await?;
        let state = v["state"].as_str().unwrap_or("?").to_owned();
        if let Some(total) = v["rows_total"].as_u64() {
            pb.set_length(total.max(1));
        }
        pb.set_position(v["rows_done"].as_u64().unwrap_or(0));
        pb.set_message(state.clone());
        match state.as_str() {
            "done" | "completed" | "complete" | "succeeded" | "ready" | "finished" => break v,
            "failed" | "error" | "cancelled" => bail!("export {id} ended {state}: {v}"),
            _ => {}
        }
        ensure!(
            t.elapsed() < args.export_timeout,
            "export {id} still {state} after {:?}",
            args.export_timeout
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    pb.finish_and_clear();
    let took = t.elapsed().as_secs_f64();
    let after_hwm = args.pid.and_then(|p| proc_status_kib(p, "VmHWM:"));

    // Download and count what came out.
    let t = Instant::now();
    let mut r = checked(
        api.http
            .get(api.url(&format!("/exports/{id}/download")))
            .bearer_auth(&api.token)
            .send()
            .await?,
        "download",
    )
    .await?;
    let (mut bytes, mut lines) = (0_u64, 0_u64);
    while let Some(chunk) = r.chunk().await? {
        if let Some(p) = args.pid {
            max_rss = max_rss.max(proc_status_kib(p, "VmRSS:"));
        }
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let dl = t.elapsed().as_secs_f64();
    let worker = match (
        state["started_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
        state["finished_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
    ) {
        (Some(a), Some(b)) => format!("{:.2} s", (b - a).num_milliseconds() as f64 / 1000.0),
        _ => "?".into(),
    };
    println!(
        "  export of {total} annotations ({} rows): {took:.2} s from POST to state done (goal < 10 s); \
         the worker's started_at -> finished_at {worker}",
        state["rows_done"]
    );
    println!(
        "  download: {:.1} MiB, {lines} lines in {dl:.2} s",
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  bulwark RSS: {} before, {} max sampled during export and download; VmHWM {} before, {} after",
        mib(before_rss),
        mib(max_rss),
        mib(before_hwm),
        mib(after_hwm)
    );
    Ok(format!(
        "Bulwark export of {total} annotations: {took:.2} s POST to done, worker {worker} (goal < 10 s), download {dl:.2} s; RSS {} -> max {} (VmHWM {} -> {})",
        mib(before_rss),
        mib(max_rss),
        mib(before_hwm),
        mib(after_hwm)
    ))
}

// ---------------------------------------------------------------- main

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "bench-annotation: {} items, {} clients, {:?} measured after {:?} warm-up; parts {:?}",
        args.items, args.clients, args.duration, args.warmup, args.run
    );
    let mut summary = Summary::default();
    let mut failed = Vec::new();
    for part in [Part::Raw, Part::LabelStudio, Part::Bulwark] {
        if !args.run.contains(&part) {
            continue;
        }
        let r = match part {
            Part::Raw => run_raw(&args, &mut summary).await,
            Part::LabelStudio => run_label_studio(&args, &mut summary).await,
            Part::Bulwark => run_bulwark(&args, &mut summary).await,
        };
        if let Err(e) = r {
            println!("  {part:?}: failed: {e:#}");
            failed.push(format!("{part:?}"));
        }
    }

    println!("\nsummary (one run, same machine):");
    let rate = |f: &Option<LoopFigures>| f.as_ref().map(LoopFigures::rate);
    if let Some(r) = rate(&summary.raw) {
        println!("  raw SQL FOR UPDATE SKIP LOCKED loop: {r:.0} claims/s");
    }
    if let Some(b) = rate(&summary.bulwark) {
        print!("  Bulwark: {b:.0} claims/s");
        if let Some(r) = rate(&summary.raw) {
            print!(" = {:.2}x raw (goal >= 0.8x)", b / r);
        }
        println!();
    }
    if let Some(l) = rate(&summary.ls) {
        print!("  Label Studio: {l:.0} claims/s");
        if let Some(r) = rate(&summary.raw) {
            print!(" = {:.3}x raw", l / r);
        }
        if let Some(b) = rate(&summary.bulwark) {
            print!("; Bulwark / Label Studio = {:.1}x", b / l);
        }
        println!();
    }
    for l in &summary.lines {
        println!("  {l}");
    }
    if !failed.is_empty() {
        println!("  failed parts: {}", failed.join(", "));
    }
    Ok(())
}
