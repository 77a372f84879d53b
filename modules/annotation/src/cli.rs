//! `bulwark annotation ...`: import items from a file, export a dataset version (to a file, or
//! into a git + DVC repository), each with a progress bar.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};

use bulwark_kernel::config::Settings;
use bulwark_kernel::module::ModuleError;
use clap::{Arg, ArgMatches, Command, value_parser};
use tokio::io::{AsyncRead, ReadBuf};

use crate::AnnotationConfig;
use crate::store::{self, StoreError, import};

pub fn command() -> Command {
    Command::new("annotation")
        .about("Annotation projects: import items, export datasets")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("import")
                .about("Import items from a JSON-lines or CSV file (idempotent on external_id)")
                .arg(
                    Arg::new("file")
                        .value_name("FILE")
                        .required(true)
                        .value_parser(value_parser!(PathBuf)),
                )
                .arg(
                    Arg::new("project")
                        .long("project")
                        .value_name("ID_OR_NAME")
                        .required(true)
                        .help("The project, by id or by name"),
                )
                .arg(
                    Arg::new("format")
                        .long("format")
                        .value_parser(["jsonl", "csv"])
                        .help("Default: from the file's extension (.csv is CSV, anything else JSON lines)"),
                ),
        )
        .subcommand(export_command())
}

fn export_command() -> Command {
    let flag = |name: &'static str, help: &'static str| {
        Arg::new(name)
            .long(name)
            .action(clap::ArgAction::SetTrue)
            .help(help)
    };
    Command::new("export")
        .about("Export a dataset version (N8, N9): the same bytes as the API's export of the same spec")
        .arg(
            Arg::new("spec")
                .long("spec")
                .value_name("FILE.json")
                .value_parser(value_parser!(PathBuf))
                .conflicts_with_all(["project", "format", "reviewed-only", "as-of", "exclude-annotator", "min-agreement", "consolidate"])
                .help("The dataset spec, as POST /api/annotation/exports takes it"),
        )
        .arg(
            Arg::new("project")
                .long("project")
                .value_name("ID_OR_NAME")
                .required_unless_present("spec")
                .help("Instead of --spec: the project, by id or by name"),
        )
        .arg(
            Arg::new("format")
                .long("format")
                .value_parser(["csv", "jsonl", "parquet"])
                .default_value("csv")
                .help("Instead of --spec: the file format"),
        )
        .arg(flag("reviewed-only", "Instead of --spec: only annotations whose latest review accepts them"))
        .arg(
            Arg::new("as-of")
                .long("as-of")
                .value_name("RFC3339")
                .help("Instead of --spec: the log as it was at this time (default: now)"),
        )
        .arg(
            Arg::new("exclude-annotator")
                .long("exclude-annotator")
                .value_name("NAME")
                .action(clap::ArgAction::Append)
                .help("Instead of --spec: leave this annotator out (repeatable)"),
        )
        .arg(
            Arg::new("min-agreement")
                .long("min-agreement")
                .value_name("SHARE")
                .value_parser(value_parser!(f64))
                .help("Instead of --spec: keep items whose consensus share is at least this"),
        )
        .arg(flag("consolidate", "Instead of --spec: one row per item by majority vote (default rule)"))
        .arg(
            Arg::new("out")
                .long("out")
                .value_name("PATH")
                .value_parser(value_parser!(PathBuf))
                .help("The data file (its manifest goes to PATH.manifest.json). Default: <project>.<ext>; with --dvc, a path inside REPO, default datasets/<project>/<project>.<ext>"),
        )
        .arg(
            Arg::new("dvc")
                .long("dvc")
                .value_name("REPO")
                .value_parser(value_parser!(PathBuf))
                .help("A git + DVC repository: write the file there, dvc add, dvc push, git commit"),
        )
}

fn err(m: impl Into<String>) -> ModuleError {
    ModuleError::Other(m.into())
}

fn store_err(e: StoreError) -> ModuleError {
    err(e.to_string())
}

/// Counts the bytes read through it, for the progress bar.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

/// Find a project by id or name.
pub async fn find_project(
    db: &sea_orm::DatabaseConnection,
    key: &str,
) -> Result<crate::entity::project::Model, ModuleError> {
    let found = match key.parse::<i64>() {
        Ok(id) => store::project(db, id).await,
        Err(_) => store::project_by_name(db, key).await,
    };
    found.map_err(|e| match e {
        StoreError::NotFound(m) => err(format!("--project: {m}")),
        other => store_err(other),
    })
}

