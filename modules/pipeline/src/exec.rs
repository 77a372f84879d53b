//! What a worker runs: the [`Job`] the scheduler rendered for one try (P6, P13), and the
//! executors of the built-in task types. Other task types plug in through [`TaskType`].
//!
//! The job is stored in the task instance (`rendered`) when the try is queued, so the worker
//! needs no DAG file, and a rerun of the same logical date renders the same job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::dag::{Backoff, RetryPolicy, SensorTarget, Task, TaskKind};
use crate::template::{self, RunContext};

/// One try of one task, fully rendered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub dag_id: String,
    pub task_id: String,
    pub run_id: String,
    pub logical_date: String,
    pub try_number: u32,
    pub kind: JobKind,
    pub timeout_ms: Option<u64>,
    pub retry: RetrySpec,
    /// Datasets a successful try announces (the task's `outlets`).
    #[serde(default)]
    pub outlets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobKind {
    Shell {
        command: String,
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        /// Exit codes that end the try `skipped`.
        #[serde(default)]
        skip_on_exit_code: Vec<i32>,
    },
    Http {
        method: String,
        url: String,
        headers: BTreeMap<String, String>,
        body: Option<String>,
        /// sha256 of dag/task/logical date: the same for every try and rerun of one date (P8).
        idempotency_key: String,
    },
    Sensor {
        #[serde(flatten)]
        target: Target,
        poke_interval_ms: u64,
        timeout_ms: Option<u64>,
        /// A timeout skips the sensor instead of failing it.
        #[serde(default)]
        soft_fail: bool,
    },
    Plugin {
        type_name: String,
        args: serde_json::Value,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Subject(String),
    File(String),
    Dataset(String),
}

/// The retry policy, as stored with the job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetrySpec {
    pub retries: u32,
    pub delay_ms: u64,
    pub exponential: bool,
    pub max_delay_ms: u64,
    pub jitter: bool,
}

impl RetrySpec {
    fn of(p: &RetryPolicy) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            retries: p.retries,
            delay_ms: ms(p.delay),
            exponential: matches!(p.backoff, Backoff::Exponential),
            max_delay_ms: ms(p.max_delay),
            jitter: p.jitter,
        }
    }

    /// The delay before try `next_try`, by the DAG's own rule.
    pub fn delay_before(&self, next_try: u32) -> Duration {
        RetryPolicy {
            retries: self.retries,
            delay: Duration::from_millis(self.delay_ms),
            backoff: if self.exponential {
                Backoff::Exponential
            } else {
                Backoff::Fixed
            },
            max_delay: Duration::from_millis(self.max_delay_ms),
            jitter: self.jitter,
        }
        .delay_before(next_try)
    }
}

/// A task that cannot be rendered (a template that fails at run time, e.g. a conf value).
#[derive(Debug, thiserror::Error)]
#[error("task `{task}`: {message}")]
pub struct RenderError {
    pub task: String,
    pub message: String,
}

/// Render one task's try.
pub fn render(task: &Task, ctx: &RunContext) -> Result<Job, RenderError> {
    let fail = |e: template::TemplateError| RenderError {
        task: task.task_id.clone(),
        message: e.to_string(),
    };
    let kind = match template::render_task(&task.kind, ctx).map_err(fail)? {
        TaskKind::Shell {
            command,
            env,
            cwd,
            skip_on_exit_code,
        } => JobKind::Shell {
            command,
            env,
            cwd,
            skip_on_exit_code,
        },
        TaskKind::Http {
            method,
            url,
            headers,
            body,
        } => JobKind::Http {
            method,
            url,
            headers,
            body,
            idempotency_key: idempotency_key(&ctx.dag_id, &task.task_id, &ctx.logical_date),
        },
        TaskKind::Sensor {
            target,
            poke_interval,
            timeout,
            soft_fail,
        } => JobKind::Sensor {
            target: match target {
                SensorTarget::Subject(s) => Target::Subject(s),
                SensorTarget::File(s) => Target::File(s),
                SensorTarget::Dataset(s) => Target::Dataset(s),
            },
            poke_interval_ms: u64::try_from(poke_interval.as_millis()).unwrap_or(u64::MAX),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            soft_fail,
        },
        TaskKind::Plugin { type_name, args } => JobKind::Plugin { type_name, args },
    };
    Ok(Job {
        dag_id: ctx.dag_id.clone(),
        task_id: task.task_id.clone(),
        run_id: ctx.run_id.clone(),
        logical_date: ctx.logical_date.to_rfc3339(),
        try_number: ctx.try_number,
        kind,
        timeout_ms: task
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        retry: RetrySpec::of(&task.retry),
        outlets: task.outlets.clone(),
    })
}

