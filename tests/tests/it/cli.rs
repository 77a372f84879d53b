//! The `bulwark` binary itself (K1, K2, K5, K7, K8): version, config errors with exit code 2
//! naming the key, token minting, migrations, an unreachable database, and SIGTERM draining.

use std::time::Duration;

use bulwark_tests::ProcessBuilder;
use bulwark_tests::process::run_bulwark as run;
use bulwark_tests::procs::free_port;

#[test]
fn version_lists_compiled_modules() {
    let dir = tempfile::tempdir().expect("tmp");
    let (code, out, _) = run(dir.path(), &["--version"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("modules: cache, auction, annotation, pipeline, reporting"),
        "{out}"
    );
}

#[test]
fn config_check_prints_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = "a-very-secret-value-that-must-not-print-0123";
    let (code, out, err) = run(
        dir.path(),
        &["config", "check"],
        &[
            ("BULWARK__AUTH__HS256_SECRET", secret),
            ("BULWARK__DATABASE__URL", "postgres://app:pw123@db/bulwark"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[server]") && out.contains("[cache]"), "{out}");
    assert!(
        !out.contains(secret) && !out.contains("pw123"),
        "secrets printed: {out}"
    );
    assert!(out.contains("[redacted]"));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    // Unknown key from the environment.
    let (code, _, err) = run(
        dir.path(),
        &["config", "check"],
        &[("BULWARK__SERVER__LISTN", "x")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("`server.listn`"), "{err}");
    // Bad value from a file.
    std::fs::write(dir.path().join("bad.toml"), "[drain]\ngrace = \"soon\"\n").expect("write");
    let (code, _, err) = run(
        dir.path(),
        &["--config", "bad.toml", "config", "check"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("`drain.grace`") && err.contains("bad.toml"),
        "{err}"
    );
    // Unknown section, unknown module key, missing file, production without services.
    std::fs::write(dir.path().join("bad2.toml"), "[cach]\nx = 1\n").expect("write");
    let (code, _, err) = run(
        dir.path(),
        &["--config", "bad2.toml", "config", "check"],
        &[],
    );
    assert_eq!((code, err.contains("`cach`")), (2, true), "{err}");
    std::fs::write(dir.path().join("bad3.toml"), "[auction]\nbids = 1\n").expect("write");
    let (code, _, err) = run(
        dir.path(),
        &["--config", "bad3.toml", "config", "check"],
        &[],
    );
    assert_eq!((code, err.contains("`auction.bids`")), (2, true), "{err}");
    let (code, _, err) = run(
        dir.path(),
        &["--config", "nope.toml", "config", "check"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(
        dir.path(),
        &["config", "check"],
        &[("BULWARK__MODE", "production")],
    );
    assert_eq!(
        (code, err.contains("`auth.hs256_secret`")),
        (2, true),
        "{err}"
    );
    // serve refuses to start the same way.
    let (code, _, err) = run(
        dir.path(),
        &["serve"],
        &[("BULWARK__SERVER__BODY_LIMIT_BYTES", "-1")],
    );
    assert_eq!(
        (code, err.contains("server.body_limit_bytes")),
        (2, true),
        "{err}"
    );
}

#[test]
fn token_issue_mints_and_generates_a_private_secret() {
    let dir = tempfile::tempdir().expect("tmp");
    let (code, out, err) = run(
        dir.path(),
        &[
            "token", "issue", "--sub", "alice", "--role", "bidder", "--ttl", "10m",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().split('.').count(), 3, "a JWT: {out}");
    let secret = dir.path().join("data/jwt-secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secret)
            .expect("secret")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Bad input names the argument.
    let (code, _, err) = run(
        dir.path(),
        &["token", "issue", "--sub", "alice", "--role", "wizard"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--role"), "{err}");
    let (code, _, err) = run(
        dir.path(),
        &[
            "token", "issue", "--sub", "alice", "--role", "viewer", "--ttl", "forever",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--ttl"), "{err}");
}

#[test]
fn migrate_status_up_down() {
    let dir = tempfile::tempdir().expect("tmp");
    let (code, out, err) = run(dir.path(), &["migrate", "status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("kernel") && out.contains("pending") && out.contains("bus"),
        "{out}"
    );
    let (code, _, err) = run(dir.path(), &["migrate", "up"], &[]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(dir.path(), &["migrate", "status"], &[]);
    assert!(out.contains("applied") && !out.contains("pending"), "{out}");
    let (code, _, err) = run(dir.path(), &["migrate", "down", "--module", "kernel"], &[]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(dir.path(), &["migrate", "status"], &[]);
    assert!(out.contains("pending"), "{out}");
    let (code, _, err) = run(dir.path(), &["migrate", "down", "--module", "nosuch"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn unreachable_database_retries_then_exits_1() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let url = format!("postgres://u:p@127.0.0.1:{port}/none");
    let started = std::time::Instant::now();
    let (code, _, err) = run(
        dir.path(),
        &["serve"],
        &[
            ("BULWARK__DATABASE__URL", &url),
            ("BULWARK__DATABASE__CONNECT_TIMEOUT", "1500ms"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("database unreachable"), "{err}");
    assert!(!err.contains(":p@"), "password printed: {err}");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it retried for connect_timeout"
    );
}

#[tokio::test]
async fn sigterm_fails_readiness_then_exits_0() {
    // The binary's own embedded defaults (SQLite and a generated secret in its directory);
    // `spawn` waits for /readyz 200.
    let mut proc = ProcessBuilder::standalone()
        .env("BULWARK__DRAIN__GRACE", "1s")
        .spawn()
        .await;
    proc.term();
    let url = proc.url("/readyz");
    let draining = bulwark_tests::services::eventually(Duration::from_secs(2), || async {
        proc.client
            .get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 503)
            .map(|_| ())
    })
    .await;
    assert!(
        draining.is_some(),
        "readiness did not fail during the grace period"
    );
    let code = proc.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    let log = proc.log();
    assert!(log.contains("Draining") && log.contains("Stopped"), "{log}");
}
