//! DAG definitions: the model, the TOML file loader (with file:line errors), and a Rust
//! builder for built-in DAGs. Both paths end in the same checks ([`finalize`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::schedule::Schedule;

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// One DAG, checked and with its tasks in topological order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dag {
    pub dag_id: String,
    pub description: String,
    /// None for built-in DAGs.
    pub file: Option<PathBuf>,
    pub schedule: Schedule,
    #[serde(serialize_with = "ser_tz")]
    pub timezone: Tz,
    pub start_date: DateTime<Utc>,
    pub end_date: Option<DateTime<Utc>>,
    pub catchup: bool,
    pub max_active_runs: u32,
    pub max_active_tasks: u32,
    pub tags: Vec<String>,
    pub owner: String,
    #[serde(serialize_with = "ser_opt_dur")]
    pub sla: Option<Duration>,
    /// Upstreams before downstreams; ties broken by task_id.
    pub tasks: Vec<Task>,
}

/// One task of a DAG.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub task_id: String,
    #[serde(flatten)]
    pub kind: TaskKind,
    pub depends_on: Vec<String>,
    pub pool: String,
    pub priority_weight: i32,
    #[serde(serialize_with = "ser_opt_dur")]
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Datasets a successful try updates (Airflow's `outlets`): each gets an event, so DAGs
    /// scheduled on it run and sensors waiting for it fire. A `sql` task's output table is
    /// announced without being listed.
    pub outlets: Vec<String>,
}

/// A dataset name: 1 to 250 of ASCII letters, digits and `_.-:`.
pub fn valid_dataset_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 250
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-:".contains(c))
}

/// How a failed task is retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    pub retries: u32,
    #[serde(serialize_with = "ser_dur")]
    pub delay: Duration,
    pub backoff: Backoff,
    #[serde(serialize_with = "ser_dur")]
    pub max_delay: Duration,
    pub jitter: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    Fixed,
    Exponential,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 0,
            delay: Duration::from_secs(30),
            backoff: Backoff::Fixed,
            max_delay: Duration::from_secs(3600),
            jitter: false,
        }
    }
}

impl RetryPolicy {
    /// Delay before try `next_try` (2 = the first retry). Fixed: `delay`. Exponential:
    /// `delay * 2^(next_try-2)` capped at `max_delay`, and with `jitter` a uniform draw from
    /// `[d/2, d]`. Saturates instead of overflowing.
    pub fn delay_before(&self, next_try: u32) -> Duration {
        match self.backoff {
            Backoff::Fixed => self.delay,
            Backoff::Exponential => {
                let exp = next_try.saturating_sub(2);
                let d = 1u32
                    .checked_shl(exp)
                    .and_then(|factor| self.delay.checked_mul(factor))
                    .map_or(self.max_delay, |d| d.min(self.max_delay));
                if self.jitter { jittered(d) } else { d }
            }
        }
    }
}

fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    // Integer nanoseconds: float scaling of a huge Duration can round past Duration::MAX.
    let hi = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let lo = hi / 2;
    Duration::from_nanos(rand::rng().random_range(lo..=hi))
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TaskKind {
    Shell {
        command: String,
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        /// Exit codes that end the try `skipped` instead of failed (Airflow's BashOperator
        /// convention: 99 unless the DAG says otherwise; an empty list turns it off).
        skip_on_exit_code: Vec<i32>,
    },
    Http {
        method: String,
        url: String,
        headers: BTreeMap<String, String>,
        body: Option<String>,
    },
    Sensor {
        target: SensorTarget,
        #[serde(serialize_with = "ser_dur")]
        poke_interval: Duration,
        /// The sensor fails after waiting this long.
        #[serde(serialize_with = "ser_opt_dur")]
        timeout: Option<Duration>,
        /// On timeout the sensor is `skipped` (and so is everything downstream), not failed.
        soft_fail: bool,
    },
    /// A type another part of the module or another module registers (sql, quality, export).
    Plugin {
        type_name: String,
        args: serde_json::Value,
    },
}

/// What a sensor waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorTarget {
    /// A bus subject receiving a message.
    Subject(String),
    /// A file appearing.
    File(String),
    /// A dataset event.
    Dataset(String),
}

impl TaskKind {
    /// "shell", "http", "sensor", or the plugin's type name.
    pub fn type_name(&self) -> &str {
        match self {
            TaskKind::Shell { .. } => "shell",
            TaskKind::Http { .. } => "http",
            TaskKind::Sensor { .. } => "sensor",
            TaskKind::Plugin { type_name, .. } => type_name,
        }
    }

    /// Every template string of the task with its field name (map values are listed under the
    /// map's name). Every string inside a plugin's args is a template, listed as `args`.
    pub fn templates(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        match self {
            TaskKind::Shell {
                command, env, cwd, ..
            } => {
                out.push(("command", command.as_str()));
                out.extend(env.values().map(|v| ("env", v.as_str())));
                out.extend(cwd.as_deref().map(|c| ("cwd", c)));
            }
            TaskKind::Http {
                url, headers, body, ..
            } => {
                out.push(("url", url.as_str()));
                out.extend(headers.values().map(|v| ("headers", v.as_str())));
                out.extend(body.as_deref().map(|b| ("body", b)));
            }
            TaskKind::Sensor { target, .. } => match target {
                SensorTarget::Subject(s) => out.push(("subject", s.as_str())),
                SensorTarget::File(f) => out.push(("file", f.as_str())),
                SensorTarget::Dataset(_) => {}
            },
            TaskKind::Plugin { args, .. } => json_strings(args, &mut out),
        }
        out
    }
}