/// The `Idempotency-Key` of an http task: one per DAG, task and logical date (P8).
pub fn idempotency_key(
    dag_id: &str,
    task_id: &str,
    logical: &chrono::DateTime<chrono::Utc>,
) -> String {
    let mut h = sha2::Sha256::new();
    h.update(format!("{dag_id}/{task_id}/{}", logical.to_rfc3339()).as_bytes());
    format!("{:x}", h.finalize())
}

/// Where a running task writes its log lines.
#[derive(Clone)]
pub struct LogSink(mpsc::UnboundedSender<String>);

impl LogSink {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
    pub fn line(&self, line: impl Into<String>) {
        let mut l = line.into();
        l.push('\n');
        // The receiver lives as long as the try; a closed one means the try is over.
        let _ = self.0.send(l);
    }
}

/// How a try ended, from the executor's side.
#[derive(Debug)]
pub struct TaskFailure {
    pub message: String,
    pub exit_code: Option<i32>,
    /// What the try found before it failed (a `sql` task's quality results), stored with it.
    pub details: Option<serde_json::Value>,
}

impl TaskFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: None,
            details: None,
        }
    }
}

/// What a successful try reports beyond its log: stored with the try and shown in the UI
/// (a `sql` task's bytes read, rows written, Delta version, quality results).
#[derive(Debug, Default)]
pub struct TaskOutput {
    pub exit_code: Option<i32>,
    pub details: Option<serde_json::Value>,
    /// Set when the try decided there is nothing to do (a shell task's `skip_on_exit_code`):
    /// the instance ends `skipped` with this reason, and so does everything downstream.
    pub skipped: Option<String>,
    /// Datasets the try updated besides the task's `outlets` (a `sql` task's output table).
    pub datasets: Vec<String>,
}

/// A task type another module (or part 2 of this one) provides: `sql`, `quality`, `export`.
#[async_trait::async_trait]
pub trait TaskType: Send + Sync {
    /// The `type = "..."` of DAG files.
    fn name(&self) -> &'static str;
    /// Check the task's arguments when the DAG loads (P9); the message names the field. `dag`
    /// is the whole DAG, so a check can see its sibling tasks (a `sql` task's upstream tables).
    fn validate(&self, args: &serde_json::Value, dag: &crate::dag::Dag) -> Result<(), String>;
    /// Run one try. Log through `log`; return an error to fail the try.
    async fn run(
        &self,
        job: &Job,
        args: &serde_json::Value,
        log: &LogSink,
    ) -> Result<TaskOutput, TaskFailure>;
}

/// Task types by name.
pub type TaskTypes = BTreeMap<String, Arc<dyn TaskType>>;

/// Run a job to its end (the timeout is the caller's). `Ok(exit code)` on success.
pub async fn run(
    job: &Job,
    types: &TaskTypes,
    http: &reqwest::Client,
    log: &LogSink,
) -> Result<TaskOutput, TaskFailure> {
    let code = |exit_code| TaskOutput {
        exit_code,
        ..TaskOutput::default()
    };
    match &job.kind {
        JobKind::Shell {
            command,
            env,
            cwd,
            skip_on_exit_code,
        } => shell(job, command, env, cwd.as_deref(), skip_on_exit_code, log).await,
        JobKind::Http {
            method,
            url,
            headers,
            body,
            idempotency_key,
        } => http_call(
            http,
            method,
            url,
            headers,
            body.as_deref(),
            idempotency_key,
            log,
        )
        .await
        .map(|()| code(None)),
        JobKind::Sensor { .. } => Err(TaskFailure::new(
            "a sensor is not run by a worker (the scheduler waits for its event)",
        )),
        JobKind::Plugin { type_name, args } => match types.get(type_name) {
            Some(t) => t.run(job, args, log).await,
            None => Err(TaskFailure::new(format!(
                "no task type `{type_name}` in this build"
            ))),
        },
    }
}

