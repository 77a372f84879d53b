//! The DAGs a process knows: the files of `dags_folder` (reloaded by the active scheduler) and
//! the DAGs and task types other modules register through [`PipelineHandle`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::dag::{Dag, DagError};
use crate::exec::{TaskType, TaskTypes};
use crate::schedule::Schedule;
use crate::store::{DagRecord, ImportError};

/// What the module offers other modules (the service `pipeline.handle`): register built-in
/// DAGs (built with [`crate::dag::DagBuilder`]) and task types. Registration may happen at any
/// time; the scheduler picks it up at its next reload.
pub struct PipelineHandle {
    registry: Arc<Registry>,
}

/// The service key other modules ask for.
pub const HANDLE: bulwark_kernel::services::ServiceKey<PipelineHandle> =
    bulwark_kernel::services::ServiceKey::new("pipeline", "handle");

impl PipelineHandle {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    /// Add (or replace, by id) a built-in DAG.
    pub fn register_dag(&self, dag: Dag) {
        let mut b = self
            .registry
            .builtin
            .write()
            .unwrap_or_else(|p| p.into_inner());
        b.retain(|d| d.dag_id != dag.dag_id);
        b.push(dag);
    }

    /// Add a task type (`type = "<name>"` in DAG files).
    pub fn register_task_type(&self, t: Arc<dyn TaskType>) {
        let mut types = self
            .registry
            .types
            .write()
            .unwrap_or_else(|p| p.into_inner());
        types.insert(t.name().to_owned(), t);
    }

    /// Names of the DAGs loaded now.
    pub fn dag_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.registry.current().keys().cloned().collect();
        ids.sort();
        ids
    }
}

pub struct Registry {
    folder: PathBuf,
    builtin: RwLock<Vec<Dag>>,
    types: RwLock<TaskTypes>,
    loaded: RwLock<Arc<HashMap<String, Arc<Dag>>>>,
}

impl Registry {
    pub fn new(folder: PathBuf) -> Self {
        Self {
            folder,
            builtin: RwLock::new(Vec::new()),
            types: RwLock::new(TaskTypes::new()),
            loaded: RwLock::new(Arc::new(HashMap::new())),
        }
    }

    pub fn folder(&self) -> &std::path::Path {
        &self.folder
    }

    pub fn task_types(&self) -> TaskTypes {
        self.types.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn type_names(&self) -> Vec<String> {
        self.types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The DAGs of the last load, by id.
    pub fn current(&self) -> Arc<HashMap<String, Arc<Dag>>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, dag_id: &str) -> Option<Arc<Dag>> {
        self.current().get(dag_id).cloned()
    }

    /// Load the folder again (a missing folder is no DAGs, not an error) and merge the
    /// built-in DAGs; a file that fails is reported and skipped, the others load (P9).
    pub fn reload(&self) -> Vec<DagError> {
        let names = self.type_names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (dags, mut errors) = if self.folder.is_dir() {
            crate::dag::load_dir(&self.folder, &refs)
        } else {
            (Vec::new(), Vec::new())
        };
        let (dags, arg_errors) = check_task_args(dags, &self.task_types());
        errors.extend(arg_errors);
        let mut map: HashMap<String, Arc<Dag>> = HashMap::new();
        for d in self
            .builtin
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            map.insert(d.dag_id.clone(), Arc::new(d.clone()));
        }
        for d in dags {
            if map.contains_key(&d.dag_id) {
                errors.push(DagError {
                    file: d.file.clone(),
                    line: Some(1),
                    message: format!("dag_id `{}` is a built-in DAG's", d.dag_id),
                });
                continue;
            }
            map.insert(d.dag_id.clone(), Arc::new(d));
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        errors
    }
}

/// Ask each plugin task's type to check its arguments in the context of its DAG (P9: a `sql`
/// task's syntax and tables). A DAG with a bad task is reported, naming file and the task's
/// line, and left out; the others load.
pub fn check_task_args(dags: Vec<Dag>, types: &TaskTypes) -> (Vec<Dag>, Vec<DagError>) {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for dag in dags {
        let mut bad = false;
        for task in &dag.tasks {
            let crate::dag::TaskKind::Plugin { type_name, args } = &task.kind else {
                continue;
            };
            let Some(t) = types.get(type_name) else {
                continue;
            };
            if let Err(message) = t.validate(args, &dag) {
                bad = true;
                errors.push(DagError {
                    file: dag.file.clone(),
                    line: dag
                        .file
                        .as_deref()
                        .and_then(|f| task_line(f, &task.task_id)),
                    message: format!("tasks.{}: {message}", task.task_id),
                });
            }
        }
        if !bad {
            ok.push(dag);
        }
    }
    (ok, errors)
}

/// The 1-based line of `[tasks.<id>]` in a DAG file.
fn task_line(file: &std::path::Path, task_id: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let heads = [
        format!("[tasks.{task_id}]"),
        format!("[tasks.\"{task_id}\"]"),
    ];
    text.lines()
        .position(|l| heads.iter().any(|h| l.trim_start().starts_with(h.as_str())))
        .map(|i| i + 1)
}

/// The schedule as stored text that [`Schedule::parse`] reads back.
pub fn schedule_text(s: &Schedule) -> String {
    match s {
        Schedule::None => "none".into(),
        Schedule::Cron { expr, .. } => expr.clone(),
        Schedule::Interval(d) => format!("every {}", humantime::format_duration(*d)),
        Schedule::Dataset(names) => format!("dataset:{}", names.join(",")),
    }
}

/// One task as the API and UI show it (the stored `definition`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub task_id: String,
    #[serde(rename = "type")]
    pub task_type: String,
    pub depends_on: Vec<String>,
    pub downstream: Vec<String>,
    pub pool: String,
    pub priority_weight: i32,
    pub retries: u32,
    pub timeout_seconds: Option<u64>,
}

pub fn task_views(dag: &Dag) -> Vec<TaskView> {
    dag.tasks
        .iter()
        .map(|t| TaskView {
            task_id: t.task_id.clone(),
            task_type: t.kind.type_name().to_owned(),
            depends_on: t.depends_on.clone(),
            downstream: dag
                .downstream(&t.task_id)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            pool: t.pool.clone(),
            priority_weight: t.priority_weight,
            retries: t.retry.retries,
            timeout_seconds: t.timeout.map(|d| d.as_secs()),
        })
        .collect()
}

pub fn record(dag: &Dag) -> DagRecord {
    let ms = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis();
    DagRecord {
        dag_id: dag.dag_id.clone(),
        file: dag.file.as_ref().map(|f| f.display().to_string()),
        hash: dag.hash(),
        schedule: schedule_text(&dag.schedule),
        timezone: dag.timezone.name().to_owned(),
        start_date_ms: ms(dag.start_date),
        end_date_ms: dag.end_date.map(ms),
        catchup: dag.catchup,
        description: dag.description.clone(),
        owner: dag.owner.clone(),
        tags: dag.tags.clone(),
        max_active_runs: i32::try_from(dag.max_active_runs).unwrap_or(i32::MAX),
        max_active_tasks: i32::try_from(dag.max_active_tasks).unwrap_or(i32::MAX),
        sla_ms: dag
            .sla
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        definition: serde_json::to_string(&task_views(dag)).unwrap_or_else(|_| "[]".into()),
    }
}

pub fn import_error(e: &DagError) -> ImportError {
    ImportError {
        file: e
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        line: e.line.and_then(|l| i32::try_from(l).ok()).unwrap_or(0),
        message: e.message.clone(),
    }
}
