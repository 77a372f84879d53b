//! Logs a person (and a log shipper) can read (kernel readiness, item 7): every start-up line
//! of the real binary is one JSON object with unique keys; one line per migration applied, one
//! summary line when none is pending; no third-party `info` chatter.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::app::binary_path;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value that refuses an object with a repeated key (serde_json keeps the last one
/// silently).
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                while seq.next_element::<Strict>()?.is_some() {}
                Ok(Strict)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    map.next_value::<Strict>()?;
                }
                Ok(Strict)
            }
        }
        d.deserialize_any(V)
    }
}

/// Start the binary in `dir` with JSON logs, read stdout up to "Bulwark is ready.", stop it.
fn start_up_log(dir: &std::path::Path, rust_log: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(binary_path());
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut child = cmd
        .arg("serve")
        .current_dir(dir)
        .env("BULWARK__SERVER__LISTEN", "127.0.0.1:0")
        .env("BULWARK__TELEMETRY__LOG_FORMAT", "json")
        .env("BULWARK__TELEMETRY__LOG_LEVEL", "info")
        .env("BULWARK__DRAIN__GRACE", "0s")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bulwark (built by `cargo build -p bulwark`)");
    let stdout = child.stdout.take().expect("stdout");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read log");
        let ready = line.contains("Bulwark is ready.");
        lines.push(line);
        if ready || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("Bulwark is ready.")),
        "never ready:\n{}",
        lines.join("\n")
    );
    lines
}

fn assert_valid_json_lines(lines: &[String]) {
    for line in lines {
        if let Err(e) = serde_json::from_str::<Strict>(line) {
            panic!("not one JSON object with unique keys ({e}): {line}");
        }
    }
}

#[test]
fn the_strict_reader_refuses_a_repeated_key() {
    assert!(serde_json::from_str::<Strict>(r#"{"message":"","message":"x"}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"{"a":{"b":1,"b":2}}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"{"a":[{"b":1}],"b":2}"#).is_ok());
}

#[test]
fn start_up_logs_are_json_with_unique_keys_and_one_line_per_migration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start_up_log(dir.path(), None);
    assert_valid_json_lines(&first);
    let applied: Vec<_> = first
        .iter()
        .filter(|l| l.contains("\"Applied migration.\""))
        .collect();
    // Every applied line names a compiled-in set and a migration, and no migration twice.
    let sets: Vec<&str> = bulwark_migrations::sets()
        .iter()
        .map(|s| s.module())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for line in &applied {
        assert!(
            sets.iter()
                .any(|m| line.contains(&format!("\"module\":\"{m}\""))),
            "{line}"
        );
        let migration = line
            .split("\"migration\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("migration named");
        assert!(migration.starts_with('m'), "{line}");
        assert!(seen.insert(migration.to_owned()), "applied twice: {line}");
    }
    assert!(
        applied.len() >= 2,
        "kernel and auction migrations: {first:?}"
    );
    for noise in [
        "Applying all pending migrations",
        "No pending migrations",
        "Global tracer provider",
    ] {
        assert!(
            !first.iter().any(|l| l.contains(noise)),
            "`{noise}` in the log:\n{}",
            first.join("\n")
        );
    }

    // Second start on the same database: nothing pending, one summary line. It runs with every
    // crate at `info`, so opentelemetry's own line (an event with a `message` field besides
    // its message) is there and must still be one valid object.
    let second = start_up_log(dir.path(), Some("info"));
    assert!(
        second
            .iter()
            .any(|l| l.contains("\"target\":\"opentelemetry")),
        "{second:?}"
    );
    assert_valid_json_lines(&second);
    assert!(!second.iter().any(|l| l.contains("\"Applied migration.\"")));
    assert_eq!(
        second
            .iter()
            .filter(|l| l.contains("\"Database schema is up to date.\""))
            .count(),
        1,
        "{second:?}"
    );
}
