//! `bulwark annotation ...`: import items from a file with a progress bar.

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
        .about("Annotation projects: import items")
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
