//! Change capture over PostgreSQL's streaming replication protocol (R2, R3), the default
//! (`reporting.capture_mode = "stream"`): one long-lived replication session
//! (`START_REPLICATION SLOT … LOGICAL`, through the `pgwire-replication` crate) in which the
//! walsender decodes every WAL record once. The polling capture ([`Capture::read_once`])
//! starts a new decoding context for every read — from the slot's `restart_lsn`, so WAL of
//! transactions still open is decoded again and again — and `pg_replication_slot_advance`
//! decodes the same WAL a second time; docs/benchmarks.md has what that costs the primary.
//!
//! The guarantees are the polling capture's: a read publishes whole transactions to the `CDC`
//! stream and only then reports their end as flushed (`update_applied_lsn`, sent to the server
//! within a second), so the slot's `confirmed_flush_lsn` never passes what JetStream holds. Any
//! error drops the session; the next read opens a new one, which the server starts at the
//! confirmed position, so what was received but not confirmed comes again (the stream's
//! duplicate window and the sink's LSN guard make that harmless). Heartbeats: a read that
//! found nothing emits a non-transactional logical message (`pg_logical_emit_message`) at most
//! every `reporting.heartbeat_interval`; it comes back through the stream between
//! transactions, and confirming its position lets an idle slot release WAL written to other
//! tables and databases.

use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

use crate::capture::{Capture, CaptureError, ChangeSource, ReadOutcome, TxnDecoder};
use crate::pgoutput;

type Result<T> = std::result::Result<T, CaptureError>;

/// After the first committed change of a read, how long the read waits for more before it
/// publishes: small next to the apply lag goal, large enough to batch a busy source.
const LINGER: Duration = Duration::from_millis(20);

/// The prefix of our heartbeat messages.
const HEARTBEAT_PREFIX: &str = "bulwark.reporting.heartbeat";

