//! Quality checks on a `sql` task's result (P10): expectations with `mostly` and a severity,
//! compiled to SQL over the staged result so that every check of a task is one aggregate scan,
//! and a policy per check — `fail` (the task fails, downstream does not run), `quarantine` (bad
//! rows go to `<output>_quarantine` with the names of the expectations they failed, good rows go
//! on; below `mostly` the task fails too), `warn` (logged and counted, the task goes on).

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use datafusion::prelude::{DataFrame, SessionContext};
use serde::{Deserialize, Serialize};

use super::{EngineError, Result};
use crate::exec::Job;

/// The staged result's table name in the task's session.
pub const STAGED: &str = "__bulwark_staged";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    NotNull,
    Unique,
    InSet,
    Between,
    RowCountBetween,
    MatchesRegex,
    SchemaMatches,
    Freshness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    Fail,
    Quarantine,
    Warn,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fail => "fail",
            Policy::Quarantine => "quarantine",
            Policy::Warn => "warn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One `[[tasks.<id>.checks]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub expect: Expect,
    /// The column checked (all but `row_count_between` and `schema_matches`).
    #[serde(default)]
    pub column: Option<String>,
    /// The share of rows that must pass, 0–1 (row checks and `unique`).
    #[serde(default = "one")]
    pub mostly: f64,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub severity: Severity,
    /// `in_set`: the allowed values.
    #[serde(default)]
    pub values: Vec<serde_json::Value>,
    /// `between`, `row_count_between`: bounds, inclusive (either may be left out).
    #[serde(default)]
    pub min: Option<serde_json::Value>,
    #[serde(default)]
    pub max: Option<serde_json::Value>,
    /// `matches_regex`: the pattern.
    #[serde(default)]
    pub pattern: Option<String>,
    /// `schema_matches`: column name → Arrow type name (`Int64`, `Utf8`, `Float64`, ...).
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, String>,
    /// `freshness`: the newest value may be at most this old (`"1h"`, `"2days"`) ...
    #[serde(default)]
    pub max_age: Option<String>,
    /// ... before this time (templated; default: the run's logical date).
    #[serde(default)]
    pub reference: Option<String>,
}

fn one() -> f64 {
    1.0
}

impl Check {
    /// `not_null(user_id)`: the name quarantined rows and results carry.
    pub fn name(&self) -> String {
        let e = serde_json::to_value(self.expect)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        match &self.column {
            Some(c) => format!("{e}({c})"),
            None => e,
        }
    }

    fn is_row_check(&self) -> bool {
        matches!(
            self.expect,
            Expect::NotNull | Expect::InSet | Expect::Between | Expect::MatchesRegex
        )
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.mostly) {
            return Err("mostly: must be between 0 and 1".into());
        }
        let needs_column = !matches!(self.expect, Expect::RowCountBetween | Expect::SchemaMatches);
        if needs_column && self.column.as_deref().is_none_or(str::is_empty) {
            return Err(format!("column: `{}` needs a column", self.name()));
        }
        match self.expect {
            Expect::InSet if self.values.is_empty() => {
                return Err("values: `in_set` needs the allowed values".into());
            }
            Expect::Between | Expect::RowCountBetween
                if self.min.is_none() && self.max.is_none() =>
            {
                return Err("min/max: a `between` check needs at least one bound".into());
            }
            Expect::MatchesRegex => match &self.pattern {
                None => return Err("pattern: `matches_regex` needs a pattern".into()),
                Some(p) => {
                    regex::Regex::new(p).map_err(|e| format!("pattern: {e}"))?;
                }
            },
            Expect::SchemaMatches if self.columns.is_empty() => {
                return Err("columns: `schema_matches` needs the expected columns".into());
            }
            Expect::Freshness => match &self.max_age {
                None => return Err("max_age: `freshness` needs a max_age".into()),
                Some(a) => {
                    humantime::parse_duration(a).map_err(|e| format!("max_age: {e}"))?;
                }
            },
            _ => {}
        }
        if self.policy == Policy::Quarantine && !self.is_row_check() {
            return Err(format!(
                "policy: `{}` is not a per-row check, so it cannot quarantine rows (use fail or warn)",
                self.name()
            ));
        }
        Ok(())
    }

    /// The SQL of "this row passes" (row checks). Nulls pass all but `not_null`: checking for
    /// them is that expectation's job.
    fn row_pass(&self) -> Option<String> {
        let c = ident(self.column.as_deref().unwrap_or_default());
        Some(match self.expect {
            Expect::NotNull => format!("({c} IS NOT NULL)"),
            Expect::InSet => {
                let vals: Vec<String> = self.values.iter().map(literal).collect();
                format!("coalesce({c} IN ({}), true)", vals.join(", "))
            }
            Expect::Between => {
                let mut parts = Vec::new();
                if let Some(m) = &self.min {
                    parts.push(format!("{c} >= {}", literal(m)));
                }
                if let Some(m) = &self.max {
                    parts.push(format!("{c} <= {}", literal(m)));
                }
                format!("coalesce({}, true)", parts.join(" AND "))
            }
            Expect::MatchesRegex => format!(
                "coalesce(regexp_like(CAST({c} AS VARCHAR), {}), true)",
                quote(self.pattern.as_deref().unwrap_or_default())
            ),
            _ => return None,
        })
    }
}

