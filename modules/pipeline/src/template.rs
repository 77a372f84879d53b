//! Task argument templates (minijinja). Every rendered string depends only on the run's
//! context, so re-running a logical date renders the same arguments (P6, P13).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use crate::dag::{SensorTarget, TaskKind};
use crate::schedule::DataInterval;

/// What a template can see for one try of one task instance.
#[derive(Debug, Clone, PartialEq)]
pub struct RunContext {
    pub dag_id: String,
    pub task_id: String,
    pub run_id: String,
    pub logical_date: DateTime<Utc>,
    pub interval: DataInterval,
    pub try_number: u32,
    pub tz: Tz,
    pub conf: serde_json::Value,
}

/// The variables templates may use; any other name is an error.
pub const VARIABLES: &[&str] = &[
    "ds",
    "ds_nodash",
    "ts",
    "logical_date",
    "data_interval_start",
    "data_interval_end",
    "run_id",
    "try_number",
    "dag_id",
    "task_id",
    "conf",
];

/// Why a template could not be checked or rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown template variable `{name}`")]
    UnknownVariable { name: String },
    #[error("template syntax error: {0}")]
    Syntax(String),
    #[error("template error: {0}")]
    Render(String),
    /// An error of one field of a task (from [`render_task`]).
    #[error("field `{field}`: {source}")]
    InField {
        field: String,
        #[source]
        source: Box<TemplateError>,
    },
}

/// A fresh environment per call: templates borrow their source for the environment's lifetime,
/// and building one is cheap next to running a task.
fn environment<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    // Chainable: `conf.x` (and `conf.x.y`) may be missing and render empty. Every other name
    // is checked up front against VARIABLES, so this leniency only reaches conf.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    // Commands and bodies are rendered byte-for-byte; minijinja would drop a final newline.
    env.set_keep_trailing_newline(true);
    env
}

fn syntax(e: &minijinja::Error) -> TemplateError {
    // Display of a minijinja error includes its kind, detail and line within the template.
    TemplateError::Syntax(e.to_string())
}

/// Parse `template` and reject names outside VARIABLES (minijinja's own globals such as
/// `range` are allowed).
fn compile<'e, 's>(
    env: &'e Environment<'s>,
    template: &'s str,
) -> Result<minijinja::Template<'e, 's>, TemplateError> {
    let tmpl = env.template_from_str(template).map_err(|e| syntax(&e))?;
    let globals: HashSet<&str> = env.globals().map(|(k, _)| k).collect();
    let mut unknown: Vec<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !VARIABLES.contains(&v.as_str()) && !globals.contains(v.as_str()))
        .collect();
    unknown.sort();
    match unknown.into_iter().next() {
        Some(name) => Err(TemplateError::UnknownVariable { name }),
        None => Ok(tmpl),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn context_value(ctx: &RunContext) -> Value {
    let local = ctx.logical_date.with_timezone(&ctx.tz);
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("ds", Value::from(local.format("%Y-%m-%d").to_string()));
    m.insert("ds_nodash", Value::from(local.format("%Y%m%d").to_string()));
    m.insert("ts", Value::from(rfc3339(ctx.logical_date)));
    m.insert("logical_date", Value::from(rfc3339(ctx.logical_date)));
    m.insert(
        "data_interval_start",
        Value::from(rfc3339(ctx.interval.start)),
    );
    m.insert("data_interval_end", Value::from(rfc3339(ctx.interval.end)));
    m.insert("run_id", Value::from(ctx.run_id.clone()));
    m.insert("try_number", Value::from(ctx.try_number));
    m.insert("dag_id", Value::from(ctx.dag_id.clone()));
    m.insert("task_id", Value::from(ctx.task_id.clone()));
    m.insert("conf", Value::from_serialize(&ctx.conf));
    Value::from_iter(m)
}

/// Render one template strictly: unknown variables and syntax errors are errors.
pub fn render(template: &str, ctx: &RunContext) -> Result<String, TemplateError> {
    let env = environment();
    let tmpl = compile(&env, template)?;
    tmpl.render(context_value(ctx))
        .map_err(|e| TemplateError::Render(e.to_string()))
}

/// Check a template without a run: syntax, variable names, and (by a dry render against a
/// sample context) unknown filters, tests and functions, which minijinja only finds at render
/// time.
pub fn check(template: &str) -> Result<(), TemplateError> {
    let env = environment();
    let tmpl = compile(&env, template)?;
    match tmpl.render(context_value(&sample_context())) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::SyntaxError => Err(syntax(&e)),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction
            ) =>
        {
            Err(TemplateError::Render(e.to_string()))
        }
        // Other failures depend on the run's data (e.g. conf values) and are left to run time.
        Err(_) => Ok(()),
    }
}