/// The replication connection's settings from `reporting.source_url`
/// (`postgres://user:password@host:port/db?sslmode=…`).
pub fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> std::result::Result<ReplicationConfig, String> {
    let u = url::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(format!("has scheme `{}`, not postgres://", u.scheme()));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|e| format!("is not UTF-8 after percent-decoding: {e}"))
    };
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("names no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let user = decode(u.username())?;
    if user.is_empty() {
        return Err("names no user".into());
    }
    let password = decode(u.password().unwrap_or(""))?;
    let database = decode(u.path().trim_start_matches('/'))?;
    if database.is_empty() {
        return Err("names no database".into());
    }
    let sslmode = u
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "prefer".into());
    let tls = match sslmode.as_str() {
        "disable" => TlsConfig::disabled(),
        "allow" | "prefer" => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::disabled()
        },
        "require" => TlsConfig::require(),
        "verify-ca" => TlsConfig::verify_ca(None),
        "verify-full" => TlsConfig::verify_full(None),
        other => {
            return Err(format!(
                "has sslmode `{other}`, not one of disable, allow, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(u.port().unwrap_or(5432))
            .with_tls(tls)
            // The slot's confirmed position: everything not yet stored on the bus.
            .with_start_lsn(Lsn::ZERO)
            // Confirmations reach the server within a second of being stored.
            .with_status_interval(Duration::from_secs(1))
            .with_wakeup_interval(Duration::from_secs(10))
            .with_application_name("bulwark-reporting"),
    )
}

struct Session {
    client: ReplicationClient,
    decoder: TxnDecoder,
}

/// The streaming capture: [`Capture`] prepares the publication and slot and takes the
/// snapshots; the changes come through a replication session.
pub struct StreamCapture {
    capture: Capture,
    conn: ReplicationConfig,
    session: tokio::sync::Mutex<Option<Session>>,
    last_heartbeat: std::sync::Mutex<Option<Instant>>,
}

impl StreamCapture {
    pub fn new(capture: Capture) -> Result<Self> {
        let url = capture
            .cfg
            .source_url
            .as_ref()
            .map(|u| u.expose().to_owned())
            .unwrap_or_default();
        let conn = replication_config(&url, &capture.cfg.slot, &capture.cfg.publication)
            .map_err(|m| CaptureError::Setup(format!("reporting.source_url: {m}")))?;
        Ok(Self {
            capture,
            conn,
            session: tokio::sync::Mutex::new(None),
            last_heartbeat: std::sync::Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<Session> {
        let client = ReplicationClient::connect(self.conn.clone())
            .await
            .map_err(|e| CaptureError::Stream(format!("connecting for replication: {e}")))?;
        Ok(Session {
            client,
            decoder: TxnDecoder::new(self.capture.cfg.changes_per_message),
        })
    }

    /// Receive for up to `poll_interval` (less once something committed arrived), publish
    /// what committed, then confirm it.
    async fn read_session(&self, s: &mut Session) -> Result<ReadOutcome> {
        let started = Instant::now();
        let budget = self.capture.cfg.poll_interval;
        let max = u64::from(self.capture.cfg.max_changes_per_read);
        // A position between transactions (a keepalive's or a heartbeat's) that may be
        // confirmed even if nothing of ours committed.
        let mut between: Option<u64> = None;
        loop {
            let left = budget.saturating_sub(started.elapsed());
            let wait = if s.decoder.changes() > 0 && !s.decoder.in_txn() {
                left.min(LINGER)
            } else {
                left
            };
            if wait.is_zero() {
                break;
            }
            let ev = match tokio::time::timeout(wait, s.client.recv()).await {
                Err(_) => break,
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => {
                    return Err(CaptureError::Stream("the replication stream ended".into()));
                }
                Ok(Err(e)) => return Err(CaptureError::Stream(e.to_string())),
            };
            match ev {
                ReplicationEvent::Begin {
                    xid,
                    commit_time_micros,
                    ..
                } => s.decoder.begin(xid, commit_time_micros),
                ReplicationEvent::XLogData { data, .. } => {
                    s.decoder.message(pgoutput::decode(&data)?)?;
                }
                ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                    s.decoder.commit(lsn.as_u64(), end_lsn.as_u64())?;
                    if s.decoder.changes() >= max {
                        break;
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } if !s.decoder.in_txn() => {
                    between = Some(wal_end.as_u64());
                }
                ReplicationEvent::Message {
                    transactional: false,
                    lsn,
                    ..
                } if !s.decoder.in_txn() => between = Some(lsn.as_u64()),
                _ => {}
            }
        }
        let (pending, last_end) = s.decoder.take();
        let mut out = self
            .capture
            .publish_pending(&pending, pending.is_empty())
            .await?;
        let to = match (last_end, between) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(to) = to {
            s.client.update_applied_lsn(Lsn::from_u64(to));
            out.advanced_to = Some(to);
        }
        Ok(out)
    }

    /// Emit a heartbeat on the source when the last one is older than the interval.
    async fn heartbeat(&self) -> Result<()> {
        let due = {
            let mut last = self
                .last_heartbeat
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= self.capture.cfg.heartbeat_interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            use sea_orm::ConnectionTrait;
            self.capture
                .source
                .execute_unprepared(&format!(
                    "SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')"
                ))
                .await?;
            metrics::counter!("bulwark_reporting_heartbeats_total").increment(1);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ChangeSource for StreamCapture {
    async fn snapshot_missing(&self) -> Result<u64> {
        self.capture.snapshot_missing().await
    }

    async fn read_once(&self) -> Result<ReadOutcome> {
        let mut guard = self.session.lock().await;
        let session = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(self.connect().await?),
        };
        let read = self.read_session(session).await;
        match &read {
            // Received but not confirmed comes again in the next session.
            Err(_) => *guard = None,
            Ok(o) if o.changes == 0 => {
                drop(guard);
                self.heartbeat().await?;
            }
            Ok(_) => {}
        }
        read
    }

    async fn slot_lag(&self) -> Result<Option<(i64, i64)>> {
        self.capture.slot_lag().await
    }

    /// The read itself waits for changes.
    fn poll_interval(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_urls_become_replication_settings() {
        let c = replication_config(
            "postgres://rep%40ops:p%2Fw@db.example:6543/shop?sslmode=require",
            "s",
            "p",
        )
        .expect("valid");
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_str()
            ),
            ("db.example", 6543, "rep@ops", "p/w")
        );
        assert_eq!(c.database, "shop");
        assert!(c.tls.mode.requires_tls());
        let plain = replication_config("postgresql://u@localhost/db", "s", "p").expect("valid");
        assert_eq!((plain.port, plain.password.as_str()), (5432, ""));
        for (bad, why) in [
            ("mysql://u@h/db", "scheme"),
            ("postgres://h/db", "no user"),
            ("postgres://u@h/", "no database"),
            ("postgres://u@h/db?sslmode=sometimes", "sslmode"),
        ] {
            let e = replication_config(bad, "s", "p").expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