/// A double-quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A single-quoted SQL string.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::String(s) => quote(s),
        other => quote(&other.to_string()),
    }
}

/// One check's outcome, stored with the try and shown next to the task.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub expect: Expect,
    pub policy: Policy,
    pub severity: Severity,
    pub mostly: f64,
    pub passed: bool,
    /// Rows that failed it (row checks), duplicates (`unique`).
    pub bad_rows: u64,
    pub rows: u64,
    /// What was found, where a count does not say it: the row count, the newest value, the
    /// schema's mismatches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
}

impl CheckResult {
    pub fn summary(&self) -> String {
        format!(
            "check {} [{} {}]: {} ({} of {} rows bad{})",
            self.name,
            self.policy.as_str(),
            self.severity.as_str(),
            if self.passed { "pass" } else { "FAIL" },
            self.bad_rows,
            self.rows,
            self.observed
                .as_deref()
                .map(|o| format!("; observed {o}"))
                .unwrap_or_default()
        )
    }
}

/// The checks' results and what the task does with them.
pub struct Gate {
    pub results: Vec<CheckResult>,
    /// SQL: the row fails a quarantine check.
    pub quarantine_predicate: Option<String>,
    /// SQL: the comma-separated names of the quarantine checks a row fails.
    pub reasons_expr: String,
}

impl Gate {
    /// The reason the task must fail: a `fail` or `quarantine` check below its threshold.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter(|r| !r.passed && r.policy != Policy::Warn)
            .map(|r| format!("{} ({} of {} rows bad)", r.name, r.bad_rows, r.rows))
            .collect();
        (!failed.is_empty()).then(|| format!("quality gate failed: {}", failed.join(", ")))
    }
}

