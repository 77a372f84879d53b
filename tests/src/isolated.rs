//! A test in a process of its own, for the few that need process-wide state to themselves
//! while the suites share one test binary: the tracer and log filter (installed once, by the
//! first application of a process) and metrics gauges other applications would overwrite.

use std::process::{Command, Stdio};

/// Set in the child to the path of the test it runs.
pub const ENV: &str = "BULWARK_TEST_ISOLATED";

/// The libtest path of test `name` declared in module `module_path` (`module_path!()`, whose
/// first segment is the crate): `it::otlp` + `spans` gives `otlp::spans`.
pub fn test_path(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_, module)) => format!("{module}::{name}"),
        None => name.to_owned(),
    }
}

/// `true` in the child process started for `test`: run the test's body. Otherwise start this
/// test binary again running only `test` (same environment, plus [`ENV`]), fail unless that
/// one test ran and passed, and return `false`: the caller returns.
pub fn in_own_process(test: &str) -> bool {
    if std::env::var(ENV).is_ok_and(|t| t == test) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV, test)
        .stdin(Stdio::null())
        .output()
        .expect("run the test in its own process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture, and with the failure otherwise.
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "`{test}` in its own process: {}\n{stdout}\n{stderr}",
        out.status
    );
    false
}

#[cfg(test)]
mod tests {
    use super::{ENV, in_own_process};

    fn in_child(test: &str) -> bool {
        std::env::var(ENV).is_ok_and(|t| t == format!("isolated::tests::{test}"))
    }

    /// Passes here; fails when run as the isolated child.
    #[test]
    fn fails_in_its_own_process() {
        assert!(!in_child("fails_in_its_own_process"), "the child fails");
    }

    #[test]
    fn passes_in_its_own_process() {
        if !crate::isolated!(passes_in_its_own_process) {
            assert!(!in_child("passes_in_its_own_process"));
            return;
        }
        assert!(
            in_child("passes_in_its_own_process"),
            "the body runs in the child"
        );
    }

    #[test]
    fn a_failing_or_missing_child_test_fails_the_caller() {
        for test in [
            "isolated::tests::fails_in_its_own_process",
            "isolated::tests::no_such_test",
        ] {
            let r = std::panic::catch_unwind(|| in_own_process(test));
            assert!(r.is_err(), "{test} did not fail the caller");
        }
    }

    #[test]
    fn test_paths_drop_the_crate() {
        assert_eq!(super::test_path("it::otlp", "spans"), "otlp::spans");
        assert_eq!(super::test_path("it::a::b", "t"), "a::b::t");
        assert_eq!(super::test_path("otlp", "spans"), "spans");
    }
}
