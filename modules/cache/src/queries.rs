//! Named cached queries: read-only SQL declared in config, served as whole JSON responses
//! through the loader (the brief: cache whole API responses).
//!
//! ```toml
//! [cache.queries.top_sellers]
//! namespace = "reports"
//! sql = "SELECT name, total FROM sales WHERE region = :region ORDER BY total DESC LIMIT :n"
//! params = [{ name = "region", type = "text" }, { name = "n", type = "int" }]
//! ```
//!
//! Parameters are bound, never interpolated: `:name` placeholders are rewritten to the
//! backend's numbered placeholders (`$1` on PostgreSQL, `?1` on SQLite). The SQL runs on the
//! read connection (`database.read_url`, a replica in production) inside a READ ONLY
//! transaction. `int` binds as a 64-bit integer (`bigint`): cast in SQL (`:n::int`) where a
//! PostgreSQL function expects `integer`.

use std::collections::{BTreeMap, HashMap};

use bulwark_kernel::config::ConfigError;
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, JsonValue,
    Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};

/// The declared type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Int,
    Float,
    Text,
    Bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
}

/// `[cache.queries.NAME]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// A declared namespace whose policy applies.
    pub namespace: String,
    /// One SELECT (or WITH … SELECT) with `:name` placeholders.
    pub sql: String,
    #[serde(default)]
    pub params: Vec<ParamSpec>,
}

/// Placeholders in order of appearance, skipping quoted text and `::` casts.
fn placeholders(sql: &str) -> Vec<(usize, usize, String)> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut quoted) = (0, false);
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' {
            quoted = !quoted;
        } else if !quoted
            && c == b':'
            && (i == 0 || bytes[i - 1] != b':')
            && bytes
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_')
        {
            let start = i;
            let mut j = i + 1;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                j += 1;
            }
            out.push((start, j, sql[start + 1..j].to_owned()));
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

impl QueryConfig {
    pub fn validate(
        &self,
        name: &str,
        namespaces: &BTreeMap<String, crate::NamespacePolicy>,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("cache.queries.{name}.{k}");
        if !namespaces.contains_key(&self.namespace) {
            return Err(ConfigError::new(
                key("namespace"),
                format!("no namespace `{}` is declared", self.namespace),
            ));
        }
        let head = self.sql.trim_start().to_ascii_lowercase();
        if !(head.starts_with("select") || head.starts_with("with")) {
            return Err(ConfigError::new(
                key("sql"),
                "must be a single SELECT (or WITH … SELECT)",
            ));
        }
        if self.sql.trim_end().trim_end_matches(';').contains(';') {
            return Err(ConfigError::new(key("sql"), "must be a single statement"));
        }
        let used: Vec<String> = placeholders(&self.sql)
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
        for u in &used {
            if !self.params.iter().any(|p| &p.name == u) {
                return Err(ConfigError::new(
                    key("sql"),
                    format!("placeholder `:{u}` is not declared in params"),
                ));
            }
        }
        for p in &self.params {
            if !used.contains(&p.name) {
                return Err(ConfigError::new(
                    key("params"),
                    format!("`{}` is declared but not used in sql", p.name),
                ));
            }
        }
        Ok(())
    }

    /// The SQL with numbered placeholders for `backend`.
    pub fn compile(&self, backend: DbBackend) -> String {
        let mut out = String::with_capacity(self.sql.len());
        let mut last = 0;
        for (start, end, name) in placeholders(&self.sql) {
            out.push_str(&self.sql[last..start]);
            let idx = self
                .params
                .iter()
                .position(|p| p.name == name)
                .map(|i| i + 1)
                .unwrap_or(0);
            match backend {
                DbBackend::Postgres => out.push_str(&format!("${idx}")),
                _ => out.push_str(&format!("?{idx}")),
            }
            last = end;
        }
        out.push_str(&self.sql[last..]);
        out.trim_end().trim_end_matches(';').to_owned()
    }

    /// Typed values from query-string parameters, or an error naming the parameter.
    pub fn bind(&self, given: &HashMap<String, String>) -> Result<Vec<sea_orm::Value>, String> {
        for k in given.keys() {
            if !self.params.iter().any(|p| &p.name == k) {
                let known: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                return Err(format!(
                    "unknown parameter `{k}`; this query takes: {}",
                    known.join(", ")
                ));
            }
        }
        self.params
            .iter()
            .map(|p| {
                let raw = given
                    .get(&p.name)
                    .ok_or_else(|| format!("missing parameter `{}`", p.name))?;
                let bad =
                    |what: &str| format!("parameter `{}` must be {what}, got `{raw}`", p.name);
                Ok(match p.kind {
                    ParamType::Int => {
                        sea_orm::Value::BigInt(Some(raw.parse().map_err(|_| bad("an integer"))?))
                    }
                    ParamType::Float => {
                        let f: f64 = raw.parse().map_err(|_| bad("a number"))?;
                        if !f.is_finite() {
                            return Err(bad("a finite number"));
                        }
                        sea_orm::Value::Double(Some(f))
                    }
                    ParamType::Bool => {
                        sea_orm::Value::Bool(Some(raw.parse().map_err(|_| bad("true or false"))?))
                    }
                    ParamType::Text => sea_orm::Value::String(Some(Box::new(raw.clone()))),
                })
            })
            .collect()
    }

