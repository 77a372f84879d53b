//! `bulwark pipeline validate [DIR]`: check a DAG folder in CI. Printing and the exit code are
//! the CLI's job; this returns what it found.

use std::path::Path;

use serde::Serialize;

use crate::dag::{DagError, load_dir};
use crate::exec::TaskTypes;

/// The outcome of validating a folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// dag_ids of the DAGs that loaded.
    pub dags: Vec<String>,
    /// Every problem, each naming file and line.
    pub errors: Vec<DagError>,
}

impl Report {
    /// True when no file had a problem (the CLI exits 0).
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Load and check every `*.toml` of `dir`, with the task types of this build.
pub fn validate_dir(dir: &Path, types: &TaskTypes) -> Report {
    let names: Vec<&str> = types.keys().map(String::as_str).collect();
    let (dags, mut errors) = load_dir(dir, &names);
    let (dags, arg_errors) = crate::registry::check_task_args(dags, types);
    errors.extend(arg_errors);
    errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    Report {
        dags: dags.into_iter().map(|d| d.dag_id).collect(),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn examples() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/dags")
    }

    #[test]
    fn example_folder_is_valid() {
        let r = validate_dir(
            &examples(),
            &crate::data::task_types(&crate::data::Engine::for_tests()),
        );
        assert!(r.ok(), "{:?}", r.errors);
        assert_eq!(
            r.dags,
            [
                "daily_sales",
                "etl_daily",
                "events_daily",
                "wait_for_upload"
            ]
        );
    }

    #[test]
    fn bad_files_and_duplicate_ids() {
        let dir = std::env::temp_dir().join(format!("bulwark-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = "start_date = \"2026-11-01\"\n[tasks.a]\ntype = \"shell\"\ncommand = \"true\"\n";
        std::fs::write(dir.join("a.toml"), format!("dag_id = \"same\"\n{good}")).expect("write");
        std::fs::write(dir.join("b.toml"), format!("dag_id = \"same\"\n{good}")).expect("write");
        std::fs::write(dir.join("c.toml"), "dag_id = \n").expect("write");
        std::fs::write(dir.join("ignored.txt"), "not a dag").expect("write");
        let r = validate_dir(&dir, &TaskTypes::new());
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(r.dags, ["same"]);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        let dup = &r.errors[0];
        assert_eq!(dup.file.as_deref(), Some(dir.join("b.toml").as_path()));
        assert_eq!(dup.line, Some(1));
        assert!(dup.message.contains("already defined in") && dup.message.contains("a.toml"));
        assert_eq!(
            r.errors[1].file.as_deref(),
            Some(dir.join("c.toml").as_path())
        );
        assert_eq!(r.errors[1].line, Some(1));
        assert!(!r.ok());
    }

    #[test]
    fn missing_folder_is_one_error() {
        let r = validate_dir(Path::new("/nonexistent/bulwark/dags"), &TaskTypes::new());
        assert!(r.dags.is_empty());
        assert_eq!(r.errors.len(), 1);
    }
}