fn sample_context() -> RunContext {
    let t = DateTime::<Utc>::UNIX_EPOCH;
    RunContext {
        dag_id: "dag".into(),
        task_id: "task".into(),
        run_id: "run".into(),
        logical_date: t,
        interval: DataInterval { start: t, end: t },
        try_number: 1,
        tz: Tz::UTC,
        conf: serde_json::Value::Object(serde_json::Map::new()),
    }
}

fn in_field(field: &str, e: TemplateError) -> TemplateError {
    TemplateError::InField {
        field: field.to_string(),
        source: Box::new(e),
    }
}

fn render_map(
    field: &str,
    m: &BTreeMap<String, String>,
    ctx: &RunContext,
) -> Result<BTreeMap<String, String>, TemplateError> {
    m.iter()
        .map(|(k, v)| {
            render(v, ctx)
                .map(|r| (k.clone(), r))
                .map_err(|e| in_field(&format!("{field}.{k}"), e))
        })
        .collect()
}

/// Render every template field of a task; the result has the same shape. Every string inside
/// a plugin's args is rendered too (a `sql` task's query, paths and predicates), so the stored
/// job is what runs (P13).
pub fn render_task(kind: &TaskKind, ctx: &RunContext) -> Result<TaskKind, TemplateError> {
    let one = |field: &str, s: &str| render(s, ctx).map_err(|e| in_field(field, e));
    Ok(match kind {
        TaskKind::Shell {
            command,
            env,
            cwd,
            skip_on_exit_code,
        } => TaskKind::Shell {
            command: one("command", command)?,
            env: render_map("env", env, ctx)?,
            cwd: cwd.as_deref().map(|c| one("cwd", c)).transpose()?,
            skip_on_exit_code: skip_on_exit_code.clone(),
        },
        TaskKind::Http {
            method,
            url,
            headers,
            body,
        } => TaskKind::Http {
            method: method.clone(),
            url: one("url", url)?,
            headers: render_map("headers", headers, ctx)?,
            body: body.as_deref().map(|b| one("body", b)).transpose()?,
        },
        TaskKind::Sensor {
            target,
            poke_interval,
            timeout,
            soft_fail,
        } => TaskKind::Sensor {
            target: match target {
                SensorTarget::Subject(s) => SensorTarget::Subject(one("subject", s)?),
                SensorTarget::File(f) => SensorTarget::File(one("file", f)?),
                SensorTarget::Dataset(d) => SensorTarget::Dataset(d.clone()),
            },
            poke_interval: *poke_interval,
            timeout: *timeout,
            soft_fail: *soft_fail,
        },
        TaskKind::Plugin { type_name, args } => TaskKind::Plugin {
            type_name: type_name.clone(),
            args: render_json(args, ctx)?,
        },
    })
}