/// Run every check over the staged result ([`STAGED`]) in one aggregate query.
pub async fn evaluate(
    ctx: &SessionContext,
    checks: &[Check],
    job: &Job,
    rows: u64,
) -> Result<Gate> {
    let mut gate = Gate {
        results: Vec::new(),
        quarantine_predicate: None,
        reasons_expr: "''".into(),
    };
    if checks.is_empty() {
        return Ok(gate);
    }
    let staged = ctx.table(STAGED).await?;
    let schema = staged.schema().as_arrow().clone();
    for c in checks {
        if let Some(col) = &c.column
            && schema.field_with_name(col).is_err()
        {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(EngineError::Invalid(format!(
                "checks: {}: the query's result has no column `{col}` (it has: {})",
                c.name(),
                names.join(", ")
            )));
        }
    }
    let mut select = vec!["count(*) AS n".to_owned()];
    for (i, c) in checks.iter().enumerate() {
        let col = ident(c.column.as_deref().unwrap_or_default());
        if let Some(pass) = c.row_pass() {
            select.push(format!(
                "CAST(coalesce(sum(CASE WHEN {pass} THEN 0 ELSE 1 END), 0) AS BIGINT) AS c{i}"
            ));
        } else if c.expect == Expect::Unique {
            select.push(format!(
                "CAST(count({col}) - count(DISTINCT {col}) AS BIGINT) AS c{i}"
            ));
        } else if c.expect == Expect::Freshness {
            let age = humantime::parse_duration(c.max_age.as_deref().unwrap_or("0s"))
                .map_err(|e| EngineError::Invalid(format!("checks: max_age: {e}")))?;
            let reference = c
                .reference
                .clone()
                .unwrap_or_else(|| job.logical_date.clone());
            select.push(format!(
                "CAST(CASE WHEN CAST(max({col}) AS TIMESTAMP) >= to_timestamp({}) - \
                 INTERVAL '{} seconds' THEN 0 ELSE 1 END AS BIGINT) AS c{i}",
                quote(&reference),
                age.as_secs()
            ));
            select.push(format!("CAST(max({col}) AS VARCHAR) AS o{i}"));
        }
    }
    let df = ctx
        .sql(&format!("SELECT {} FROM {STAGED}", select.join(", ")))
        .await?;
    let batches = df.collect().await?;
    let batch = batches
        .first()
        .ok_or_else(|| EngineError::Query("the checks' aggregate returned nothing".into()))?;
    let int = |name: &str| -> u64 {
        batch
            .column_by_name(name)
            .and_then(|a| a.as_primitive_opt::<Int64Type>().map(|p| p.value(0)))
            .map_or(0, |v| u64::try_from(v).unwrap_or(0))
    };
    let text = |name: &str| -> Option<String> {
        let a = batch.column_by_name(name)?;
        let s = a.as_string_opt::<i32>()?;
        (!s.is_null(0)).then(|| s.value(0).to_owned())
    };
    let n = int("n");
    debug_assert!(n == rows, "the stage holds the rows the query returned");
    let mut quarantine = Vec::new();
    let mut reasons = Vec::new();
    for (i, c) in checks.iter().enumerate() {
        let (bad, passed, observed) = match c.expect {
            Expect::RowCountBetween => {
                let lo = c
                    .min
                    .as_ref()
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let hi = c
                    .max
                    .as_ref()
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(u64::MAX);
                (0, (lo..=hi).contains(&n), Some(n.to_string()))
            }
            Expect::SchemaMatches => {
                let mut wrong = Vec::new();
                for (name, ty) in &c.columns {
                    match schema.field_with_name(name) {
                        Err(_) => wrong.push(format!("{name}: missing")),
                        Ok(f) => {
                            let got = f.data_type().to_string();
                            if !got.eq_ignore_ascii_case(ty) {
                                wrong.push(format!("{name}: {got}, not {ty}"));
                            }
                        }
                    }
                }
                let ok = wrong.is_empty();
                (0, ok, (!ok).then(|| wrong.join("; ")))
            }
            Expect::Freshness => {
                let stale = int(&format!("c{i}"));
                (
                    0,
                    stale == 0 && n > 0,
                    Some(text(&format!("o{i}")).unwrap_or_else(|| "no rows".into())),
                )
            }
            _ => {
                let bad = int(&format!("c{i}"));
                #[allow(clippy::cast_precision_loss)]
                let ratio = if n == 0 {
                    1.0
                } else {
                    (n - bad.min(n)) as f64 / n as f64
                };
                (bad, ratio >= c.mostly, None)
            }
        };
        if c.policy == Policy::Quarantine
            && let Some(pass) = c.row_pass()
        {
            quarantine.push(format!("NOT {pass}"));
            reasons.push(format!(
                "CASE WHEN NOT {pass} THEN {} END",
                quote(&c.name())
            ));
        }
        gate.results.push(CheckResult {
            name: c.name(),
            expect: c.expect,
            policy: c.policy,
            severity: c.severity,
            mostly: c.mostly,
            passed,
            bad_rows: bad,
            rows: n,
            observed,
        });
    }
    if !quarantine.is_empty() {
        gate.quarantine_predicate = Some(quarantine.join(" OR "));
        gate.reasons_expr = format!("concat_ws(',', {})", reasons.join(", "));
    }
    Ok(gate)
}

/// The quarantined rows with the names of the checks they failed, the run and the logical date.
pub async fn quarantine_frame(
    ctx: &SessionContext,
    bad: &str,
    reasons: &str,
    job: &Job,
) -> Result<DataFrame> {
    Ok(ctx
        .sql(&format!(
            "SELECT *, {reasons} AS _failed_expectations, {} AS _run_id, {} AS _logical_date \
             FROM {STAGED} WHERE {bad}",
            quote(&job.run_id),
            quote(&job.logical_date)
        ))
        .await?)
}
