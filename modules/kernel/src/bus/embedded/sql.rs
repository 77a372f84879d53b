//! SQL that runs unchanged on SQLite and PostgreSQL, and the conversions around it.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, QueryResult, Statement, Value};

use super::Store;
use crate::bus::BusError;

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A statement with `?` placeholders, renumbered to `$n` for PostgreSQL.
pub(super) fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

pub(super) fn storage(err: DbErr) -> BusError {
    match err {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => BusError::Unavailable(err.to_string()),
        other => BusError::Storage(other.to_string()),
    }
}

pub(super) fn get<T: sea_orm::TryGetable>(row: &QueryResult, col: &str) -> Result<T, BusError> {
    row.try_get::<T>("", col).map_err(storage)
}

pub(super) fn seq_u64(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

impl Store {
    pub(super) fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub(super) async fn exec(&self, sql: &str, values: Vec<Value>) -> Result<u64, BusError> {
        let res = self
            .db
            .execute(stmt(self.backend(), sql, values))
            .await
            .map_err(storage)?;
        Ok(res.rows_affected())
    }
}
