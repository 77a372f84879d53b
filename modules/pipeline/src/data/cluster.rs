//! Apache Ballista nodes from this binary (P11): `bulwark pipeline ballista-scheduler` and
//! `bulwark pipeline ballista-executor` run Ballista's own scheduler and executor (the crates of
//! this workspace, so the cluster and the client always share one Ballista and one DataFusion
//! version). They speak Ballista's protocol and nothing of ours; `pipeline.engine.kind =
//! "ballista"` points `sql` tasks at the scheduler.
//!
//! Both use pull scheduling (executors poll the scheduler for tasks), which needs no connection
//! from the scheduler to the executors. The executors read the warehouse by path, so they must
//! see it at the same absolute path as the Bulwark processes (a shared volume in a cluster).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ballista_core::config::TaskSchedulingPolicy;

use super::{EngineError, Result};

fn cluster_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Query(format!("ballista: {e}"))
}

/// Run a Ballista scheduler on `listen` until the process is stopped.
pub async fn run_scheduler(listen: SocketAddr) -> Result<()> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let config = SchedulerConfig::default()
        .with_hostname(listen.ip().to_string())
        .with_port(listen.port())
        .with_scheduler_policy(TaskSchedulingPolicy::PullStaged);
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(cluster_err)?;
    ballista_scheduler::scheduler_process::start_server(cluster, listen, Arc::new(config))
        .await
        .map_err(cluster_err)
}

/// What an executor needs: its scheduler, its own Flight address, where it keeps shuffle files.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub scheduler: SocketAddr,
    pub listen: SocketAddr,
    pub work_dir: std::path::PathBuf,
    /// Task slots; 0: one per core.
    pub vcores: usize,
    /// This executor's memory pool in MiB (it spills beyond it); 0: Ballista's default share of
    /// the machine's memory.
    pub memory_limit_mb: u64,
}

/// Run a Ballista executor until SIGTERM or Ctrl-C (Ballista handles both itself).
pub async fn run_executor(o: &ExecutorOptions) -> Result<()> {
    use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
    // Ballista removes an unset work dir at once; ours is explicit and created here.
    std::fs::create_dir_all(&o.work_dir)?;
    let work_dir = std::path::absolute(Path::new(&o.work_dir))?;
    let cfg = ExecutorProcessConfig {
        bind_host: o.listen.ip().to_string(),
        external_host: Some(o.listen.ip().to_string()),
        port: o.listen.port(),
        scheduler_host: o.scheduler.ip().to_string(),
        scheduler_port: o.scheduler.port(),
        // Retry while the scheduler starts (a pod may come up first).
        scheduler_connect_timeout_seconds: 60,
        vcores: o.vcores,
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
        work_dir: Some(work_dir.display().to_string()),
        memory_pool_size: (o.memory_limit_mb > 0).then(|| o.memory_limit_mb * 1024 * 1024),
        ..Default::default()
    };
    start_executor_process(Arc::new(cfg))
        .await
        .map_err(cluster_err)
}