pub async fn run(
    settings: &Settings,
    cfg: &AnnotationConfig,
    args: &ArgMatches,
) -> Result<(), ModuleError> {
    match args.subcommand() {
        Some(("import", a)) => import_file(settings, cfg, a).await,
        Some(("export", a)) => export_dataset(settings, cfg, a).await,
        _ => Err(err("unknown annotation command")),
    }
}

async fn import_file(
    settings: &Settings,
    cfg: &AnnotationConfig,
    a: &ArgMatches,
) -> Result<(), ModuleError> {
    let path = a
        .get_one::<PathBuf>("file")
        .ok_or_else(|| err("FILE is required"))?;
    let key = a
        .get_one::<String>("project")
        .ok_or_else(|| err("--project is required"))?;
    let format = match a.get_one::<String>("format").map(String::as_str) {
        Some("csv") => import::Format::Csv,
        Some(_) => import::Format::JsonLines,
        None if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
        {
            import::Format::Csv
        }
        None => import::Format::JsonLines,
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| err(format!("FILE {}: {e}", path.display())))?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let db = bulwark_kernel::db::connect(&settings.kernel.database)
        .await
        .map_err(|e| err(e.to_string()))?;
    let project = find_project(&db, key).await?;
    let read = Arc::new(AtomicU64::new(0));
    let reader = Counting {
        inner: file,
        read: read.clone(),
    };
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} [{bar:30}] {msg} ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let on_progress = {
        let bar = bar.clone();
        move |p: import::Progress| {
            bar.set_position(read.load(Ordering::Relaxed));
            bar.set_message(format!("{} lines, {} new", p.lines, p.imported));
        }
    };
    let report = import::import(
        &db,
        project.id,
        format,
        reader,
        cfg.max_import_line_bytes,
        &on_progress,
    )
    .await
    .map_err(store_err)?;
    bar.finish_and_clear();
    println!(
        "{} lines: {} imported, {} existing, {} refused (project {} {:?})",
        report.lines, report.imported, report.existing, report.failed, project.id, project.name
    );
    for e in &report.errors {
        eprintln!("line {}: {}", e.line, e.message);
    }
    if report.failed > report.errors.len() as u64 {
        eprintln!(
            "... and {} more refused lines",
            report.failed - report.errors.len() as u64
        );
    }
    if report.failed > 0 {
        return Err(err(format!("{} lines were refused", report.failed)));
    }
    Ok(())
}

/// Where `bulwark annotation export` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A file; `None`: `<project>.<ext>` in the working directory.
    File(Option<PathBuf>),
    /// A git + DVC repository, and the path inside it (`None`: the default).
    Dvc {
        repo: PathBuf,
        path: Option<PathBuf>,
    },
}

/// What `bulwark annotation export` did.
#[derive(Debug, Clone)]
pub struct Exported {
    pub manifest: crate::dataset::Manifest,
    pub data_path: PathBuf,
    pub manifest_path: PathBuf,
    /// With `--dvc`: the data commit and the manifest commit.
    pub commits: Option<(String, String)>,
}

/// A progress bar over rows.
struct Bar(indicatif::ProgressBar);

impl crate::dataset::Progress for Bar {
    async fn chunk_done(&mut self, rows: u64) -> Result<(), crate::dataset::DatasetError> {
        self.0.set_position(rows);
        Ok(())
    }
}

fn spec_from_flags(
    a: &ArgMatches,
    project_id: i64,
) -> Result<crate::dataset::DatasetSpec, ModuleError> {
    use crate::dataset::{DatasetSpec, Format};
    let format = a
        .get_one::<String>("format")
        .and_then(|f| Format::parse(f))
        .unwrap_or(Format::Csv);
    let as_of = match a.get_one::<String>("as-of") {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| {
                    err(format!(
                        "--as-of: {e} (want RFC 3339, e.g. 2026-12-01T12:00:00Z)"
                    ))
                })?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    Ok(DatasetSpec {
        project: project_id,
        reviewed_only: a.get_flag("reviewed-only"),
        as_of,
        exclude_annotators: a
            .get_many::<String>("exclude-annotator")
            .map(|v| v.cloned().collect())
            .unwrap_or_default(),
        min_agreement: a.get_one::<f64>("min-agreement").copied(),
        consolidation: a
            .get_flag("consolidate")
            .then(crate::agreement::ConsolidationRule::default),
        format,
    })
}