/// Every string value inside `v`, depth first.
fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<(&'static str, &'a str)>) {
    match v {
        serde_json::Value::String(s) => out.push(("args", s.as_str())),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

impl Task {
    /// A task with default settings (pool "default", weight 1, no retries).
    pub fn new(task_id: impl Into<String>, kind: TaskKind) -> Task {
        Task {
            task_id: task_id.into(),
            kind,
            depends_on: Vec::new(),
            pool: "default".into(),
            priority_weight: 1,
            timeout: None,
            retry: RetryPolicy::default(),
            outlets: Vec::new(),
        }
    }

    pub fn shell(task_id: impl Into<String>, command: impl Into<String>) -> Task {
        Task::new(
            task_id,
            TaskKind::Shell {
                command: command.into(),
                env: BTreeMap::new(),
                cwd: None,
                skip_on_exit_code: DEFAULT_SKIP_EXIT_CODES.to_vec(),
            },
        )
    }

    pub fn http(
        task_id: impl Into<String>,
        method: impl Into<String>,
        url: impl Into<String>,
    ) -> Task {
        Task::new(
            task_id,
            TaskKind::Http {
                method: method.into(),
                url: url.into(),
                headers: BTreeMap::new(),
                body: None,
            },
        )
    }

    pub fn sensor(task_id: impl Into<String>, target: SensorTarget) -> Task {
        Task::new(
            task_id,
            TaskKind::Sensor {
                target,
                poke_interval: DEFAULT_POKE_INTERVAL,
                timeout: None,
                soft_fail: false,
            },
        )
    }

    pub fn plugin(
        task_id: impl Into<String>,
        type_name: impl Into<String>,
        args: serde_json::Value,
    ) -> Task {
        Task::new(
            task_id,
            TaskKind::Plugin {
                type_name: type_name.into(),
                args,
            },
        )
    }

    pub fn depends_on<I, S>(mut self, ids: I) -> Task
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on.extend(ids.into_iter().map(Into::into));
        self
    }

    pub fn pool(mut self, pool: impl Into<String>) -> Task {
        self.pool = pool.into();
        self
    }

    /// Datasets a successful try announces (see [`Task::outlets`]).
    pub fn outlets<I, S>(mut self, names: I) -> Task
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.outlets.extend(names.into_iter().map(Into::into));
        self
    }

    pub fn priority_weight(mut self, w: i32) -> Task {
        self.priority_weight = w;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Task {
        self.timeout = Some(t);
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Task {
        self.retry = retry;
        self
    }
}

const DEFAULT_POKE_INTERVAL: Duration = Duration::from_secs(30);

/// A shell command exiting with one of these is `skipped` (Airflow's BashOperator default).
pub const DEFAULT_SKIP_EXIT_CODES: [i32; 1] = [99];

/// `skip_on_exit_code`: one exit code or a list of them, each 1–255 (0 is success); `[]` turns
/// skipping off.
fn exit_codes(cx: &mut FileCx<'_>, line: Option<usize>, id: &str, v: &Node) -> Vec<i32> {
    let items: Vec<&Node> = match &v.val {
        Val::Array(items) => items.iter().collect(),
        _ => vec![v],
    };
    let mut out = Vec::new();
    for it in items {
        match &it.val {
            Val::Int(i) if (1..=255).contains(i) => out.push(i32::try_from(*i).unwrap_or(99)),
            Val::Int(i) => cx.err(
                line,
                format!("task `{id}`: skip_on_exit_code {i} is not an exit code from 1 to 255"),
            ),
            other => cx.wrong(
                line,
                "skip_on_exit_code",
                "an integer or an array of integers",
                other,
            ),
        }
    }
    out
}

impl Dag {
    /// sha256 (hex) of everything that affects execution: not the file path, description,
    /// tags or owner, so editing those does not make runs look like they used another DAG.
    pub fn hash(&self) -> String {
        let mut d = self.clone();
        d.file = None;
        d.description.clear();
        d.tags.clear();
        d.owner.clear();
        // serde_json maps are sorted (or built sorted, see `to_json`), so the text is canonical.
        let text = match serde_json::to_string(&d) {
            Ok(t) => t,
            // Plain data with finite numbers cannot fail to serialise; fall back rather than panic.
            Err(_) => format!("{d:?}"),
        };
        hex(&Sha256::digest(text.as_bytes()))
    }

    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.task_id == id)
    }

    /// Direct downstreams of `id`, in topological order.
    pub fn downstream(&self, id: &str) -> Vec<&str> {
        self.tasks
            .iter()
            .filter(|t| t.depends_on.iter().any(|d| d == id))
            .map(|t| t.task_id.as_str())
            .collect()
    }

    /// `id` and every task downstream of it, in topological order (empty if `id` is unknown).
    pub fn descendants(&self, id: &str) -> Vec<String> {
        if self.task(id).is_none() {
            return Vec::new();
        }
        // Topological order means one forward pass sees every upstream before its downstreams.
        let mut set: HashSet<&str> = HashSet::from([id]);
        for t in &self.tasks {
            if t.depends_on.iter().any(|d| set.contains(d.as_str())) {
                set.insert(&t.task_id);
            }
        }
        self.in_order(&set)
    }

    /// `id` and every task upstream of it, in topological order (empty if `id` is unknown).
    pub fn ancestors(&self, id: &str) -> Vec<String> {
        if self.task(id).is_none() {
            return Vec::new();
        }
        let mut set: HashSet<&str> = HashSet::from([id]);
        for t in self.tasks.iter().rev() {
            if set.contains(t.task_id.as_str()) {
                set.extend(t.depends_on.iter().map(String::as_str));
            }
        }
        self.in_order(&set)
    }

    fn in_order(&self, set: &HashSet<&str>) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|t| set.contains(t.task_id.as_str()))
            .map(|t| t.task_id.clone())
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn ser_tz<S: Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

