//! The report API (R4): `GET /api/reporting/reports` lists the declared reports,
//! `GET /api/reporting/reports/{name}?from=&to=` serves one from its summary, through the cache
//! module's running loader (single-flight, shared tier, tag invalidation after each refresh).
//! No request reads the warehouse: the summary table in Bulwark's database is the only source.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bulwark_cache::{Cache, CacheError};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiPath, ApiQuery};
use bulwark_kernel::problem::Problem;
use chrono::NaiveDate;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use crate::config::ReportConfig;

#[derive(Clone)]
pub struct ApiState {
    pub db: DatabaseConnection,
    pub reports: Arc<BTreeMap<String, ReportConfig>>,
    pub cache: Option<Arc<Cache>>,
    pub namespace: String,
    pub max_days: u32,
}

/// The day range of a report request, both ends included.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// First day, `YYYY-MM-DD` (UTC).
    #[param(value_type = String, format = Date, example = "2026-11-01")]
    pub from: String,
    /// Last day, `YYYY-MM-DD` (UTC), not before `from`, at most `reporting.max_report_days`
    /// after it (else 400 naming `to`).
    #[param(value_type = String, format = Date, example = "2026-11-30")]
    pub to: String,
}

fn field_problem(field: &str, detail: String) -> Problem {
    Problem::bad_request(detail).extension("field", json!(field))
}

fn parse_day(field: &str, v: &str) -> Result<NaiveDate, Problem> {
    NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
        field_problem(
            field,
            format!("`{field}` must be a date as YYYY-MM-DD, got `{v}`"),
        )
    })
}

async fn load(
    db: DatabaseConnection,
    name: String,
    from: String,
    to: String,
) -> Result<bytes::Bytes, String> {
    let b = db.get_database_backend();
    let rows = db
        .query_all(Statement::from_sql_and_values(
            b,
            "SELECT day, grp, metrics FROM reporting_summaries WHERE report = $1 AND day >= $2 \
             AND day <= $3 ORDER BY day, grp",
            vec![name.clone().into(), from.clone().into(), to.clone().into()],
        ))
        .await
        .map_err(|e| e.to_string())?;
    let refreshed = db
        .query_one(Statement::from_sql_and_values(
            b,
            "SELECT refreshed_at_ms FROM reporting_summary_state WHERE report = $1",
            vec![name.clone().into()],
        ))
        .await
        .map_err(|e| e.to_string())?
        .and_then(|r| r.try_get_by_index::<i64>(0).ok());
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let day: String = r.try_get_by_index(0).map_err(|e| e.to_string())?;
        let grp: String = r.try_get_by_index(1).map_err(|e| e.to_string())?;
        let metrics: String = r.try_get_by_index(2).map_err(|e| e.to_string())?;
        out.push(json!({
            "day": day,
            "group": serde_json::from_str::<Value>(&grp).unwrap_or(Value::Null),
            "metrics": serde_json::from_str::<Value>(&metrics).unwrap_or(Value::Null),
        }));
    }
    let body = json!({
        "report": name,
        "from": from,
        "to": to,
        "refreshed_at_ms": refreshed,
        "rows": out,
    });
    Ok(bytes::Bytes::from(body.to_string()))
}

