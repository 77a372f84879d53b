//! The worker (`--role worker`, or `all`): takes queued tries off the work queue and runs
//! them, at most `worker_slots` at once.
//!
//! A try starts only through the guarded `queued → running` update, so a redelivered message
//! (or one whose try was cleared or swept) is acknowledged and dropped. While it runs, the
//! worker heartbeats the instance and tells the bus the delivery is in progress; a worker
//! killed mid-task stops heartbeating, and the scheduler's sweep fails that try (retrying it
//! when tries are left), so no instance stays `running` for ever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::exec::{self, Job, LogSink};
use crate::scheduler::{TaskMessage, finished_metrics};
use crate::store::{self, Outcome, now_ms};
use crate::{CONSUMER, PipelineShared, STREAM, TASKS_SUBJECT};

pub fn consumer_spec() -> bulwark_kernel::bus::ConsumerSpec {
    bulwark_kernel::bus::ConsumerSpec {
        stream: STREAM.into(),
        durable: CONSUMER.into(),
        filter_subject: Some(TASKS_SUBJECT.into()),
        // Renewed by `in_progress` every heartbeat while a task runs.
        ack_wait: Duration::from_secs(60),
        max_deliver: 20,
        dead_letter_subject: None,
    }
}

pub async fn run(s: Arc<PipelineShared>, stop: CancellationToken) {
    let consumer = loop {
        match s.bus.consumer(&consumer_spec()).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(message = "Cannot bind the pipeline work queue; retrying.", error = %e);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let slots = Arc::new(Semaphore::new(s.cfg.worker_slots));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // Fetch only as many as there are free slots, so a busy worker leaves messages to others.
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = slots.clone().acquire_owned() => {}
            }
            continue;
        }
        let got = tokio::select! {
            () = stop.cancelled() => break,
            r = consumer.fetch(free.min(256), Duration::from_secs(1)) => r,
        };
        let deliveries = match got {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(message = "Fetching pipeline tasks failed.", error = %e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for d in deliveries {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let s = s.clone();
            let http = http.clone();
            tasks.spawn(async move {
                handle(&s, &http, d).await;
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    // Let running tries finish until the kernel's drain deadline ends the process; a try cut
    // off there is swept as a zombie and retried.
    while tasks.join_next().await.is_some() {}
}

async fn handle(s: &PipelineShared, http: &reqwest::Client, d: bulwark_kernel::bus::Delivery) {
    let msg: TaskMessage = match serde_json::from_slice(&d.payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(message = "Dropping a malformed pipeline task message.", error = %e);
            let _ = d.term().await;
            return;
        }
    };
    let now = now_ms();
    let t = match store::start_try(&s.db, msg.ti_id, msg.try_number, &s.instance, now).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            // Not queued any more: a duplicate, a clear, a sweep. Nothing to do.
            let _ = d.ack().await;
            return;
        }
        Err(e) => {
            tracing::warn!(message = "Cannot start a task; it will be redelivered.", error = %e);
            let _ = d.nak(Duration::from_secs(1)).await;
            return;
        }
    };
    if let Some(q) = t.queued_at_ms {
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!("bulwark_pipeline_task_start_latency_seconds", "pool" => t.pool.clone())
            .record((now - q).max(0) as f64 / 1000.0);
    }
    let job: Option<Job> = t
        .rendered
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok());
    let (sink, mut lines) = LogSink::new();
    let types = s.registry.task_types();
    let outcome = match &job {
        None => Err(exec::TaskFailure {
            message: "the task's rendered job is missing or unreadable".into(),
            exit_code: None,
            details: None,
        }),
        Some(job) => {
            let timeout = job.timeout_ms.map(Duration::from_millis);
            let work = exec::run(job, &types, http, &sink);
            tokio::pin!(work);
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let mut beat = tokio::time::interval(s.cfg.heartbeat_interval);
            beat.tick().await;
            let mut buf = String::new();
            let mut written = 0usize;
            let started = Instant::now();
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(l) = lines.recv() => {
                        buf.push_str(&l);
                        if buf.len() >= s.cfg.log_chunk_bytes {
                            flush(s, t.id, t.try_number, &mut buf, &mut written).await;
                        }
                    }
                    _ = beat.tick() => {
                        flush(s, t.id, t.try_number, &mut buf, &mut written).await;
                        let _ = d.in_progress().await;
                        match store::heartbeat(&s.db, t.id, t.try_number, now_ms()).await {
                            Ok(true) => {}
                            // Cleared or swept while running: stop; the result would be dropped.
                            Ok(false) => break Err(exec::TaskFailure {
                                message: "the try was cleared or taken over while running".into(),
                                exit_code: None,
                                details: None,
                            }),
                            Err(e) => tracing::debug!(message = "Heartbeat failed.", error = %e),
                        }
                    }
                    () = sleep_until(deadline) => {
                        break Err(exec::TaskFailure {
                            message: format!("timed out after {:.1}s", started.elapsed().as_secs_f64()),
                            exit_code: None,
                            details: None,
                        });
                    }
                }
            };
            while let Ok(l) = lines.try_recv() {
                buf.push_str(&l);
            }
            match &result {
                Err(e) => buf.push_str(&format!("[bulwark] {}\n", e.message)),
                Ok(exec::TaskOutput {
                    skipped: Some(why), ..
                }) => buf.push_str(&format!("[bulwark] skipped: {why}\n")),
                Ok(_) => {}
            }
            flush(s, t.id, t.try_number, &mut buf, &mut written).await;
            result
        }
    };
    let (o, exit_code, details) = match outcome {
        Ok(out) => match out.skipped {
            Some(reason) => (Outcome::Skipped { reason }, out.exit_code, out.details),
            None => {
                let mut datasets = job.as_ref().map(|j| j.outlets.clone()).unwrap_or_default();
                datasets.extend(out.datasets);
                datasets.sort();
                datasets.dedup();
                (Outcome::Success { datasets }, out.exit_code, out.details)
            }
        },
        Err(f) => {
            let delay = job
                .as_ref()
                .map(|j| j.retry.delay_before(j.try_number + 1))
                .unwrap_or_default();
            (
                Outcome::Failed {
                    error: f.message,
                    retry_delay: delay,
                },
                f.exit_code,
                f.details,
            )
        }
    };
    match store::finish_try(
        &s.db,
        t.id,
        t.try_number,
        &o,
        exit_code,
        details.as_ref(),
        now_ms(),
    )
    .await
    {
        Ok(Some(f)) => {
            finished_metrics(&f);
            // Downstreams may be ready, or the run finished: the scheduler looks now.
            s.wake_scheduler();
        }
        Ok(None) => {}
        Err(e) => {
            // Left `running`: the sweep fails it once the heartbeats stop.
            tracing::warn!(message = "Cannot record a finished task.", error = %e);
        }
    }
    let _ = d.ack().await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Write the buffered log lines as one chunk, within the per-try limit.
async fn flush(
    s: &PipelineShared,
    ti: i64,
    try_number: i32,
    buf: &mut String,
    written: &mut usize,
) {
    if buf.is_empty() {
        return;
    }
    let max = s.cfg.max_log_bytes_per_try;
    let mut chunk = std::mem::take(buf);
    if *written >= max {
        return;
    }
    if *written + chunk.len() > max {
        let mut cut = max - *written;
        while cut > 0 && !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        chunk.truncate(cut);
        chunk.push_str("\n[bulwark] log cut at max_log_bytes_per_try\n");
    }
    *written += chunk.len();
    if let Err(e) = store::append_log(&s.db, ti, try_number, &chunk, now_ms()).await {
        tracing::debug!(message = "Cannot store a log chunk.", error = %e);
    }
}
