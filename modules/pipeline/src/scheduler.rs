//! The scheduler (P1, P5, P15): one active process at a time, by a lease in the database.
//!
//! A pass: reload DAG files when due → create the runs whose intervals ended → start queued
//! runs within `max_active_runs` (per DAG and per backfill) → settle sensors, zombies and lost
//! publishes → queue ready instances by priority within pool slots and `max_active_tasks` →
//! finish runs with nothing left. A finished task wakes the scheduler (in process by a
//! `Notify`, across processes by a broadcast on `pipeline.wake`), so a ready task is queued in
//! milliseconds, not at the next tick.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::dag::Dag;
use crate::exec::{self, Job, JobKind, Target};
use crate::schedule::{DataInterval, Schedule};
use crate::store::{self, NewRun, Outcome, StoreError, now_ms, run_type, state};
use crate::template::RunContext;
use crate::{PipelineShared, TASKS_SUBJECT, WAKE_SUBJECT, registry};

const LEASE: &str = "scheduler";

fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// The run id of a scheduled/backfill/dataset run: its type and logical date.
pub fn run_id_for(kind: &str, logical: DateTime<Utc>) -> String {
    format!("{kind}__{}", logical.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
}

/// The scheduler task: competes for the lease, and while it holds it runs passes.
pub async fn run(s: Arc<PipelineShared>, stop: CancellationToken) {
    let holder = s.instance.clone();
    let ttl = i64::try_from(s.cfg.scheduler_lease.as_millis()).unwrap_or(i64::MAX);
    let mut wake = match s.bus.subscribe(WAKE_SUBJECT).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(message = "Cannot subscribe to scheduler wake-ups; polling only.", error = %e);
            None
        }
    };
    let mut sched = Scheduler {
        s: s.clone(),
        last_reload: None,
        last_housekeeping: None,
        watch: SubjectWatch::default(),
        reported: Reported::default(),
    };
    metrics::gauge!("bulwark_pipeline_scheduler_active").set(0.0);
    let mut token: Option<i64> = None;
    let mut renewed = Instant::now();
    loop {
        if stop.is_cancelled() {
            break;
        }
        let now = now_ms();
        match token {
            None => match store::acquire_lease(&s.db, LEASE, &holder, ttl, now).await {
                Ok(Some(t)) => {
                    tracing::info!(message = "Holding the scheduler lease.", token = t);
                    token = Some(t);
                    renewed = Instant::now();
                    sched.last_reload = None;
                    metrics::gauge!("bulwark_pipeline_scheduler_active").set(1.0);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(message = "Cannot take the scheduler lease.", error = %e),
            },
            Some(t) if renewed.elapsed() >= s.cfg.scheduler_lease / 3 => {
                match store::renew_lease(&s.db, LEASE, &holder, t, ttl, now).await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => {
                        tracing::warn!(message = "Lost the scheduler lease; standing by.");
                        token = None;
                    }
                    Err(e) if renewed.elapsed() >= s.cfg.scheduler_lease / 2 => {
                        // Stop before the lease can lapse under us: a standby may take it.
                        tracing::warn!(message = "Cannot renew the scheduler lease; standing by.", error = %e);
                        token = None;
                    }
                    Err(e) => {
                        tracing::debug!(message = "Renewing the lease failed; retrying.", error = %e)
                    }
                }
                if token.is_none() {
                    metrics::gauge!("bulwark_pipeline_scheduler_active").set(0.0);
                    sched.watch.clear();
                    sched.reported.zero();
                }
            }
            Some(_) => {}
        }
        let mut more = false;
        if token.is_some() {
            let started = Instant::now();
            match sched.pass().await {
                Ok(m) => more = m,
                Err(e) => tracing::warn!(message = "Scheduler pass failed.", error = %e),
            }
            metrics::histogram!("bulwark_pipeline_scheduler_loop_seconds")
                .record(started.elapsed().as_secs_f64());
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("bulwark_pipeline_scheduler_heartbeat_timestamp_seconds")
                .set(now_ms() as f64 / 1000.0);
        }
        if more {
            tokio::task::yield_now().await;
            continue;
        }
        let nap = if token.is_some() {
            s.cfg.scheduler_interval
        } else {
            s.cfg.scheduler_lease / 4
        };
        let notified = s.wake.notified();
        tokio::select! {
            () = stop.cancelled() => break,
            () = notified => {}
            () = tokio::time::sleep(nap) => {}
            Some(_) = next_wake(&mut wake) => {}
        }
        // One pass answers every wake-up that arrived meanwhile.
        if let Some(w) = wake.as_mut() {
            while let Some(Some(_)) = futures::FutureExt::now_or_never(w.next()) {}
        }
    }
    if let Some(t) = token
        && let Err(e) = store::release_lease(&s.db, LEASE, &holder, t).await
    {
        tracing::warn!(message = "Cannot release the scheduler lease.", error = %e);
    }
    metrics::gauge!("bulwark_pipeline_scheduler_active").set(0.0);
    sched.reported.zero();
}

