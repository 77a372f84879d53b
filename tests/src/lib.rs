//! The shared end-to-end test harness (zero2prod's `spawn_app`, grown up).
//!
//! * [`app`]: spawn the real application in process (`spawn_app()`, [`TestAppBuilder`]);
//! * [`http`]: what [`TestApp`] and [`TestProcess`] share — URLs, tokens, JSON requests,
//!   `/metrics` and a metric-value reader ([`metrics`] parses the text);
//! * [`process`]: the built binary as a child process, sharing a test application's database,
//!   bus and Redis prefixes ([`TestApp::spawn_process`]), or standalone;
//! * [`services`]: fresh, isolated backing services per test — a new PostgreSQL database, a
//!   unique Redis key prefix, a unique NATS stream/subject prefix — or embedded stand-ins;
//! * [`each_backend!`] runs one test body on embedded and on real services; [`isolated!`] runs
//!   a test in a process of its own.
//!
//! Real services are used when their URLs are set (`scripts/test` sets them):
//! `BULWARK_TEST_POSTGRES_URL` (an admin URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`),
//! `BULWARK_TEST_REDIS_URL`, `BULWARK_TEST_NATS_URL`. With `BULWARK_TEST_REQUIRE_SERVICES=1`
//! a missing URL fails the test instead of skipping the real-service half.

pub mod app;
pub mod http;
pub mod isolated;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod procs;
pub mod services;

pub use app::{Backend, TestApp, TestAppBuilder, spawn_app};
pub use http::Http;
pub use process::{ProcessBuilder, TestProcess};

/// Two tests from each `async fn name(backend: Backend)`: `name::embedded` and `name::real`.
/// The real half runs only when PostgreSQL, Redis and NATS are configured
/// ([`services::real_services`]: a note when one is missing, a failure when
/// `BULWARK_TEST_REQUIRE_SERVICES=1`), so its body may [`TestAppBuilder::start`] without
/// handling "not configured".
///
/// ```text
/// async fn presence_lists_connections(backend: Backend) { /* ... */ }
/// bulwark_tests::each_backend!(presence_lists_connections);
/// ```
#[macro_export]
macro_rules! each_backend {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name($crate::Backend::Embedded).await;
            }

            #[tokio::test]
            async fn real() {
                if $crate::services::real_services() {
                    super::$name($crate::Backend::Real).await;
                }
            }
        }
    )+};
}

/// `if !isolated!(this_test_fn) { return; }` at the top of a test runs the rest of it in a
/// fresh process of the test binary (see [`isolated::in_own_process`]): `false` in the
/// calling process once the child passed, `true` in the child.
#[macro_export]
macro_rules! isolated {
    ($test:ident) => {
        $crate::isolated::in_own_process(&$crate::isolated::test_path(
            module_path!(),
            stringify!($test),
        ))
    };
}
