//! `bulwark reporting backfill`: reload a table's rows for a date range from a streaming replica
//! (R5), with a progress bar; see [`crate::backfill`].

use bulwark_kernel::config::Settings;
use bulwark_kernel::module::ModuleError;
use chrono::NaiveDate;
use clap::{Arg, ArgMatches, Command};

use crate::ReportingConfig;
use crate::backfill::{self, Chunk, Request};

pub fn command() -> Command {
    Command::new("reporting")
        .about("Reporting: backfill a captured table from a read replica")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("backfill")
                .about(
                    "Reload a captured table's rows in a date range from a streaming replica \
                     (refuses a primary), merge them under the LSN guard, recompute its reports \
                     for those days; resumable",
                )
                .arg(
                    Arg::new("table")
                        .long("table")
                        .value_name("SCHEMA.TABLE")
                        .required(true),
                )
                .arg(
                    Arg::new("from")
                        .long("from")
                        .value_name("YYYY-MM-DD")
                        .required(true),
                )
                .arg(
                    Arg::new("to")
                        .long("to")
                        .value_name("YYYY-MM-DD")
                        .required(true),
                )
                .arg(
                    Arg::new("chunk")
                        .long("chunk")
                        .value_parser(["day", "month"])
                        .default_value("day"),
                )
                .arg(
                    Arg::new("column")
                        .long("column")
                        .value_name("COLUMN")
                        .help("The time column (default: the table's `time_column`)"),
                )
                .arg(
                    Arg::new("replica-url")
                        .long("replica-url")
                        .value_name("URL")
                        .help("The replica to read (default: reporting.replica_url)"),
                ),
        )
}

fn err(m: impl Into<String>) -> ModuleError {
    ModuleError::Other(m.into())
}

fn date(a: &ArgMatches, name: &str) -> Result<NaiveDate, ModuleError> {
    let v = a
        .get_one::<String>(name)
        .ok_or_else(|| err(format!("--{name} is required")))?;
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| err(format!("--{name}: `{v}` is not a date as YYYY-MM-DD")))
}

pub async fn run(
    settings: &Settings,
    cfg: &ReportingConfig,
    args: &ArgMatches,
) -> Result<(), ModuleError> {
    let Some(("backfill", a)) = args.subcommand() else {
        return Err(err("unknown reporting command"));
    };
    let req = Request {
        table: a
            .get_one::<String>("table")
            .cloned()
            .ok_or_else(|| err("--table is required"))?,
        from: date(a, "from")?,
        to: date(a, "to")?,
        chunk: match a.get_one::<String>("chunk").map(String::as_str) {
            Some("month") => Chunk::Month,
            _ => Chunk::Day,
        },
        column: a.get_one::<String>("column").cloned(),
    };
    let url = a
        .get_one::<String>("replica-url")
        .cloned()
        .or_else(|| cfg.replica_url.as_ref().map(|u| u.expose().to_owned()))
        .ok_or_else(|| {
            err("--replica-url: no replica given (pass --replica-url or set reporting.replica_url)")
        })?;
    let replica = bulwark_kernel::db::connect_url(&url, &settings.kernel.database)
        .await
        .map_err(|e| err(format!("--replica-url: {e}")))?;
    let state = bulwark_kernel::db::connect(&settings.kernel.database)
        .await
        .map_err(|e| err(format!("database: {e}")))?;
    let pipeline = settings
        .module_section::<bulwark_pipeline::PipelineConfig>("pipeline")?
        .value;
    let engine = bulwark_pipeline::data::Engine::new(&pipeline.engine, &settings.kernel.data_dir);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} chunk {pos}/{len} [{bar:30}] ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let progress = {
        let bar = bar.clone();
        move |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let out = backfill::run(cfg, &replica, &state, &engine, &req, &progress)
        .await
        .map_err(|e| err(e.to_string()))?;
    bar.finish_and_clear();
    println!(
        "backfilled {}: {} rows in {} chunk(s), {} chunk(s) already done; reports recomputed: {}",
        req.table,
        out.rows,
        out.chunks,
        out.chunks_skipped,
        if out.reports_refreshed.is_empty() {
            "none".to_owned()
        } else {
            out.reports_refreshed.join(", ")
        }
    );
    Ok(())
}