/// Render every string inside a JSON value (object keys stay as they are).
fn render_json(
    v: &serde_json::Value,
    ctx: &RunContext,
) -> Result<serde_json::Value, TemplateError> {
    use serde_json::Value;
    Ok(match v {
        Value::String(s) => Value::String(render(s, ctx).map_err(|e| in_field("args", e))?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_json(x, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), render_json(x, ctx)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ctx() -> RunContext {
        let start = Utc
            .with_ymd_and_hms(2026, 11, 29, 15, 0, 0)
            .single()
            .expect("valid date");
        let end = Utc
            .with_ymd_and_hms(2026, 11, 30, 15, 0, 0)
            .single()
            .expect("valid date");
        RunContext {
            dag_id: "daily_sales".into(),
            task_id: "extract".into(),
            run_id: "scheduled__2026-11-30".into(),
            logical_date: start,
            interval: DataInterval { start, end },
            try_number: 2,
            tz: chrono_tz::Asia::Seoul,
            conf: serde_json::json!({"out": "/data", "n": 3}),
        }
    }

    #[test]
    fn renders_every_variable() {
        let c = ctx();
        let cases = [
            ("{{ ds }}", "2026-11-30"), // the local (KST) date of 15:00 UTC
            ("{{ ds_nodash }}", "20261130"),
            ("{{ ts }}", "2026-11-29T15:00:00Z"),
            ("{{ logical_date }}", "2026-11-29T15:00:00Z"),
            ("{{ data_interval_start }}", "2026-11-29T15:00:00Z"),
            ("{{ data_interval_end }}", "2026-11-30T15:00:00Z"),
            ("{{ run_id }}", "scheduled__2026-11-30"),
            ("{{ try_number }}", "2"),
            ("{{ dag_id }}", "daily_sales"),
            ("{{ task_id }}", "extract"),
            ("{{ conf.out }}", "/data"),
            ("{{ conf.n + 1 }}", "4"),
            ("{{ conf.missing }}", ""),
            (
                "{{ conf.missing | default('out') }}/dt={{ ds }}",
                "out/dt=2026-11-30",
            ),
            ("line\n", "line\n"),
        ];
        for (t, want) in cases {
            assert_eq!(render(t, &c).as_deref(), Ok(want), "template {t:?}");
            // Determinism: the same context renders the same text every time.
            assert_eq!(render(t, &c), render(t, &c));
        }
    }

    #[test]
    fn unknown_variable_is_an_error() {
        let err = render("echo {{ dss }}", &ctx()).expect_err("must fail");
        assert_eq!(err, TemplateError::UnknownVariable { name: "dss".into() });
        assert_eq!(err.to_string(), "unknown template variable `dss`");
        assert!(check("{{ foo.bar }}").is_err());
        // Loop variables and `set` are declared by the template itself.
        assert_eq!(check("{% for x in range(3) %}{{ x }}{% endfor %}"), Ok(()));
        assert_eq!(check("{% set y = ds %}{{ y }}"), Ok(()));
    }

    #[test]
    fn syntax_and_filter_errors() {
        assert!(matches!(check("{{ ds "), Err(TemplateError::Syntax(_))));
        assert!(matches!(check("{% if %}"), Err(TemplateError::Syntax(_))));
        assert!(
            matches!(check("{{ ds | nosuch }}"), Err(TemplateError::Render(m)) if m.contains("unknown filter"))
        );
        // An unknown function is first of all an unknown name.
        assert!(matches!(
            check("{{ nofn() }}"),
            Err(TemplateError::UnknownVariable { .. })
        ));
        assert_eq!(check("plain text"), Ok(()));
    }

    #[test]
    fn render_task_replaces_strings() {
        let kind = TaskKind::Shell {
            command: "echo {{ ds }}".into(),
            env: BTreeMap::from([("RUN".to_string(), "{{ run_id }}".to_string())]),
            cwd: Some("/w/{{ ds_nodash }}".into()),
            skip_on_exit_code: vec![99],
        };
        let out = render_task(&kind, &ctx()).expect("renders");
        assert_eq!(
            out,
            TaskKind::Shell {
                command: "echo 2026-11-30".into(),
                env: BTreeMap::from([("RUN".to_string(), "scheduled__2026-11-30".to_string())]),
                cwd: Some("/w/20261130".into()),
                skip_on_exit_code: vec![99],
            }
        );
        let bad = TaskKind::Http {
            method: "GET".into(),
            url: "http://x/{{ nope }}".into(),
            headers: BTreeMap::new(),
            body: None,
        };
        let err = render_task(&bad, &ctx()).expect_err("must fail");
        assert_eq!(
            err.to_string(),
            "field `url`: unknown template variable `nope`"
        );
    }
}