    /// The cache key: the query name and its parameters in declared order.
    pub fn cache_key(&self, name: &str, given: &HashMap<String, String>) -> String {
        let values: Vec<&str> = self
            .params
            .iter()
            .map(|p| given.get(&p.name).map(String::as_str).unwrap_or(""))
            .collect();
        format!(
            "{name}:{}",
            serde_json::to_string(&values).unwrap_or_default()
        )
    }

    /// Run on `db` in a READ ONLY transaction; the rows as a JSON array.
    pub async fn run(
        &self,
        db: &DatabaseConnection,
        values: Vec<sea_orm::Value>,
    ) -> Result<Vec<u8>, String> {
        let backend = db.get_database_backend();
        let stmt = Statement::from_sql_and_values(backend, self.compile(backend), values);
        let rows = if backend == DbBackend::Sqlite {
            // SQLite has no read-only transactions; `query_only` on the pinned connection is
            // the equivalent, and is switched back off before the connection returns to the pool.
            let txn = db.begin().await.map_err(|e| e.to_string())?;
            txn.execute_unprepared("PRAGMA query_only = ON")
                .await
                .map_err(|e| e.to_string())?;
            let rows = txn.query_all(stmt).await;
            txn.execute_unprepared("PRAGMA query_only = OFF")
                .await
                .map_err(|e| e.to_string())?;
            txn.rollback().await.map_err(|e| e.to_string())?;
            rows
        } else {
            let txn = db
                .begin_with_config(None, Some(AccessMode::ReadOnly))
                .await
                .map_err(|e| e.to_string())?;
            let rows = txn.query_all(stmt).await;
            txn.rollback().await.map_err(|e| e.to_string())?;
            rows
        };
        let rows: Vec<JsonValue> = rows
            .map_err(|e| e.to_string())?
            .iter()
            .map(row_to_json)
            .collect::<Result<_, _>>()?;
        serde_json::to_vec(&rows).map_err(|e| e.to_string())
    }
}

/// One row as a JSON object. sea-orm's typed conversion covers declared column types; columns
/// it cannot type (SQLite expressions have no declared type) are read by value: integer,
/// real, text, boolean, else null — never silently dropped.
fn row_to_json(row: &sea_orm::QueryResult) -> Result<JsonValue, String> {
    let mut value = JsonValue::from_query_result(row, "").map_err(|e| e.to_string())?;
    let Some(map) = value.as_object_mut() else {
        return Ok(value);
    };
    for col in row.column_names() {
        if map.contains_key(&col) {
            continue;
        }
        let v = if let Ok(v) = row.try_get::<Option<i64>>("", &col) {
            serde_json::json!(v)
        } else if let Ok(v) = row.try_get::<Option<f64>>("", &col) {
            serde_json::json!(v)
        } else if let Ok(v) = row.try_get::<Option<String>>("", &col) {
            serde_json::json!(v)
        } else if let Ok(v) = row.try_get::<Option<bool>>("", &col) {
            serde_json::json!(v)
        } else {
            JsonValue::Null
        };
        map.insert(col, v);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(sql: &str, params: &[(&str, ParamType)]) -> QueryConfig {
        QueryConfig {
            namespace: "ns".into(),
            sql: sql.into(),
            params: params
                .iter()
                .map(|(n, k)| ParamSpec {
                    name: (*n).into(),
                    kind: *k,
                })
                .collect(),
        }
    }

    #[test]
    fn placeholders_skip_quotes_and_casts() {
        let query = q(
            "SELECT ':not', x::text FROM t WHERE a = :a AND b = :b OR a = :a",
            &[("a", ParamType::Int), ("b", ParamType::Text)],
        );
        assert_eq!(
            query.compile(DbBackend::Postgres),
            "SELECT ':not', x::text FROM t WHERE a = $1 AND b = $2 OR a = $1"
        );
        assert_eq!(
            query.compile(DbBackend::Sqlite),
            "SELECT ':not', x::text FROM t WHERE a = ?1 AND b = ?2 OR a = ?1"
        );
    }

    #[test]
    fn binding_names_the_bad_parameter() {
        let query = q("SELECT :n", &[("n", ParamType::Int)]);
        let mut given = HashMap::new();
        assert!(
            query
                .bind(&given)
                .expect_err("error")
                .contains("missing parameter `n`")
        );
        given.insert("n".into(), "x".into());
        assert!(
            query
                .bind(&given)
                .expect_err("error")
                .contains("`n` must be an integer")
        );
        given.insert("extra".into(), "1".into());
        assert!(
            query
                .bind(&given)
                .expect_err("error")
                .contains("unknown parameter `extra`")
        );
    }
}