async fn shell(
    job: &Job,
    command: &str,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    skip_codes: &[i32],
    log: &LogSink,
) -> Result<TaskOutput, TaskFailure> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env)
        .env("BULWARK_DAG_ID", &job.dag_id)
        .env("BULWARK_TASK_ID", &job.task_id)
        .env("BULWARK_RUN_ID", &job.run_id)
        .env("BULWARK_LOGICAL_DATE", &job.logical_date)
        .env("BULWARK_TRY_NUMBER", job.try_number.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so a timeout or shutdown stops the command's children too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| TaskFailure {
        message: format!("cannot start `sh -c`: {e}"),
        exit_code: None,
        details: None,
    })?;
    let group = child.id();
    let _group_guard = GroupKill(group);
    let out = child.stdout.take();
    let err = child.stderr.take();
    let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>, log: LogSink| async move {
        if let Some(r) = r {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.line(line);
            }
        }
    };
    let a = tokio::spawn(pump(
        out.map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        log.clone(),
    ));
    let b = tokio::spawn(pump(
        err.map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        log.clone(),
    ));
    let status = child.wait().await.map_err(|e| TaskFailure {
        message: format!("waiting for the command: {e}"),
        exit_code: None,
        details: None,
    })?;
    let _ = a.await;
    let _ = b.await;
    match status.code() {
        Some(0) => Ok(TaskOutput {
            exit_code: Some(0),
            ..TaskOutput::default()
        }),
        Some(code) if skip_codes.contains(&code) => Ok(TaskOutput {
            exit_code: Some(code),
            skipped: Some(format!(
                "the command exited with {code} (skip_on_exit_code)"
            )),
            ..TaskOutput::default()
        }),
        Some(code) => Err(TaskFailure {
            message: format!("the command exited with {code}"),
            exit_code: Some(code),
            details: None,
        }),
        None => Err(TaskFailure {
            message: "the command was killed by a signal".into(),
            exit_code: None,
            details: None,
        }),
    }
}

/// Kills a command's whole process group when the try ends early (timeout, shutdown): dropping
/// the child kills only `sh`.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // A group that already exited makes `kill` fail, which is what we want.
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg("--")
                .arg(format!("-{pid}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn http_call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &BTreeMap<String, String>,
    body: Option<&str>,
    key: &str,
    log: &LogSink,
) -> Result<(), TaskFailure> {
    let fail = |message: String| TaskFailure {
        message,
        exit_code: None,
        details: None,
    };
    let m = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| fail(format!("bad HTTP method `{method}`")))?;
    let mut req = http.request(m, url).header("Idempotency-Key", key);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    log.line(format!("{method} {url} (Idempotency-Key: {key})"));
    let resp = req
        .send()
        .await
        .map_err(|e| fail(format!("request failed: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let shown: String = text.chars().take(4096).collect();
    log.line(format!("HTTP {status}"));
    if !shown.is_empty() {
        log.line(shown);
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("the server answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn ctx(day: u32, try_number: u32) -> RunContext {
        let start = chrono::Utc
            .with_ymd_and_hms(2026, 11, day, 0, 0, 0)
            .single()
            .expect("date");
        RunContext {
            dag_id: "d".into(),
            task_id: "t".into(),
            run_id: format!("manual__{day}"),
            logical_date: start,
            interval: crate::schedule::DataInterval {
                start,
                end: start + chrono::Duration::days(1),
            },
            try_number,
            tz: chrono_tz::UTC,
            conf: serde_json::json!({}),
        }
    }

    /// P8: one key per DAG, task and logical date — the same for every try and rerun.
    #[test]
    fn idempotency_key_is_per_dag_task_and_date() {
        let a = ctx(1, 1);
        let k1 = idempotency_key("d", "t", &a.logical_date);
        assert_eq!(k1, idempotency_key("d", "t", &ctx(1, 2).logical_date));
        assert_ne!(k1, idempotency_key("d", "t", &ctx(2, 1).logical_date));
        assert_ne!(k1, idempotency_key("d", "u", &a.logical_date));
        assert_eq!(k1.len(), 64);
    }

    /// P6, P13: a rendered job depends on the run's context only; a stored job reads back equal.
    #[test]
    fn render_is_deterministic_and_round_trips() {
        let task = crate::dag::Task::http("notify", "POST", "http://localhost/hooks/{{ ds }}");
        let j1 = render(&task, &ctx(3, 1)).expect("render");
        let j2 = render(&task, &ctx(3, 1)).expect("render");
        assert_eq!(j1, j2);
        match &j1.kind {
            JobKind::Http {
                url,
                idempotency_key: key,
                ..
            } => {
                assert_eq!(url, "http://localhost/hooks/2026-11-03");
                assert_eq!(
                    key,
                    &idempotency_key("d", "notify", &ctx(3, 1).logical_date)
                );
            }
            other => panic!("not http: {other:?}"),
        }
        let text = serde_json::to_string(&j1).expect("json");
        let back: Job = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, j1);
    }

    #[test]
    fn retry_spec_keeps_the_dags_rule() {
        let p = RetryPolicy {
            retries: 3,
            delay: Duration::from_secs(1),
            backoff: Backoff::Exponential,
            max_delay: Duration::from_secs(3),
            jitter: false,
        };
        let s = RetrySpec::of(&p);
        for t in 2..6 {
            assert_eq!(s.delay_before(t), p.delay_before(t), "try {t}");
        }
        assert_eq!(
            s.delay_before(4),
            Duration::from_secs(3),
            "capped at max_delay"
        );
    }
}