async fn export_dataset(
    settings: &Settings,
    cfg: &AnnotationConfig,
    a: &ArgMatches,
) -> Result<(), ModuleError> {
    let db = bulwark_kernel::db::connect(&settings.kernel.database)
        .await
        .map_err(|e| err(e.to_string()))?;
    let spec = match a.get_one::<PathBuf>("spec") {
        Some(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| err(format!("--spec {}: {e}", path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| err(format!("--spec {}: {e}", path.display())))?
        }
        None => {
            let key = a
                .get_one::<String>("project")
                .ok_or_else(|| err("--project or --spec is required"))?;
            let p = find_project(&db, key).await?;
            spec_from_flags(a, p.id)?
        }
    };
    let out = a.get_one::<PathBuf>("out").cloned();
    let dest = match a.get_one::<PathBuf>("dvc") {
        Some(repo) => Destination::Dvc {
            repo: repo.clone(),
            path: out,
        },
        None => Destination::File(out),
    };
    let done = export(&db, cfg, &spec, dest, true).await?;
    let m = &done.manifest;
    println!(
        "{}: {} rows, {} items, {} annotators, {} bytes, sha256 {}",
        done.data_path.display(),
        m.counts.rows,
        m.counts.items,
        m.counts.annotators,
        m.file.bytes,
        m.file.sha256
    );
    println!("manifest: {}", done.manifest_path.display());
    if let Some((data, manifest)) = &done.commits {
        println!("commit {data} (data), {manifest} (manifest)");
    }
    Ok(())
}

/// `bulwark annotation export` without the argument parsing: validate `spec`, pin its `as_of`,
/// write the file and its manifest to `dest`. `bar`: show a progress bar on stderr.
pub async fn export(
    db: &sea_orm::DatabaseConnection,
    cfg: &AnnotationConfig,
    spec: &crate::dataset::DatasetSpec,
    dest: Destination,
    bar: bool,
) -> Result<Exported, ModuleError> {
    use crate::dataset;
    spec.validate().map_err(|e| err(format!("spec: {e}")))?;
    let project = store::project(db, spec.project)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(m) => err(format!("project: {m}")),
            other => store_err(other),
        })?;
    let spec = spec.resolved(store::now_ms());
    let total = crate::export::estimate_rows(db, &spec)
        .await
        .map_err(|e| err(e.to_string()))?
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let pb = if bar {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} rows [{bar:30}] ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut progress = Bar(pb.clone());
    let result = match dest {
        Destination::File(path) => {
            let path = path.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "{}.{}",
                    dataset::safe_name(&project.name),
                    spec.format.ext()
                ))
            });
            let g = dataset::write_file(db, &project, &spec, &path, None, &mut progress)
                .await
                .map_err(|e| err(e.to_string()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let manifest = dataset::Manifest::new(spec.clone(), &project, name, &g);
            let mut mp = path.as_os_str().to_owned();
            mp.push(".manifest.json");
            let manifest_path = PathBuf::from(mp);
            let text = serde_json::to_vec_pretty(&manifest).map_err(|e| err(e.to_string()))?;
            tokio::fs::write(&manifest_path, text)
                .await
                .map_err(|e| err(format!("{}: {e}", manifest_path.display())))?;
            Exported {
                manifest,
                data_path: path,
                manifest_path,
                commits: None,
            }
        }
        Destination::Dvc { repo, path } => {
            let rel = path.unwrap_or_else(|| crate::dvc::default_path(&project, spec.format));
            let p = crate::dvc::publish(
                db,
                &project,
                &spec,
                &repo,
                &rel,
                &cfg.dvc_bin,
                &mut progress,
            )
            .await
            .map_err(|e| err(e.to_string()))?;
            let mut mp = p.data_path.as_os_str().to_owned();
            mp.push(".manifest.json");
            Exported {
                manifest: p.manifest,
                data_path: p.data_path,
                manifest_path: PathBuf::from(mp),
                commits: Some((p.data_commit, p.manifest_commit)),
            }
        }
    };
    pb.finish_and_clear();
    Ok(result)
}