fn ser_dur<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_dur<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A problem with a DAG definition. Display: `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct DagError {
    pub file: Option<PathBuf>,
    /// 1-based.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for DagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}", p.display())?,
            None => write!(f, "<built-in>")?,
        }
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": {}", self.message)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

/// Where things were defined, for error lines. Empty for built-in DAGs.
#[derive(Debug, Default)]
struct Locs {
    dag_keys: HashMap<String, usize>,
    /// task id -> (line of the task's table, line of each of its keys)
    tasks: HashMap<String, (usize, HashMap<String, usize>)>,
    /// Fallback line for DAG-wide problems.
    top: Option<usize>,
}

impl Locs {
    fn dag_key(&self, key: &str) -> Option<usize> {
        self.dag_keys.get(key).copied().or(self.top)
    }
    fn task(&self, id: &str) -> Option<usize> {
        self.tasks.get(id).map(|t| t.0).or(self.top)
    }
    fn task_key(&self, id: &str, key: &str) -> Option<usize> {
        match self.tasks.get(id) {
            Some((line, keys)) => Some(keys.get(key).copied().unwrap_or(*line)),
            None => self.top,
        }
    }
}

/// `[A-Za-z0-9_.-]{1,250}`
fn valid_id(id: &str) -> bool {
    (1..=250).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The checks every DAG passes (file or built-in), then the topological sort.
fn finalize(mut dag: Dag, locs: &Locs, mut errors: Vec<DagError>) -> Result<Dag, Vec<DagError>> {
    let file = dag.file.clone();
    let mut err = |line: Option<usize>, message: String| {
        errors.push(DagError {
            file: file.clone(),
            line,
            message,
        });
    };

    if !valid_id(&dag.dag_id) {
        err(
            locs.dag_key("dag_id"),
            format!("dag_id `{}` must match [A-Za-z0-9_.-]{{1,250}}", dag.dag_id),
        );
    }
    if dag.max_active_runs == 0 {
        err(
            locs.dag_key("max_active_runs"),
            "max_active_runs must be at least 1".into(),
        );
    }
    if dag.max_active_tasks == 0 {
        err(
            locs.dag_key("max_active_tasks"),
            "max_active_tasks must be at least 1".into(),
        );
    }
    if let Some(end) = dag.end_date
        && end < dag.start_date
    {
        err(
            locs.dag_key("end_date"),
            format!("end_date {end} is before start_date {}", dag.start_date),
        );
    }
    if dag.tasks.is_empty() {
        err(locs.dag_key("tasks"), "the DAG has no tasks".into());
    }

    let mut seen: HashSet<&str> = HashSet::new();
    for t in &dag.tasks {
        let id = t.task_id.as_str();
        if !valid_id(id) {
            err(
                locs.task(id),
                format!("task id `{id}` must match [A-Za-z0-9_.-]{{1,250}}"),
            );
        }
        // TOML itself rejects duplicate tables; this catches the builder.
        if !seen.insert(id) {
            err(locs.task(id), format!("duplicate task id `{id}`"));
        }
        if let TaskKind::Http { url, .. } = &t.kind
            && url.trim().is_empty()
        {
            err(
                locs.task_key(id, "url"),
                format!("task `{id}`: http url is empty"),
            );
        }
        if let TaskKind::Shell { command, .. } = &t.kind
            && command.trim().is_empty()
        {
            err(
                locs.task_key(id, "command"),
                format!("task `{id}`: shell command is empty"),
            );
        }
        for (field, text) in t.kind.templates() {
            if let Err(e) = crate::template::check(text) {
                err(
                    locs.task_key(id, field),
                    format!("task `{id}`, field `{field}`: {e}"),
                );
            }
        }
    }

    // Graph checks. Edges run upstream -> downstream.
    let ids: BTreeSet<&str> = dag.tasks.iter().map(|t| t.task_id.as_str()).collect();
    let mut ups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for t in &dag.tasks {
        let id = t.task_id.as_str();
        let entry = ups.entry(id).or_default();
        for d in &t.depends_on {
            if d == id {
                err(
                    locs.task_key(id, "depends_on"),
                    format!("task `{id}` depends on itself"),
                );
            } else if !ids.contains(d.as_str()) {
                err(
                    locs.task_key(id, "depends_on"),
                    format!("task `{id}` depends on unknown task `{d}`"),
                );
            } else {
                entry.insert(d.as_str());
            }
        }
    }
    match topo_order(&ups) {
        Ok(order) => {
            let rank: HashMap<String, usize> = order
                .iter()
                .enumerate()
                .map(|(i, id)| (id.to_string(), i))
                .collect();
            dag.tasks
                .sort_by_key(|t| rank.get(&t.task_id).copied().unwrap_or(usize::MAX));
        }
        Err(cycle) => {
            let first = cycle.first().map_or("", String::as_str);
            err(
                locs.task(first),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            );
        }
    }
    for t in &mut dag.tasks {
        // Repeated names in depends_on mean nothing extra; keep the first of each.
        let mut seen = HashSet::new();
        t.depends_on.retain(|d| seen.insert(d.clone()));
    }

    if errors.is_empty() {
        Ok(dag)
    } else {
        Err(errors)
    }
}

/// Kahn's algorithm with a sorted ready set (ties by id). On a cycle, returns one cycle path
/// (first node repeated at the end).
fn topo_order(ups: &BTreeMap<&str, BTreeSet<&str>>) -> Result<Vec<String>, Vec<String>> {
    let mut pending: BTreeMap<&str, usize> = ups.iter().map(|(k, v)| (*k, v.len())).collect();
    let mut downs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, us) in ups {
        for u in us {
            downs.entry(u).or_default().push(id);
        }
    }
    let mut ready: BTreeSet<&str> = pending
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order = Vec::with_capacity(ups.len());
    while let Some(id) = ready.pop_first() {
        order.push(id.to_string());
        pending.remove(id);
        for d in downs.get(id).into_iter().flatten() {
            if let Some(n) = pending.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    ready.insert(d);
                }
            }
        }
    }
    if pending.is_empty() {
        return Ok(order);
    }
    // Every remaining node has an unfinished upstream that also remains, so walking upstream
    // edges from any of them must revisit a node: that loop is a cycle.
    let Some(start) = pending.keys().next().copied() else {
        return Ok(order);
    };
    let mut path: Vec<&str> = vec![start];
    let mut at = start;
    while let Some(next) = ups
        .get(at)
        .and_then(|us| us.iter().find(|u| pending.contains_key(*u)))
        .copied()
    {
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
            // The walk went upstream; print it in data-flow order, from the smallest id so the
            // message is the same whichever node the walk started from.
            cycle.reverse();
            if let Some(min) = (0..cycle.len()).min_by_key(|i| &cycle[*i]) {
                cycle.rotate_left(min);
            }
            if let Some(first) = cycle.first().cloned() {
                cycle.push(first);
            }
            return Err(cycle);
        }
        path.push(next);
        at = next;
    }
    Err(pending.keys().map(|s| s.to_string()).collect())
}

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Builds a built-in DAG in Rust; `build()` runs the same checks as file loading.
#[derive(Debug, Clone)]
pub struct DagBuilder {
    dag: Dag,
}

impl DagBuilder {
    /// Defaults: no schedule, UTC, start_date at the Unix epoch, no catchup, 16/16.
    pub fn new(dag_id: impl Into<String>) -> DagBuilder {
        DagBuilder {
            dag: Dag {
                dag_id: dag_id.into(),
                description: String::new(),
                file: None,
                schedule: Schedule::None,
                timezone: Tz::UTC,
                start_date: DateTime::<Utc>::UNIX_EPOCH,
                end_date: None,
                catchup: false,
                max_active_runs: 16,
                max_active_tasks: 16,
                tags: Vec::new(),
                owner: String::new(),
                sla: None,
                tasks: Vec::new(),
            },
        }
    }
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.dag.description = d.into();
        self
    }
    pub fn schedule(mut self, s: Schedule) -> Self {
        self.dag.schedule = s;
        self
    }
    pub fn timezone(mut self, tz: Tz) -> Self {
        self.dag.timezone = tz;
        self
    }
    pub fn start_date(mut self, t: DateTime<Utc>) -> Self {
        self.dag.start_date = t;
        self
    }
    pub fn end_date(mut self, t: DateTime<Utc>) -> Self {
        self.dag.end_date = Some(t);
        self
    }
    pub fn catchup(mut self, c: bool) -> Self {
        self.dag.catchup = c;
        self
    }
    pub fn max_active_runs(mut self, n: u32) -> Self {
        self.dag.max_active_runs = n;
        self
    }
    pub fn max_active_tasks(mut self, n: u32) -> Self {
        self.dag.max_active_tasks = n;
        self
    }
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.dag.tags = tags.into_iter().map(Into::into).collect();
        self
    }
    pub fn owner(mut self, o: impl Into<String>) -> Self {
        self.dag.owner = o.into();
        self
    }
    pub fn sla(mut self, d: Duration) -> Self {
        self.dag.sla = Some(d);
        self
    }
    pub fn task(mut self, t: Task) -> Self {
        self.dag.tasks.push(t);
        self
    }
    /// Check and return the DAG; several problems are joined with "; ".
    pub fn build(self) -> Result<Dag, DagError> {
        finalize(self.dag, &Locs::default(), Vec::new()).map_err(|errs| DagError {
            file: None,
            line: None,
            message: errs
                .into_iter()
                .map(|e| e.message)
                .collect::<Vec<_>>()
                .join("; "),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A TOML tree that keeps byte spans (toml::Value drops them)
// ---------------------------------------------------------------------------------------------

// toml reports spans through serde_spanned's private struct protocol; these are its names
// (serde_spanned 0.6, used by toml 0.8). Speaking it directly lets every node carry a span
// when toml has one and degrade to "no span" (instead of an error) when it has none.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
// toml_datetime hands datetimes to deserialize_any as a one-entry map with this key.
const DATETIME_FIELD: &str = "$__toml_private_datetime";

#[derive(Debug, Clone)]
struct Node {
    span: Option<Range<usize>>,
    val: Val,
}

#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
struct Key {
    name: String,
    span: Option<Range<usize>>,
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, NodeVisitor { spanned: true })
    }
}

/// A value read with deserialize_any (the inside of a spanned wrapper).
struct Bare(Node);

impl<'de> Deserialize<'de> for Bare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor { spanned: false }).map(Bare)
    }
}

struct NodeVisitor {
    /// Whether a map may be the spanned wrapper (false inside it, so a user key can never be
    /// mistaken for the protocol).
    spanned: bool,
}

fn bare(val: Val) -> Node {
    Node { span: None, val }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(bare(Val::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(bare(Val::Int(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(|v| bare(Val::Int(v)))
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(bare(Val::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(bare(Val::Str(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(bare(Val::Str(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(bare(Val::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<Key>()? else {
            return Ok(bare(Val::Table(Vec::new())));
        };
        if self.spanned && first.name == SPANNED_START {
            let start: usize = map.next_value()?;
            let mut end = start;
            let mut inner = None;
            while let Some(k) = map.next_key::<Key>()? {
                if k.name == SPANNED_END {
                    end = map.next_value()?;
                } else {
                    inner = Some(map.next_value::<Bare>()?.0);
                }
            }
            let mut node = inner.ok_or_else(|| de::Error::custom("spanned value missing"))?;
            node.span = Some(start..end);
            return Ok(node);
        }
        if first.name == DATETIME_FIELD {
            let text: String = map.next_value()?;
            return Ok(bare(Val::Datetime(text)));
        }
        let mut entries = vec![(first, map.next_value::<Node>()?)];
        while let Some(k) = map.next_key::<Key>()? {
            let v = map.next_value::<Node>()?;
            entries.push((k, v));
        }
        Ok(bare(Val::Table(entries)))
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            name: v.to_string(),
            span: None,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        let (mut start, mut end, mut name) = (None, None, None);
        while let Some(k) = map.next_key::<String>()? {
            match k.as_str() {
                SPANNED_START => start = Some(map.next_value::<usize>()?),
                SPANNED_END => end = Some(map.next_value::<usize>()?),
                _ => name = Some(map.next_value::<String>()?),
            }
        }
        Ok(Key {
            name: name.ok_or_else(|| de::Error::custom("spanned key missing"))?,
            span: start.zip(end).map(|(s, e)| s..e),
        })
    }
}

/// JSON for plugin args. Keys are inserted sorted so the DAG hash stays canonical even if
/// serde_json's `preserve_order` is enabled somewhere in the build.
fn to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &n.val {
        Val::Str(s) | Val::Datetime(s) => J::String(s.clone()),
        Val::Int(i) => J::from(*i),
        Val::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Val::Bool(b) => J::Bool(*b),
        Val::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Val::Table(t) => {
            let sorted: BTreeMap<&str, J> = t
                .iter()
                .map(|(k, v)| (k.name.as_str(), to_json(v)))
                .collect();
            J::Object(
                sorted
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File loading
// ---------------------------------------------------------------------------------------------

/// Turns byte offsets into lines and collects errors for one file.
struct FileCx<'a> {
    file: &'a Path,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    errors: Vec<DagError>,
}

impl FileCx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        match self.line_starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }
    fn line(&self, k: &Key, v: &Node) -> Option<usize> {
        k.span
            .as_ref()
            .or(v.span.as_ref())
            .map(|s| self.line_of(s.start))
    }
    fn err(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(DagError {
            file: Some(self.file.to_path_buf()),
            line,
            message: message.into(),
        });
    }
    fn wrong(&mut self, line: Option<usize>, key: &str, want: &str, got: &Val) {
        self.err(
            line,
            format!("`{key}` must be {want}, found {}", got.kind()),
        );
    }
    fn string(&mut self, line: Option<usize>, key: &str, v: &Node) -> Option<String> {
        match &v.val {
            Val::Str(s) => Some(s.clone()),
            other => {
                self.wrong(line, key, "a string", other);
                None
            }
        }
    }
    fn boolean(&mut self, line: Option<usize>, key: &str, v: &Node) -> Option<bool> {
        match &v.val {
            Val::Bool(b) => Some(*b),
            other => {
                self.wrong(line, key, "a boolean", other);
                None
            }
        }
    }
    fn int<T: TryFrom<i64>>(&mut self, line: Option<usize>, key: &str, v: &Node) -> Option<T> {
        match &v.val {
            Val::Int(i) => match T::try_from(*i) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(line, format!("`{key}` is out of range: {i}"));
                    None
                }
            },
            other => {
                self.wrong(line, key, "an integer", other);
                None
            }
        }
    }
    fn strings(&mut self, line: Option<usize>, key: &str, v: &Node) -> Option<Vec<String>> {
        match &v.val {
            Val::Array(items) => {
                let mut out = Vec::new();
                for it in items {
                    match &it.val {
                        Val::Str(s) => out.push(s.clone()),
                        other => {
                            self.wrong(line, key, "an array of strings", other);
                            return None;
                        }
                    }
                }
                Some(out)
            }
            other => {
                self.wrong(line, key, "an array of strings", other);
                None
            }
        }
    }
    fn string_map(
        &mut self,
        line: Option<usize>,
        key: &str,
        v: &Node,
    ) -> Option<BTreeMap<String, String>> {
        match &v.val {
            Val::Table(entries) => {
                let mut out = BTreeMap::new();
                for (k, it) in entries {
                    let l = self.line(k, it).or(line);
                    let s = self.string(l, &format!("{key}.{}", k.name), it)?;
                    out.insert(k.name.clone(), s);
                }
                Some(out)
            }
            other => {
                self.wrong(line, key, "a table of strings", other);
                None
            }
        }
    }
    /// A duration: humantime text ("10s", "1h 30m") or an integer number of seconds.
    fn duration(&mut self, line: Option<usize>, key: &str, v: &Node) -> Option<Duration> {
        match &v.val {
            Val::Str(s) => match humantime::parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.err(line, format!("`{key}`: bad duration `{s}`: {e}"));
                    None
                }
            },
            Val::Int(i) => match u64::try_from(*i) {
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => {
                    self.err(line, format!("`{key}`: a duration cannot be negative"));
                    None
                }
            },
            other => {
                self.wrong(line, key, "a duration such as \"10s\"", other);
                None
            }
        }
    }
    fn date(&mut self, line: Option<usize>, key: &str, v: &Node, tz: Tz) -> Option<DateTime<Utc>> {
        let text = match &v.val {
            Val::Str(s) | Val::Datetime(s) => s.as_str(),
            other => {
                self.wrong(line, key, "a date or RFC 3339 datetime", other);
                return None;
            }
        };
        let parsed = parse_date(text, tz);
        if parsed.is_none() {
            self.err(
                line,
                format!("`{key}`: bad date `{text}` (expected YYYY-MM-DD or RFC 3339)"),
            );
        }
        parsed
    }
}

/// RFC 3339 as given; a date or a local datetime is on the wall clock of `tz`.
fn parse_date(text: &str, tz: Tz) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let naive = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    local_to_utc(tz, naive)
}

/// A wall-clock time in `tz`; the earlier instant when ambiguous, and the end of the gap when
/// the time does not exist (a DST spring-forward).
fn local_to_utc(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    let mut t = naive;
    // Gaps are at most a few hours; step by 15 minutes (the finest offset granularity in use).
    for _ in 0..16 {
        if let Some(dt) = tz.from_local_datetime(&t).earliest() {
            return Some(dt.with_timezone(&Utc));
        }
        t = t.checked_add_signed(chrono::TimeDelta::minutes(15))?;
    }
    None
}

const DAG_KEYS: &[&str] = &[
    "dag_id",
    "description",
    "schedule",
    "timezone",
    "start_date",
    "end_date",
    "catchup",
    "max_active_runs",
    "max_active_tasks",
    "tags",
    "owner",
    "sla",
    "defaults",
    "tasks",
];

/// Keys every task type shares; for plugins, everything else is `args`.
const COMMON_TASK_KEYS: &[&str] = &[
    "type",
    "depends_on",
    "pool",
    "priority_weight",
    "timeout",
    "retries",
    "retry_delay",
    "backoff",
    "max_retry_delay",
    "jitter",
    "outlets",
];

/// `[defaults]`: what each task inherits.
#[derive(Debug, Clone)]
struct Defaults {
    retry: RetryPolicy,
    timeout: Option<Duration>,
    pool: String,
}

fn retry_key(
    cx: &mut FileCx<'_>,
    retry: &mut RetryPolicy,
    key: &str,
    line: Option<usize>,
    v: &Node,
) -> bool {
    match key {
        "retries" => {
            if let Some(n) = cx.int::<u32>(line, key, v) {
                retry.retries = n;
            }
        }
        "retry_delay" => {
            if let Some(d) = cx.duration(line, key, v) {
                retry.delay = d;
            }
        }
        "max_retry_delay" => {
            if let Some(d) = cx.duration(line, key, v) {
                retry.max_delay = d;
            }
        }
        "jitter" => {
            if let Some(b) = cx.boolean(line, key, v) {
                retry.jitter = b;
            }
        }
        "backoff" => match cx.string(line, key, v).as_deref() {
            Some("fixed") => retry.backoff = Backoff::Fixed,
            Some("exponential") => retry.backoff = Backoff::Exponential,
            Some(other) => cx.err(
                line,
                format!("`backoff` must be \"fixed\" or \"exponential\", found `{other}`"),
            ),
            None => {}
        },
        _ => return false,
    }
    true
}

fn parse_defaults(cx: &mut FileCx<'_>, line: Option<usize>, v: &Node) -> Defaults {
    let mut d = Defaults {
        retry: RetryPolicy::default(),
        timeout: None,
        pool: "default".into(),
    };
    let Val::Table(entries) = &v.val else {
        cx.wrong(line, "defaults", "a table", &v.val);
        return d;
    };
    for (k, n) in entries {
        let l = cx.line(k, n).or(line);
        let key = k.name.as_str();
        if retry_key(cx, &mut d.retry, key, l, n) {
            continue;
        }
        match key {
            "timeout" => d.timeout = cx.duration(l, key, n),
            "pool" => {
                if let Some(p) = cx.string(l, key, n) {
                    d.pool = p;
                }
            }
            _ => cx.err(l, format!("unknown key `{key}` in [defaults]")),
        }
    }
    d
}

/// One `[tasks.<id>]` table. Always returns a task (a placeholder kind if it is broken) so the
/// graph checks still see the id and don't report its downstreams as depending on nothing.
fn parse_task(
    cx: &mut FileCx<'_>,
    id: &str,
    line: Option<usize>,
    v: &Node,
    defaults: &Defaults,
    plugin_types: &[&str],
    key_lines: &mut HashMap<String, usize>,
) -> Task {
    let mut task = Task::new(
        id,
        TaskKind::Plugin {
            type_name: String::new(),
            args: serde_json::Value::Null,
        },
    );
    task.pool = defaults.pool.clone();
    task.retry = defaults.retry.clone();
    task.timeout = defaults.timeout;

    let Val::Table(entries) = &v.val else {
        cx.wrong(line, &format!("tasks.{id}"), "a table", &v.val);
        return task;
    };
    let mut by_key: BTreeMap<&str, (Option<usize>, &Node)> = BTreeMap::new();
    for (k, n) in entries {
        let l = cx.line(k, n).or(line);
        if let Some(l) = l {
            key_lines.insert(k.name.clone(), l);
        }
        by_key.insert(k.name.as_str(), (l, n));
    }

    let type_name = match by_key.get("type") {
        Some((l, n)) => cx.string(*l, "type", n),
        None => {
            cx.err(line, format!("task `{id}` has no `type`"));
            None
        }
    };

    let mut sensor_timeout = None;
    for (key, (l, n)) in &by_key {
        let key = *key;
        let l = *l;
        if retry_key(cx, &mut task.retry, key, l, n) {
            continue;
        }
        match key {
            "depends_on" => {
                if let Some(ds) = cx.strings(l, key, n) {
                    task.depends_on = ds;
                }
            }
            "pool" => {
                if let Some(p) = cx.string(l, key, n) {
                    task.pool = p;
                }
            }
            "priority_weight" => {
                if let Some(w) = cx.int::<i32>(l, key, n) {
                    task.priority_weight = w;
                }
            }
            "outlets" => {
                if let Some(names) = cx.strings(l, key, n) {
                    for bad in names.iter().filter(|d| !valid_dataset_name(d)) {
                        cx.err(
                            l,
                            format!(
                                "task `{id}`: outlet `{bad}` is not a dataset name (1 to 250 of letters, digits and _.-:)"
                            ),
                        );
                    }
                    task.outlets = names;
                }
            }
            // For sensors `timeout` is how long to wait for the event, not an execution limit.
            "timeout" if type_name.as_deref() == Some("sensor") => {
                sensor_timeout = cx.duration(l, key, n);
            }
            "timeout" => task.timeout = cx.duration(l, key, n),
            _ => {}
        }
    }

    let Some(type_name) = type_name else {
        return task;
    };
    // Type-specific keys: (key, line, node) minus the common ones.
    let specific: Vec<(&str, Option<usize>, &Node)> = by_key
        .iter()
        .filter(|(k, _)| !COMMON_TASK_KEYS.contains(k))
        .map(|(k, (l, n))| (*k, *l, *n))
        .collect();
    let type_line = by_key.get("type").and_then(|(l, _)| *l).or(line);

    let unknown = |cx: &mut FileCx<'_>, allowed: &[&str]| {
        for (k, l, _) in &specific {
            if !allowed.contains(k) {
                cx.err(
                    *l,
                    format!("unknown key `{k}` for a {type_name} task `{id}`"),
                );
            }
        }
    };
    let get = |k: &str| {
        specific
            .iter()
            .find(|(n, _, _)| *n == k)
            .map(|(_, l, n)| (*l, *n))
    };

    match type_name.as_str() {
        "shell" => {
            unknown(cx, &["command", "env", "cwd", "skip_on_exit_code"]);
            let command = match get("command") {
                Some((l, n)) => cx.string(l, "command", n),
                None => {
                    cx.err(line, format!("shell task `{id}` has no `command`"));
                    None
                }
            };
            let env = get("env")
                .and_then(|(l, n)| cx.string_map(l, "env", n))
                .unwrap_or_default();
            let cwd = get("cwd").and_then(|(l, n)| cx.string(l, "cwd", n));
            let skip_on_exit_code = match get("skip_on_exit_code") {
                Some((l, n)) => exit_codes(cx, l, id, n),
                None => DEFAULT_SKIP_EXIT_CODES.to_vec(),
            };
            if let Some(command) = command {
                task.kind = TaskKind::Shell {
                    command,
                    env,
                    cwd,
                    skip_on_exit_code,
                };
            }
        }
        "http" => {
            unknown(cx, &["method", "url", "headers", "body"]);
            let method = get("method")
                .and_then(|(l, n)| cx.string(l, "method", n))
                .map_or_else(|| "GET".to_string(), |m| m.to_ascii_uppercase());
            if !method.bytes().all(|b| b.is_ascii_alphabetic()) || method.is_empty() {
                let l = get("method").and_then(|(l, _)| l);
                cx.err(l, format!("task `{id}`: bad http method `{method}`"));
            }
            let url = match get("url") {
                Some((l, n)) => cx.string(l, "url", n),
                None => {
                    cx.err(line, format!("http task `{id}` has no `url`"));
                    None
                }
            };
            let headers = get("headers")
                .and_then(|(l, n)| cx.string_map(l, "headers", n))
                .unwrap_or_default();
            let body = get("body").and_then(|(l, n)| cx.string(l, "body", n));
            if let Some(url) = url {
                task.kind = TaskKind::Http {
                    method,
                    url,
                    headers,
                    body,
                };
            }
        }
        "sensor" => {
            unknown(
                cx,
                &["subject", "file", "dataset", "poke_interval", "soft_fail"],
            );
            let soft_fail = get("soft_fail")
                .and_then(|(l, n)| cx.boolean(l, "soft_fail", n))
                .unwrap_or(false);
            let mut targets = Vec::new();
            for key in ["subject", "file", "dataset"] {
                if let Some((l, n)) = get(key)
                    && let Some(s) = cx.string(l, key, n)
                {
                    targets.push(match key {
                        "subject" => SensorTarget::Subject(s),
                        "file" => SensorTarget::File(s),
                        _ => SensorTarget::Dataset(s),
                    });
                }
            }
            let poke_interval = get("poke_interval")
                .and_then(|(l, n)| cx.duration(l, "poke_interval", n))
                .unwrap_or(DEFAULT_POKE_INTERVAL);
            if poke_interval.is_zero() {
                let l = get("poke_interval").and_then(|(l, _)| l);
                cx.err(
                    l,
                    format!("task `{id}`: poke_interval must be greater than zero"),
                );
            }
            let present = ["subject", "file", "dataset"]
                .iter()
                .filter(|k| get(k).is_some())
                .count();
            if present != 1 {
                cx.err(
                    type_line,
                    format!(
                        "sensor task `{id}` needs exactly one of `subject`, `file`, `dataset` (found {present})"
                    ),
                );
            } else if let Some(target) = targets.pop() {
                task.kind = TaskKind::Sensor {
                    target,
                    poke_interval,
                    timeout: sensor_timeout,
                    soft_fail,
                };
                // The sensor's own timeout replaces the execution timeout (see above).
                task.timeout = None;
            }
        }
        other if plugin_types.contains(&other) => {
            let args: BTreeMap<&str, serde_json::Value> =
                specific.iter().map(|(k, _, n)| (*k, to_json(n))).collect();
            task.kind = TaskKind::Plugin {
                type_name: other.to_string(),
                args: serde_json::Value::Object(
                    args.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                ),
            };
        }
        other => {
            let mut known = vec!["shell", "http", "sensor"];
            known.extend(plugin_types);
            cx.err(
                type_line,
                format!(
                    "task `{id}`: unknown task type `{other}` (known: {})",
                    known.join(", ")
                ),
            );
        }
    }
    task
}

/// Parse and check one TOML DAG file's text. `plugin_types` are task types accepted besides
/// shell/http/sensor (their args = the task table minus the common keys). Returns every
/// problem found.
pub fn parse_dag(text: &str, file: &Path, plugin_types: &[&str]) -> Result<Dag, Vec<DagError>> {
    let mut cx = FileCx {
        file,
        line_starts: std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        errors: Vec::new(),
    };
    let root = match toml::from_str::<Node>(text) {
        Ok(n) => n,
        Err(e) => {
            let line = e.span().map(|s| cx.line_of(s.start));
            cx.err(line, e.message().trim().to_string());
            return Err(cx.errors);
        }
    };
    let Val::Table(entries) = root.val else {
        cx.err(Some(1), "a DAG file must be a TOML table");
        return Err(cx.errors);
    };

    let mut locs = Locs {
        top: Some(1),
        ..Locs::default()
    };
    let mut by_key: HashMap<&str, (Option<usize>, &Node)> = HashMap::new();
    for (k, n) in &entries {
        let l = cx.line(k, n);
        if !DAG_KEYS.contains(&k.name.as_str()) {
            cx.err(l, format!("unknown key `{}`", k.name));
            continue;
        }
        if let Some(l) = l {
            locs.dag_keys.insert(k.name.clone(), l);
        }
        by_key.insert(k.name.as_str(), (l, n));
    }

    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dag_id = by_key
        .get("dag_id")
        .and_then(|(l, n)| cx.string(*l, "dag_id", n))
        .unwrap_or(stem);
    let opt_string = |cx: &mut FileCx<'_>, k: &str| {
        by_key
            .get(k)
            .and_then(|(l, n)| cx.string(*l, k, n))
            .unwrap_or_default()
    };
    let description = opt_string(&mut cx, "description");
    let owner = opt_string(&mut cx, "owner");

    let timezone = match by_key.get("timezone") {
        Some((l, n)) => match cx.string(*l, "timezone", n) {
            Some(name) => match name.parse::<Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    cx.err(*l, format!("unknown timezone `{name}`"));
                    Tz::UTC
                }
            },
            None => Tz::UTC,
        },
        None => Tz::UTC,
    };
    let schedule = match by_key.get("schedule") {
        Some((l, n)) => match cx.string(*l, "schedule", n) {
            Some(text) => match Schedule::parse(&text) {
                Ok(s) => s,
                Err(e) => {
                    cx.err(*l, format!("`schedule`: {e}"));
                    Schedule::None
                }
            },
            None => Schedule::None,
        },
        None => Schedule::None,
    };
    let start_date = match by_key.get("start_date") {
        Some((l, n)) => cx.date(*l, "start_date", n, timezone),
        None => {
            cx.err(Some(1), "`start_date` is required");
            None
        }
    };
    let end_date = by_key
        .get("end_date")
        .and_then(|(l, n)| cx.date(*l, "end_date", n, timezone));
    let catchup = by_key
        .get("catchup")
        .and_then(|(l, n)| cx.boolean(*l, "catchup", n))
        .unwrap_or(false);
    let max_active_runs = by_key
        .get("max_active_runs")
        .and_then(|(l, n)| cx.int::<u32>(*l, "max_active_runs", n))
        .unwrap_or(16);
    let max_active_tasks = by_key
        .get("max_active_tasks")
        .and_then(|(l, n)| cx.int::<u32>(*l, "max_active_tasks", n))
        .unwrap_or(16);
    let tags = by_key
        .get("tags")
        .and_then(|(l, n)| cx.strings(*l, "tags", n))
        .unwrap_or_default();
    let sla = by_key
        .get("sla")
        .and_then(|(l, n)| cx.duration(*l, "sla", n));
    let defaults = match by_key.get("defaults") {
        Some((l, n)) => parse_defaults(&mut cx, *l, n),
        None => parse_defaults(&mut cx, None, &bare(Val::Table(Vec::new()))),
    };

    let mut tasks = Vec::new();
    if let Some((l, n)) = by_key.get("tasks") {
        match &n.val {
            Val::Table(ts) => {
                for (k, tn) in ts {
                    let tl = cx.line(k, tn).or(*l);
                    let mut key_lines = HashMap::new();
                    let task = parse_task(
                        &mut cx,
                        &k.name,
                        tl,
                        tn,
                        &defaults,
                        plugin_types,
                        &mut key_lines,
                    );
                    locs.tasks
                        .insert(k.name.clone(), (tl.unwrap_or(1), key_lines));
                    tasks.push(task);
                }
            }
            other => cx.wrong(*l, "tasks", "a table of tasks", other),
        }
    }

    let dag = Dag {
        dag_id,
        description,
        file: Some(file.to_path_buf()),
        schedule,
        timezone,
        start_date: start_date.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        end_date,
        catchup,
        max_active_runs,
        max_active_tasks,
        tags,
        owner,
        sla,
        tasks,
    };
    finalize(dag, &locs, cx.errors).map_err(|mut errors| {
        // File order reads best; the sort is stable, so one line's errors keep their order.
        errors.sort_by_key(|e| e.line.unwrap_or(0));
        errors
    })
}

/// Load every `*.toml` file of `dir` (not recursive, sorted by name): the good DAGs and the
/// errors of the bad files. A second file with an already-seen dag_id is an error naming both.
pub fn load_dir(dir: &Path, plugin_types: &[&str]) -> (Vec<Dag>, Vec<DagError>) {
    let mut dags: Vec<Dag> = Vec::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(DagError {
                file: Some(dir.to_path_buf()),
                line: None,
                message: format!("cannot read the DAG folder: {e}"),
            });
            return (dags, errors);
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();

    let mut owners: HashMap<String, PathBuf> = HashMap::new();
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(DagError {
                    file: Some(path.clone()),
                    line: None,
                    message: format!("cannot read the file: {e}"),
                });
                continue;
            }
        };
        match parse_dag(&text, &path, plugin_types) {
            Ok(dag) => {
                if let Some(first) = owners.get(&dag.dag_id) {
                    errors.push(DagError {
                        file: Some(path.clone()),
                        line: key_line(&text, "dag_id"),
                        message: format!(
                            "dag_id `{}` is already defined in {}",
                            dag.dag_id,
                            first.display()
                        ),
                    });
                } else {
                    owners.insert(dag.dag_id.clone(), path.clone());
                    dags.push(dag);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    (dags, errors)
}

/// The line of a top-level `key = ...` (the file already parsed, so a text scan suffices).
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "start_date = \"2026-11-01\"\n";

    fn parse(text: &str) -> Result<Dag, Vec<DagError>> {
        parse_dag(text, Path::new("dags/t.toml"), &["sql"])
    }

    /// Parse text expected to be bad; return (line, message) of each error.
    fn errs(text: &str) -> Vec<(Option<usize>, String)> {
        match parse(text) {
            Ok(d) => panic!("expected errors, got DAG {}", d.dag_id),
            Err(es) => es.into_iter().map(|e| (e.line, e.message)).collect(),
        }
    }

    /// Exactly one error, on `line`, whose message contains `needle`.
    fn one_err(text: &str, line: usize, needle: &str) {
        let es = errs(text);
        assert_eq!(es.len(), 1, "{es:?}");
        assert_eq!(es[0].0, Some(line), "{es:?}");
        assert!(es[0].1.contains(needle), "{:?} lacks {needle:?}", es[0].1);
    }

    fn example(name: &str) -> String {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples/dags")
            .join(name);
        std::fs::read_to_string(p).expect("example file")
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test date")
            .with_timezone(&Utc)
    }

    #[test]
    fn docs_example_parses() {
        let dag = parse_dag(
            &example("daily_sales.toml"),
            Path::new("daily_sales.toml"),
            &[],
        )
        .expect("parses");
        assert_eq!(dag.dag_id, "daily_sales");
        assert_eq!(dag.timezone, chrono_tz::Asia::Seoul);
        // A date-only start_date is midnight in the DAG's timezone.
        assert_eq!(dag.start_date, utc("2026-10-31T15:00:00Z"));
        assert_eq!(dag.end_date, Some(utc("2026-12-30T15:00:00Z")));
        assert_eq!(dag.max_active_runs, 4);
        assert_eq!(dag.sla, Some(Duration::from_secs(7200)));
        assert_eq!(dag.schedule.describe(), "0 2 * * *");
        let ids: Vec<&str> = dag.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["extract", "clean", "notify", "wait_upload"]);
        let clean = dag.task("clean").expect("clean");
        assert_eq!(clean.retry.retries, 3);
        assert_eq!(clean.retry.backoff, Backoff::Exponential);
        assert_eq!(clean.retry.max_delay, Duration::from_secs(600));
        assert_eq!(clean.priority_weight, 10);
        assert_eq!(clean.timeout, Some(Duration::from_secs(3600)));
        let extract = dag.task("extract").expect("extract");
        assert_eq!(extract.retry.retries, 2);
        assert!(
            matches!(&extract.kind, TaskKind::Shell { env, cwd: None, .. } if env["RUN"] == "{{ run_id }}")
        );
        let notify = dag.task("notify").expect("notify");
        assert!(
            matches!(&notify.kind, TaskKind::Http { method, headers, body: Some(_), .. }
            if method == "POST" && headers["content-type"] == "application/json")
        );
        let wait = dag.task("wait_upload").expect("sensor");
        assert_eq!(
            wait.kind,
            TaskKind::Sensor {
                target: SensorTarget::Subject("uploads.sales.{{ ds_nodash }}".into()),
                poke_interval: Duration::from_secs(30),
                timeout: Some(Duration::from_secs(6 * 3600)),
                soft_fail: false,
            }
        );
        assert_eq!(wait.timeout, None);
        assert_eq!(dag.downstream("extract"), ["clean"]);
        // Serialises for the API with the schedule as text.
        let json = serde_json::to_value(&dag).expect("serialises");
        assert_eq!(json["schedule"], "0 2 * * *");
        assert_eq!(json["timezone"], "Asia/Seoul");
        assert_eq!(json["tasks"][0]["type"], "shell");
    }

    #[test]
    fn other_examples_parse() {
        let etl = parse(&example("etl_daily.toml")).expect("etl parses");
        assert_eq!(etl.dag_id, "t"); // the file stem when dag_id is absent
        assert_eq!(etl.tasks.len(), 3);
        assert!(etl.catchup);
        let s = parse(&example("wait_for_upload.toml")).expect("sensor parses");
        assert!(matches!(
            &s.tasks[0].kind,
            TaskKind::Sensor {
                target: SensorTarget::File(_),
                ..
            }
        ));
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let es = errs(&format!(
            "{HEAD}\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\n"
        ));
        assert_eq!(es.len(), 1);
        assert_eq!(es[0].0, Some(5));
    }

    #[test]
    fn duplicate_key_and_task() {
        let es = errs(&format!("{HEAD}start_date = \"2026-11-02\"\n"));
        assert_eq!(es[0].0, Some(2), "{es:?}");
        assert!(es[0].1.contains("duplicate key"), "{es:?}");
        let t = format!(
            "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n[tasks.a]\ntype = \"shell\"\ncommand = \"y\"\n"
        );
        let es = errs(&t);
        assert_eq!(es[0].0, Some(5), "{es:?}");
    }

    #[test]
    fn unknown_keys() {
        one_err(
            &format!("{HEAD}colour = 1\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n"),
            2,
            "unknown key `colour`",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\nurl = \"u\"\n"),
            5,
            "unknown key `url` for a shell task `a`",
        );
        one_err(
            &format!(
                "{HEAD}[defaults]\nretrys = 2\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n"
            ),
            3,
            "unknown key `retrys` in [defaults]",
        );
    }

    #[test]
    fn wrong_types() {
        one_err(
            &format!("{HEAD}catchup = \"yes\"\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n"),
            2,
            "`catchup` must be a boolean, found a string",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\nretries = -1\n"),
            5,
            "`retries` is out of range",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\ndepends_on = \"b\"\n"),
            5,
            "`depends_on` must be an array of strings",
        );
    }

    #[test]
    fn unknown_dependency_and_self() {
        one_err(
            &format!(
                "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\ndepends_on = [\"nope\"]\n"
            ),
            5,
            "task `a` depends on unknown task `nope`",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\ndepends_on = [\"a\"]\n"),
            5,
            "task `a` depends on itself",
        );
    }

    #[test]
    fn cycle_lists_path() {
        let t = format!(
            "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\ndepends_on = [\"b\"]\n\
             [tasks.b]\ntype = \"shell\"\ncommand = \"x\"\ndepends_on = [\"a\"]\n\
             [tasks.c]\ntype = \"shell\"\ncommand = \"x\"\n"
        );
        let es = errs(&t);
        assert_eq!(es.len(), 1, "{es:?}");
        assert_eq!(es[0].1, "dependency cycle: a -> b -> a");
        assert_eq!(es[0].0, Some(2));
    }

    #[test]
    fn bad_schedule_timezone_dates_durations() {
        let tail = "[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n";
        one_err(
            &format!("{HEAD}schedule = \"0 25 * * *\"\n{tail}"),
            2,
            "bad cron expression",
        );
        one_err(
            &format!("{HEAD}schedule = \"every soon\"\n{tail}"),
            2,
            "bad interval",
        );
        one_err(
            &format!("{HEAD}timezone = \"Mars/Olympus\"\n{tail}"),
            2,
            "unknown timezone `Mars/Olympus`",
        );
        one_err(
            &format!("start_date = \"yesterday\"\n{tail}"),
            1,
            "bad date `yesterday`",
        );
        one_err(
            &format!("{HEAD}sla = \"2 fortnights\"\n{tail}"),
            2,
            "`sla`: bad duration",
        );
        one_err(
            &format!("{HEAD}[defaults]\nretry_delay = \"10 parsecs\"\n{tail}"),
            3,
            "`retry_delay`: bad duration",
        );
        one_err(
            &format!("{HEAD}end_date = \"2026-10-01\"\n{tail}"),
            2,
            "end_date",
        );
        one_err(tail, 1, "`start_date` is required");
        // TOML's own (unquoted) dates work too.
        let d = parse(&format!(
            "start_date = 2026-11-01T00:00:00Z\nend_date = 2026-11-30\n{tail}"
        ))
        .expect("parses");
        assert_eq!(d.start_date, utc("2026-11-01T00:00:00Z"));
        assert_eq!(d.end_date, Some(utc("2026-11-30T00:00:00Z")));
    }

    #[test]
    fn template_errors_name_variable_field_and_line() {
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"echo {{{{ dss }}}}\"\n"),
            4,
            "task `a`, field `command`: unknown template variable `dss`",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"http\"\n\nurl = \"http://x/{{{{ ds \"\n"),
            5,
            "field `url`: template syntax error",
        );
        one_err(
            &format!(
                "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\nenv = {{ A = \"{{{{ nope }}}}\" }}\n"
            ),
            5,
            "field `env`: unknown template variable `nope`",
        );
    }

    #[test]
    fn task_type_and_shape_rules() {
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"spark\"\ncommand = \"x\"\n"),
            3,
            "unknown task type `spark`",
        );
        one_err(
            &format!("{HEAD}[tasks.s]\ntype = \"sensor\"\nsubject = \"a\"\nfile = \"b\"\n"),
            3,
            "exactly one of `subject`, `file`, `dataset` (found 2)",
        );
        one_err(
            &format!("{HEAD}[tasks.s]\ntype = \"sensor\"\n"),
            3,
            "(found 0)",
        );
        one_err(
            &format!("{HEAD}[tasks.h]\ntype = \"http\"\nurl = \" \"\n"),
            4,
            "http url is empty",
        );
        one_err(
            &format!("{HEAD}max_active_runs = 0\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n"),
            2,
            "max_active_runs must be at least 1",
        );
        one_err(
            &format!("{HEAD}max_active_tasks = 0\n[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\n"),
            2,
            "max_active_tasks must be at least 1",
        );
        one_err(
            &format!("{HEAD}[tasks.\"bad id!\"]\ntype = \"shell\"\ncommand = \"x\"\n"),
            2,
            "task id `bad id!` must match",
        );
    }

    #[test]
    fn reports_all_errors_of_a_file() {
        let t = format!(
            "{HEAD}timezone = \"Nowhere\"\nmax_active_runs = 0\n\
             [tasks.a]\ntype = \"shell\"\ncommand = \"{{{{ x }}}}\"\ndepends_on = [\"zz\"]\n\
             [tasks.b]\ntype = \"bogus\"\n"
        );
        let es = errs(&t);
        let lines: Vec<Option<usize>> = es.iter().map(|e| e.0).collect();
        assert_eq!(
            lines,
            [Some(2), Some(3), Some(6), Some(7), Some(9)],
            "{es:?}"
        );
    }

    #[test]
    fn plugin_args_are_the_rest_of_the_table() {
        let d = parse(&format!(
            "{HEAD}[tasks.q]\ntype = \"sql\"\nquery = \"select 1\"\nretries = 4\nparams = {{ b = 2, a = 1 }}\n"
        ))
        .expect("parses");
        let q = &d.tasks[0];
        assert_eq!(q.retry.retries, 4);
        assert_eq!(
            q.kind,
            TaskKind::Plugin {
                type_name: "sql".into(),
                args: serde_json::json!({"query": "select 1", "params": {"a": 1, "b": 2}}),
            }
        );
        assert_eq!(q.kind.type_name(), "sql");
    }

    fn chain_text(cmd: &str) -> String {
        format!(
            "{HEAD}schedule = \"@daily\"\n\
             [tasks.load]\ntype = \"shell\"\ncommand = \"load\"\ndepends_on = [\"clean\", \"aux\"]\n\
             [tasks.clean]\ntype = \"shell\"\ncommand = \"{cmd}\"\ndepends_on = [\"extract\"]\n\
             [tasks.extract]\ntype = \"shell\"\ncommand = \"extract\"\n\
             [tasks.aux]\ntype = \"shell\"\ncommand = \"aux\"\n"
        )
    }

    #[test]
    fn hash_is_stable_and_tracks_commands() {
        let a = parse(&chain_text("clean")).expect("parses");
        let b = parse(&chain_text("clean")).expect("parses");
        let c = parse(&chain_text("clean --strict")).expect("parses");
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
        assert_ne!(a.hash(), c.hash());
        // The file path does not take part.
        let elsewhere =
            parse_dag(&chain_text("clean"), Path::new("other/t.toml"), &[]).expect("parses");
        assert_eq!(a.hash(), elsewhere.hash());
        // Nor do description, tags and owner; scheduling settings do.
        let mut relabelled = a.clone();
        relabelled.description = "new words".into();
        relabelled.tags = vec!["x".into()];
        assert_eq!(a.hash(), relabelled.hash());
        let mut retimed = a.clone();
        retimed.max_active_runs = 1;
        assert_ne!(a.hash(), retimed.hash());
    }

    #[test]
    fn topological_order_and_graph_walks() {
        let d = parse(&chain_text("clean")).expect("parses");
        let ids: Vec<&str> = d.tasks.iter().map(|t| t.task_id.as_str()).collect();
        // Ready ties are broken by id: aux and extract first, then clean, then load.
        assert_eq!(ids, ["aux", "extract", "clean", "load"]);
        assert_eq!(d.downstream("extract"), ["clean"]);
        assert_eq!(d.descendants("extract"), ["extract", "clean", "load"]);
        assert_eq!(d.ancestors("load"), ["aux", "extract", "clean", "load"]);
        assert_eq!(d.ancestors("clean"), ["extract", "clean"]);
        assert!(d.descendants("nope").is_empty());
    }

    #[test]
    fn builder_runs_the_same_checks() {
        let dag = DagBuilder::new("built")
            .schedule(Schedule::parse("@hourly").expect("parses"))
            .task(Task::shell("b", "echo {{ ds }}").depends_on(["a"]))
            .task(Task::shell("a", "echo a"))
            .build()
            .expect("builds");
        assert_eq!(dag.tasks[0].task_id, "a");
        assert_eq!(dag.file, None);

        let err = DagBuilder::new("bad")
            .task(Task::shell("a", "echo {{ nope }}").depends_on(["b"]))
            .task(Task::shell("b", "x").depends_on(["a"]))
            .task(Task::shell("b", "y"))
            .build()
            .expect_err("must fail");
        assert!(
            err.message.contains("unknown template variable `nope`"),
            "{err}"
        );
        assert!(err.message.contains("duplicate task id `b`"), "{err}");
        assert!(err.message.contains("dependency cycle"), "{err}");
        assert_eq!(err.to_string().split(": ").next(), Some("<built-in>"));
    }

    /// P2: `skip_on_exit_code` (default 99, one code or a list, `[]` off), `soft_fail` and
    /// `outlets` parse; bad values name the task, the key and the line.
    #[test]
    fn skip_codes_soft_fail_and_outlets() {
        let d = parse(&format!(
            "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\noutlets = [\"sales.raw\"]\n\
             [tasks.b]\ntype = \"shell\"\ncommand = \"x\"\nskip_on_exit_code = [3, 4]\n\
             [tasks.c]\ntype = \"shell\"\ncommand = \"x\"\nskip_on_exit_code = []\n\
             [tasks.d]\ntype = \"shell\"\ncommand = \"x\"\nskip_on_exit_code = 7\n\
             [tasks.e]\ntype = \"sensor\"\nfile = \"/x\"\nsoft_fail = true\n"
        ))
        .expect("parses");
        let codes = |id: &str| match &d.task(id).expect("task").kind {
            TaskKind::Shell {
                skip_on_exit_code, ..
            } => skip_on_exit_code.clone(),
            other => panic!("not shell: {other:?}"),
        };
        assert_eq!(codes("a"), [99], "Airflow's default");
        assert_eq!(codes("b"), [3, 4]);
        assert!(codes("c").is_empty());
        assert_eq!(codes("d"), [7]);
        assert_eq!(d.task("a").expect("a").outlets, ["sales.raw"]);
        assert!(matches!(
            d.task("e").expect("e").kind,
            TaskKind::Sensor {
                soft_fail: true,
                ..
            }
        ));
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\nskip_on_exit_code = 0\n"),
            5,
            "task `a`: skip_on_exit_code 0 is not an exit code from 1 to 255",
        );
        one_err(
            &format!(
                "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\nskip_on_exit_code = [\"99\"]\n"
            ),
            5,
            "`skip_on_exit_code` must be an integer or an array of integers",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"sensor\"\nfile = \"/x\"\nsoft_fail = \"yes\"\n"),
            5,
            "`soft_fail` must be a boolean",
        );
        one_err(
            &format!(
                "{HEAD}[tasks.a]\ntype = \"shell\"\ncommand = \"x\"\noutlets = [\"bad name\"]\n"
            ),
            5,
            "task `a`: outlet `bad name` is not a dataset name",
        );
        one_err(
            &format!("{HEAD}[tasks.a]\ntype = \"http\"\nurl = \"http://x\"\nsoft_fail = true\n"),
            5,
            "unknown key `soft_fail` for a http task `a`",
        );
    }

    #[test]
    fn error_display() {
        let e = DagError {
            file: Some("dags/x.toml".into()),
            line: Some(7),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "dags/x.toml:7: boom");
    }

    #[test]
    fn retry_delays() {
        let fixed = RetryPolicy {
            retries: 5,
            delay: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        assert_eq!(fixed.delay_before(2), Duration::from_secs(10));
        assert_eq!(fixed.delay_before(9), Duration::from_secs(10));

        let exp = RetryPolicy {
            retries: 10,
            delay: Duration::from_secs(10),
            backoff: Backoff::Exponential,
            max_delay: Duration::from_secs(600),
            jitter: false,
        };
        let got: Vec<u64> = (2..=9).map(|n| exp.delay_before(n).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 320, 600, 600]);
        assert_eq!(exp.delay_before(1000), Duration::from_secs(600));
        assert_eq!(exp.delay_before(u32::MAX), Duration::from_secs(600));
        let huge = RetryPolicy {
            delay: Duration::MAX,
            max_delay: Duration::MAX,
            ..exp.clone()
        };
        assert_eq!(huge.delay_before(40), Duration::MAX);

        let jit = RetryPolicy {
            jitter: true,
            ..exp.clone()
        };
        for n in [2, 4, 1000] {
            let full = exp.delay_before(n);
            for _ in 0..200 {
                let d = jit.delay_before(n);
                assert!(
                    d >= full / 2 && d <= full,
                    "{d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
        let _ = jit.delay_before(u32::MAX);
        let _ = RetryPolicy {
            jitter: true,
            ..huge
        }
        .delay_before(1000);
    }

    #[test]
    fn templates_lists_fields() {
        let d = parse_dag(&example("daily_sales.toml"), Path::new("d.toml"), &[]).expect("parses");
        let fields: Vec<&str> = d
            .task("extract")
            .expect("extract")
            .kind
            .templates()
            .iter()
            .map(|(f, _)| *f)
            .collect();
        assert_eq!(fields, ["command", "env"]);
        let notify: Vec<&str> = d
            .task("notify")
            .expect("notify")
            .kind
            .templates()
            .iter()
            .map(|(f, _)| *f)
            .collect();
        assert_eq!(notify, ["url", "headers", "body"]);
    }
}