/// One report's days in a range, from its summary (role viewer).
#[utoipa::path(get, path = "/api/reporting/reports/{name}", tag = "reporting", security(("bearer" = [])),
    params(("name" = String, Path, description = "Report name from `[reporting.reports.NAME]`"), RangeQuery),
    responses(
        (status = 200, description = "The report's rows per day and group, with when its summary was refreshed"),
        (status = 400, description = "A missing or malformed date, `from` after `to`, or a range over `max_report_days`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown report", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The summary store or the cache is unavailable", body = Problem, content_type = "application/problem+json")
))]
pub async fn report(
    _auth: Auth<require::Viewer>,
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Response, Problem> {
    if !s.reports.contains_key(&name) {
        return Err(Problem::not_found(format!(
            "no report named `{name}`; the reports are: {}",
            s.reports.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let (from, to) = (parse_day("from", &q.from)?, parse_day("to", &q.to)?);
    if from > to {
        return Err(field_problem(
            "to",
            format!("`to` ({to}) is before `from` ({from})"),
        ));
    }
    let span = (to - from).num_days() + 1;
    if span > i64::from(s.max_days) {
        return Err(field_problem(
            "to",
            format!(
                "the range is {span} days; at most {} (reporting.max_report_days)",
                s.max_days
            ),
        ));
    }
    let (f, t) = (from.to_string(), to.to_string());
    let key = format!("{name}:{f}:{t}");
    let (db, n) = (s.db.clone(), name.clone());
    let loaded = match &s.cache {
        Some(cache) => {
            let (f2, t2) = (f.clone(), t.clone());
            match cache
                .get_or_load_tagged(&s.namespace, &key, &[name.as_str()], move || {
                    load(db, n, f2, t2)
                })
                .await
            {
                Ok((body, outcome)) => Ok((body, outcome.label())),
                Err(CacheError::UnknownNamespace(_)) => {
                    // Once per process: a request-rate warning would flood the log.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(message = "The reporting cache namespace is not declared; serving reports uncached.", namespace = %s.namespace);
                    });
                    load(s.db.clone(), name.clone(), f, t)
                        .await
                        .map(|b| (b, "bypass"))
                        .map_err(CacheError::Loader)
                }
                Err(e) => Err(e),
            }
        }
        None => load(db, n, f, t)
            .await
            .map(|b| (b, "bypass"))
            .map_err(CacheError::Loader),
    };
    match loaded {
        Ok((body, outcome)) => {
            metrics::counter!("bulwark_reporting_report_requests_total", "report" => name, "cache" => outcome)
                .increment(1);
            Ok((
                [
                    (axum::http::header::CONTENT_TYPE, "application/json"),
                    (axum::http::HeaderName::from_static("x-cache"), outcome),
                ],
                body,
            )
                .into_response())
        }
        Err(CacheError::Loader(e)) => {
            tracing::warn!(message = "Reading a report's summary failed.", report = %name, error = %e);
            Err(Problem::unavailable(format!(
                "the summary of `{name}` could not be read"
            )))
        }
        Err(e) => Err(Problem::unavailable(e.to_string())),
    }
}

/// The declared reports and when each summary was last refreshed (role viewer).
#[utoipa::path(get, path = "/api/reporting/reports", tag = "reporting", security(("bearer" = [])),
    responses((status = 200, description = "Reports: table, time column, groups, metrics, last refresh")))]
pub async fn list(
    _auth: Auth<require::Viewer>,
    State(s): State<ApiState>,
) -> Result<axum::Json<Value>, Problem> {
    let rows =
        s.db.query_all(Statement::from_string(
            s.db.get_database_backend(),
            "SELECT report, refreshed_at_ms, days, lsn FROM reporting_summary_state",
        ))
        .await
        .map_err(|e| Problem::unavailable(format!("the summary store: {e}")))?;
    let state: BTreeMap<String, (i64, i64, i64)> = rows
        .iter()
        .filter_map(|r| {
            Some((
                r.try_get_by_index::<String>(0).ok()?,
                (
                    r.try_get_by_index::<i64>(1).ok()?,
                    r.try_get_by_index::<i64>(2).ok()?,
                    r.try_get_by_index::<i64>(3).ok()?,
                ),
            ))
        })
        .collect();
    let list: Vec<Value> = s
        .reports
        .iter()
        .map(|(name, r)| {
            let st = state.get(name);
            json!({
                "name": name,
                "description": r.description,
                "table": r.table,
                "time_column": r.time_column,
                "group_by": r.group_by,
                "metrics": r.metrics.keys().collect::<Vec<_>>(),
                "refreshed_at_ms": st.map(|s| s.0),
                "days_last_refresh": st.map(|s| s.1),
                "watermark_lsn": st.map(|s| s.2),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "reports": list })))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(report, list))]
pub struct ReportingApi;