/// The labelled gauges only the active scheduler reports. A scheduler that loses the lease
/// zeroes them: a standby's last figures would otherwise stay on `/metrics` for ever, and a
/// dashboard's `max` over instances (or an alert on pool starvation or a late run) would read
/// the stale backlog of a process that no longer schedules anything.
#[derive(Default)]
struct Reported {
    pools: HashSet<String>,
    dags: HashSet<String>,
}

impl Reported {
    fn zero(&mut self) {
        metrics::gauge!("bulwark_pipeline_queued_tasks").set(0.0);
        metrics::gauge!("bulwark_pipeline_deferred_tasks").set(0.0);
        metrics::gauge!("bulwark_pipeline_dag_import_errors").set(0.0);
        for p in self.pools.drain() {
            for st in ["used", "open"] {
                metrics::gauge!("bulwark_pipeline_pool_slots", "pool" => p.clone(), "state" => st)
                    .set(0.0);
            }
            metrics::gauge!("bulwark_pipeline_pool_waiting", "pool" => p).set(0.0);
        }
        for d in self.dags.drain() {
            metrics::gauge!("bulwark_pipeline_runs_past_sla", "dag" => d).set(0.0);
        }
    }
}

async fn next_wake(
    w: &mut Option<futures::stream::BoxStream<'static, bulwark_kernel::bus::Message>>,
) -> Option<()> {
    match w {
        Some(w) => w.next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Subscriptions of sensors waiting on a bus subject (P15: the event, not a sleeping worker).
#[derive(Default)]
struct SubjectWatch {
    subs: HashMap<String, tokio::task::JoinHandle<()>>,
    fired: Arc<Mutex<HashSet<String>>>,
}

impl SubjectWatch {
    /// Subscribe to `subject` if not already; returns once the subscription is in place, so
    /// a message published after the sensor is deferred is seen.
    async fn ensure(&mut self, bus: &Arc<dyn bulwark_kernel::bus::Bus>, subject: &str) -> bool {
        if self.subs.contains_key(subject) {
            return true;
        }
        match bus.subscribe(subject).await {
            Ok(mut stream) => {
                let fired = self.fired.clone();
                let name = subject.to_owned();
                let h = tokio::spawn(async move {
                    while stream.next().await.is_some() {
                        fired
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(name.clone());
                    }
                });
                self.subs.insert(subject.to_owned(), h);
                true
            }
            Err(e) => {
                tracing::warn!(message = "Cannot subscribe for a sensor.", subject, error = %e);
                false
            }
        }
    }

    fn take_fired(&self) -> HashSet<String> {
        std::mem::take(&mut *self.fired.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Drop subscriptions no deferred sensor needs any more.
    fn keep_only(&mut self, needed: &HashSet<String>) {
        self.subs.retain(|s, h| {
            let keep = needed.contains(s);
            if !keep {
                h.abort();
            }
            keep
        });
    }

    fn clear(&mut self) {
        for (_, h) in self.subs.drain() {
            h.abort();
        }
    }
}

/// How often a pass also sweeps zombies and lost publishes and refreshes the gauges.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

struct Scheduler {
    s: Arc<PipelineShared>,
    last_reload: Option<Instant>,
    last_housekeeping: Option<Instant>,
    watch: SubjectWatch,
    reported: Reported,
}

type PassResult<T> = Result<T, StoreError>;

impl Scheduler {
    /// One pass; true when it stopped at a limit and there is more to do at once.
    async fn pass(&mut self) -> PassResult<bool> {
        if self
            .last_reload
            .is_none_or(|t| t.elapsed() >= self.s.cfg.reload_interval)
        {
            self.reload().await?;
            self.last_reload = Some(Instant::now());
        }
        let dags = self.s.registry.current();
        let rows = store::dags(&self.s.db, None, 100_000, None).await?;
        for row in rows.iter().filter(|r| !r.is_paused) {
            if let Some(dag) = dags.get(&row.dag_id)
                && let Err(e) = self.create_due_runs(dag, row).await
            {
                tracing::warn!(message = "Cannot create runs.", dag = %dag.dag_id, error = %e);
            }
        }
        self.start_runs(&dags, &rows).await?;
        self.sensors().await?;
        // Housekeeping (zombies, lost publishes, gauges) once a second, not on every wake-up:
        // a busy scheduler passes hundreds of times a second and each of these is a scan.
        let housekeeping = self
            .last_housekeeping
            .is_none_or(|t| t.elapsed() >= HOUSEKEEPING);
        if housekeeping {
            self.sweep().await?;
        }
        let more = self.queue(&dags).await?;
        for f in store::finish_runs(&self.s.db, now_ms()).await? {
            metrics::counter!("bulwark_pipeline_runs_finished_total",
                "dag" => f.dag_id.clone(), "state" => f.state, "run_type" => f.run_type.clone())
            .increment(1);
        }
        if housekeeping {
            self.gauges().await?;
            self.last_housekeeping = Some(Instant::now());
        }
        Ok(more)
    }

    async fn reload(&mut self) -> PassResult<()> {
        let errors = self.s.registry.reload();
        let dags = self.s.registry.current();
        let mut records: Vec<store::DagRecord> =
            dags.values().map(|d| registry::record(d)).collect();
        records.sort_by(|a, b| a.dag_id.cmp(&b.dag_id));
        let errs: Vec<store::ImportError> = errors.iter().map(registry::import_error).collect();
        for e in &errors {
            tracing::warn!(message = "A DAG file did not load.", error = %e);
        }
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("bulwark_pipeline_dag_import_errors").set(errs.len() as f64);
        store::sync_dags(&self.s.db, &records, &errs, now_ms()).await?;
        for d in dags.values() {
            for t in &d.tasks {
                store::ensure_pool(&self.s.db, &t.pool, self.s.cfg.default_pool_slots).await?;
            }
        }
        store::ensure_pool(&self.s.db, "default", self.s.cfg.default_pool_slots).await?;
        Ok(())
    }

    /// Create the scheduled runs whose data interval has ended (catchup: every one since the
    /// last; without catchup only the latest), and dataset runs for new dataset events.
    async fn create_due_runs(&self, dag: &Dag, row: &crate::entity::dag::Model) -> PassResult<()> {
        let now = Utc::now();
        if let Schedule::Dataset(names) = &dag.schedule {
            let after = row.next_logical_ms.unwrap_or(0);
            let events = store::dataset_events_after(&self.s.db, names, after).await?;
            let Some(last) = events.last().map(|e| e.0) else {
                return Ok(());
            };
            let runs: Vec<NewRun> = events
                .iter()
                .map(|(id, _, at)| {
                    let t = utc(*at);
                    NewRun {
                        dag_id: dag.dag_id.clone(),
                        run_id: format!("dataset__{}__{id}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
                        logical_date_ms: *at,
                        interval_start_ms: *at,
                        interval_end_ms: *at,
                        run_type: run_type::DATASET,
                        conf: serde_json::json!({}),
                        backfill_id: None,
                    }
                })
                .collect();
            store::insert_runs(&self.s.db, &runs, now_ms()).await?;
            store::set_next_logical(&self.s.db, &dag.dag_id, last).await?;
            self.s.wake.notify_one();
            return Ok(());
        }
        let after = row.next_logical_ms.map(utc);
        let mut next = match dag
            .schedule
            .next_interval(dag.start_date, dag.timezone, after)
        {
            Some(iv) => iv,
            None => return Ok(()),
        };
        if !dag.catchup {
            // Skip to the latest ended interval when behind by more than one.
            if let Some(latest) = latest_ended(dag, now)
                && latest.start > next.start
            {
                next = latest;
            }
        }
        let mut runs = Vec::new();
        while next.end <= now && dag.end_date.is_none_or(|e| next.start <= e) && runs.len() < 500 {
            runs.push(NewRun {
                dag_id: dag.dag_id.clone(),
                run_id: run_id_for(run_type::SCHEDULED, next.start),
                logical_date_ms: next.start.timestamp_millis(),
                interval_start_ms: next.start.timestamp_millis(),
                interval_end_ms: next.end.timestamp_millis(),
                run_type: run_type::SCHEDULED,
                conf: serde_json::json!({}),
                backfill_id: None,
            });
            match dag
                .schedule
                .next_interval(dag.start_date, dag.timezone, Some(next.end))
            {
                Some(iv) if iv.start > next.start => next = iv,
                _ => break,
            }
        }
        if runs.is_empty() && row.next_logical_ms == Some(next.start.timestamp_millis()) {
            return Ok(());
        }
        store::insert_runs(&self.s.db, &runs, now_ms()).await?;
        store::set_next_logical(&self.s.db, &dag.dag_id, next.start.timestamp_millis()).await?;
        Ok(())
    }

    /// Start queued runs oldest first, within the DAG's and the backfill's `max_active_runs`.
    async fn start_runs(
        &self,
        dags: &HashMap<String, Arc<Dag>>,
        rows: &[crate::entity::dag::Model],
    ) -> PassResult<()> {
        let (mut by_dag, mut by_backfill) = store::running_counts(&self.s.db).await?;
        let mut limits = store::backfill_limits(&self.s.db).await?;
        for row in rows.iter().filter(|r| !r.is_paused) {
            let Some(dag) = dags.get(&row.dag_id) else {
                continue;
            };
            let max = i64::from(dag.max_active_runs);
            let running = by_dag.get(&dag.dag_id).copied().unwrap_or(0);
            if running >= max {
                continue;
            }
            // Look further than the free slots: some queued runs belong to a backfill at its
            // own limit and are passed over.
            let want = u64::try_from(max - running).unwrap_or(0);
            let queued = store::queued_runs(&self.s.db, &dag.dag_id, want * 4 + 16).await?;
            if queued.is_empty() {
                continue;
            }
            let plan = plan_of(dag);
            let hash = dag.hash();
            let mut started = 0i64;
            for r in queued {
                if running + started >= max {
                    break;
                }
                if let Some(b) = r.backfill_id {
                    // A backfill created after `limits` was read (or one already done whose
                    // run was cleared) is looked up, never run without its limit.
                    let limit = match limits.get(&b) {
                        Some(l) => *l,
                        None => {
                            let l = i64::from(
                                store::backfill_by_id(&self.s.db, b).await?.max_active_runs,
                            );
                            limits.insert(b, l);
                            l
                        }
                    };
                    let active = by_backfill.get(&b).copied().unwrap_or(0);
                    if active >= limit {
                        continue;
                    }
                }
                if store::start_run(&self.s.db, &r, &hash, &plan, now_ms()).await? {
                    started += 1;
                    if let Some(b) = r.backfill_id {
                        *by_backfill.entry(b).or_default() += 1;
                    }
                }
            }
            *by_dag.entry(dag.dag_id.clone()).or_default() += started;
        }
        Ok(())
    }

    /// Settle deferred sensors: fired subjects, datasets updated since the sensor began, files
    /// that appeared; time out the ones past their timeout.
    async fn sensors(&mut self) -> PassResult<()> {
        let waiting = store::deferred(&self.s.db).await?;
        let fired = self.watch.take_fired();
        let now = now_ms();
        let mut needed = HashSet::new();
        for t in waiting {
            let Some(job) = t
                .rendered
                .as_deref()
                .and_then(|r| serde_json::from_str::<Job>(r).ok())
            else {
                continue;
            };
            let JobKind::Sensor {
                target,
                poke_interval_ms,
                timeout_ms,
                soft_fail,
            } = &job.kind
            else {
                continue;
            };
            let since = t.start_ms.unwrap_or(now);
            let done = match target {
                Target::Subject(s) => {
                    needed.insert(s.clone());
                    if !self.watch.subs.contains_key(s) {
                        // A scheduler that took over re-subscribes for sensors it inherited.
                        self.watch.ensure(&self.s.bus, s).await;
                    }
                    fired.contains(s)
                }
                Target::Dataset(d) => store::dataset_updated_since(&self.s.db, d, since).await?,
                Target::File(path) => {
                    if t.next_attempt_at_ms.is_some_and(|at| at > now) {
                        false
                    } else if std::path::Path::new(path).exists() {
                        true
                    } else {
                        let poke = i64::try_from(*poke_interval_ms).unwrap_or(i64::MAX);
                        store::repoke(&self.s.db, t.id, t.try_number, now.saturating_add(poke))
                            .await?;
                        false
                    }
                }
            };
            let outcome = if done {
                Some(Outcome::Success {
                    datasets: Vec::new(),
                })
            } else if timeout_ms
                .and_then(|ms| i64::try_from(ms).ok())
                .is_some_and(|ms| now - since > ms)
            {
                Some(if *soft_fail {
                    Outcome::Skipped {
                        reason: "the sensor timed out (soft_fail)".into(),
                    }
                } else {
                    Outcome::Failed {
                        error: "the sensor timed out".into(),
                        retry_delay: job.retry.delay_before(job.try_number + 1),
                    }
                })
            } else {
                None
            };
            if let Some(o) = outcome
                && let Some(f) =
                    store::finish_try(&self.s.db, t.id, t.try_number, &o, None, None, now).await?
            {
                finished_metrics(&f);
            }
        }
        self.watch.keep_only(&needed);
        Ok(())
    }

    /// Zombies (running, no heartbeat) fail their try; queued tries nobody started are
    /// published again.
    async fn sweep(&self) -> PassResult<()> {
        let now = now_ms();
        let timeout = i64::try_from(self.s.cfg.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
        for (id, try_number) in store::zombies(&self.s.db, now - timeout).await? {
            let t = store::task_instance(&self.s.db, id).await?;
            let delay = t
                .rendered
                .as_deref()
                .and_then(|r| serde_json::from_str::<Job>(r).ok())
                .map(|j| j.retry.delay_before(j.try_number + 1))
                .unwrap_or_default();
            let outcome = Outcome::Failed {
                error: format!(
                    "zombie: worker {} stopped heartbeating",
                    t.worker.as_deref().unwrap_or("?")
                ),
                retry_delay: delay,
            };
            if let Some(f) =
                store::finish_try(&self.s.db, id, try_number, &outcome, None, None, now).await?
            {
                metrics::counter!("bulwark_pipeline_zombies_total").increment(1);
                tracing::warn!(
                    message = "A task's worker stopped heartbeating.",
                    task_instance = id,
                    try_number,
                    state = f.state
                );
                finished_metrics(&f);
            }
        }
        for (id, try_number) in store::stale_queued(&self.s.db, now - timeout).await? {
            if publish(&self.s, id, try_number, now).await.is_ok() {
                store::requeued(&self.s.db, id, try_number, now).await?;
            }
        }
        Ok(())
    }

    /// Queue ready instances: highest priority first, while their pool has open slots and their
    /// DAG is under `max_active_tasks`. Sensors are deferred instead (no slot). True when the
    /// pass stopped at `max_queue_per_pass`.
    async fn queue(&mut self, dags: &HashMap<String, Arc<Dag>>) -> PassResult<bool> {
        let now = now_ms();
        let limit = self.s.cfg.max_queue_per_pass;
        let ready = store::ready(&self.s.db, now, limit).await?;
        if ready.is_empty() {
            return Ok(false);
        }
        let (mut pool_used, mut dag_used) = store::slot_usage(&self.s.db).await?;
        let pools: HashMap<String, i64> = store::pools(&self.s.db)
            .await?
            .into_iter()
            .map(|p| (p.name, i64::from(p.slots)))
            .collect();
        let mut runs: HashMap<i64, crate::entity::run::Model> = HashMap::new();
        let mut to_publish = Vec::new();
        let parallelism = i64::try_from(self.s.cfg.effective_parallelism()).unwrap_or(i64::MAX);
        let mut in_flight: i64 = pool_used.values().sum();
        let full = ready.len() >= limit;
        for t in ready {
            let Some(dag) = dags.get(&t.dag_id) else {
                continue;
            };
            let Some(task) = dag.task(&t.task_id) else {
                // The task left the DAG after this run started: nothing to run.
                tracing::warn!(message = "A ready task is no longer in its DAG.", dag = %t.dag_id, task = %t.task_id);
                continue;
            };
            let is_sensor = matches!(task.kind, crate::dag::TaskKind::Sensor { .. });
            if !is_sensor {
                let slots = pools.get(&t.pool).copied().unwrap_or(0);
                let used = pool_used.get(&t.pool).copied().unwrap_or(0);
                let dag_active = dag_used.get(&t.dag_id).copied().unwrap_or(0);
                if in_flight >= parallelism {
                    // Every worker slot is spoken for: the rest waits ready, not queued, so a
                    // queued try starts as soon as it arrives.
                    continue;
                }
                if used >= slots || dag_active >= i64::from(dag.max_active_tasks) {
                    continue;
                }
            }
            let run = match runs.get(&t.run_pk) {
                Some(r) => r.clone(),
                None => {
                    let r: crate::entity::run::Model =
                        crate::entity::run::Entity::find_by_id(t.run_pk)
                            .one(&self.s.db)
                            .await?
                            .ok_or_else(|| StoreError::NotFound(format!("run {}", t.run_pk)))?;
                    runs.insert(t.run_pk, r.clone());
                    r
                }
            };
            let try_number = t.try_number + 1;
            let ctx = RunContext {
                dag_id: dag.dag_id.clone(),
                task_id: task.task_id.clone(),
                run_id: run.run_id.clone(),
                logical_date: utc(run.logical_date_ms),
                interval: DataInterval {
                    start: utc(run.interval_start_ms),
                    end: utc(run.interval_end_ms),
                },
                try_number: u32::try_from(try_number).unwrap_or(1),
                tz: dag.timezone,
                conf: serde_json::from_str(&run.conf).unwrap_or(serde_json::Value::Null),
            };
            let job = match exec::render(task, &ctx) {
                Ok(j) => j,
                Err(e) => {
                    // A template that fails at run time (a conf value) fails the try like a
                    // task error would, so the state says why.
                    fail_unrenderable(&self.s, &t, try_number, &e.to_string(), now).await?;
                    continue;
                }
            };
            if is_sensor
                && let JobKind::Sensor {
                    target: Target::Subject(s),
                    ..
                } = &job.kind
            {
                self.watch.ensure(&self.s.bus, s).await;
            }
            let text = serde_json::to_string(&job).unwrap_or_default();
            let to = if is_sensor {
                state::DEFERRED
            } else {
                state::QUEUED
            };
            // Each try's own clock reading: `queued_at` says when it was queued, so its spread
            // is the scheduler's queueing rate.
            let at = now_ms();
            if store::take_ready(&self.s.db, t.id, try_number, to, &text, at).await? {
                if let Some(ready_at) = t.ready_at_ms.or(t.next_attempt_at_ms) {
                    #[allow(clippy::cast_precision_loss)]
                    metrics::histogram!("bulwark_pipeline_ready_to_queued_seconds")
                        .record((at - ready_at).max(0) as f64 / 1000.0);
                }
                if t.state == state::UP_FOR_RETRY {
                    metrics::counter!("bulwark_pipeline_task_retries_total", "dag" => t.dag_id.clone())
                        .increment(1);
                }
                if !is_sensor {
                    *pool_used.entry(t.pool.clone()).or_default() += 1;
                    *dag_used.entry(t.dag_id.clone()).or_default() += 1;
                    in_flight += 1;
                    to_publish.push((t.id, try_number));
                }
            }
        }
        // Published concurrently: each publish waits for the bus's acknowledgement.
        let s = self.s.clone();
        futures::stream::iter(to_publish)
            .for_each_concurrent(64, |(id, try_number)| {
                let s = s.clone();
                async move {
                    if let Err(e) = publish(&s, id, try_number, now).await {
                        // The sweep publishes it again once it has waited long enough.
                        tracing::warn!(message = "Cannot publish a queued task.", task_instance = id, error = %e);
                    }
                }
            })
            .await;
        Ok(full)
    }

    async fn gauges(&mut self) -> PassResult<()> {
        let (by_state, waiting) = store::backlog(&self.s.db).await?;
        let (used, _) = store::slot_usage(&self.s.db).await?;
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!("bulwark_pipeline_queued_tasks")
                .set(by_state.get(state::QUEUED).copied().unwrap_or(0) as f64);
            metrics::gauge!("bulwark_pipeline_deferred_tasks")
                .set(by_state.get(state::DEFERRED).copied().unwrap_or(0) as f64);
            for p in store::pools(&self.s.db).await? {
                self.reported.pools.insert(p.name.clone());
                let u = used.get(&p.name).copied().unwrap_or(0);
                metrics::gauge!("bulwark_pipeline_pool_slots", "pool" => p.name.clone(), "state" => "used")
                    .set(u as f64);
                metrics::gauge!("bulwark_pipeline_pool_slots", "pool" => p.name.clone(), "state" => "open")
                    .set((i64::from(p.slots) - u).max(0) as f64);
                metrics::gauge!("bulwark_pipeline_pool_waiting", "pool" => p.name.clone())
                    .set(waiting.get(&p.name).copied().unwrap_or(0) as f64);
            }
            // Every loaded DAG has the series (0 when nothing is late), so the alert sees 0,
            // not "no data".
            let late = store::runs_past_sla(&self.s.db, now_ms()).await?;
            for dag in self.s.registry.current().keys() {
                self.reported.dags.insert(dag.clone());
                metrics::gauge!("bulwark_pipeline_runs_past_sla", "dag" => dag.clone())
                    .set(late.get(dag).copied().unwrap_or(0) as f64);
            }
        }
        Ok(())
    }
}

use sea_orm::EntityTrait;

/// The latest interval of `dag` that ended by `now` (for DAGs without catchup).
fn latest_ended(dag: &Dag, now: DateTime<Utc>) -> Option<DataInterval> {
    // Look back far enough to find one interval, then walk forward to the last that ended.
    for back in [1i64, 7, 32, 400] {
        let from = (now - chrono::Duration::days(back)).max(dag.start_date);
        let mut iv = dag
            .schedule
            .next_interval(dag.start_date, dag.timezone, Some(from))?;
        if iv.end > now {
            if from == dag.start_date {
                return None;
            }
            continue;
        }
        for _ in 0..10_000 {
            match dag
                .schedule
                .next_interval(dag.start_date, dag.timezone, Some(iv.end))
            {
                Some(n) if n.end <= now && n.start > iv.start => iv = n,
                _ => break,
            }
        }
        return Some(iv);
    }
    None
}

/// A run's task instances, from the DAG as loaded now.
pub fn plan_of(dag: &Dag) -> Vec<store::TaskPlan> {
    dag.tasks
        .iter()
        .map(|t| store::TaskPlan {
            task_id: t.task_id.clone(),
            task_type: t.kind.type_name().to_owned(),
            upstream: t.depends_on.clone(),
            downstream: dag
                .downstream(&t.task_id)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            pool: t.pool.clone(),
            priority_weight: t.priority_weight,
            max_tries: i32::try_from(t.retry.retries.saturating_add(1)).unwrap_or(i32::MAX),
        })
        .collect()
}

/// The work-queue message of one try.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct TaskMessage {
    pub ti_id: i64,
    pub try_number: i32,
}

pub async fn publish(
    s: &PipelineShared,
    id: i64,
    try_number: i32,
    _now: i64,
) -> Result<(), bulwark_kernel::bus::BusError> {
    let payload = serde_json::to_vec(&TaskMessage {
        ti_id: id,
        try_number,
    })
    .unwrap_or_default();
    s.bus
        .publish(
            TASKS_SUBJECT,
            Some(&format!("pipeline-ti-{id}-{try_number}")),
            bulwark_kernel::bus::Headers::new(),
            Bytes::from(payload),
        )
        .await
        .map(|_| ())
}

/// A try whose arguments cannot be rendered fails without running (with the reason).
async fn fail_unrenderable(
    s: &PipelineShared,
    t: &crate::entity::task_instance::Model,
    try_number: i32,
    message: &str,
    now: i64,
) -> PassResult<()> {
    // Queue it (so the guarded transitions apply), then fail it at once.
    if store::take_ready(&s.db, t.id, try_number, state::QUEUED, "{}", now).await?
        && store::start_try(&s.db, t.id, try_number, "scheduler", now)
            .await?
            .is_some()
    {
        let o = Outcome::Failed {
            error: message.to_owned(),
            retry_delay: Duration::ZERO,
        };
        if let Some(f) = store::finish_try(&s.db, t.id, try_number, &o, None, None, now).await? {
            finished_metrics(&f);
        }
    }
    Ok(())
}

pub fn finished_metrics(f: &store::Finished) {
    metrics::counter!("bulwark_pipeline_tasks_finished_total", "dag" => f.dag_id.clone(), "state" => f.state)
        .increment(1);
    #[allow(clippy::cast_precision_loss)]
    metrics::histogram!("bulwark_pipeline_task_duration_seconds", "dag" => f.dag_id.clone(), "state" => f.state)
        .record(f.duration_ms as f64 / 1000.0);
    if f.upstream_failed > 0 {
        metrics::counter!("bulwark_pipeline_tasks_finished_total", "dag" => f.dag_id.clone(), "state" => state::UPSTREAM_FAILED)
            .increment(f.upstream_failed);
    }
    if f.skipped > 0 {
        metrics::counter!("bulwark_pipeline_tasks_finished_total", "dag" => f.dag_id.clone(), "state" => state::SKIPPED)
            .increment(f.skipped);
    }
}
