//! The shared end-to-end test harness (zero2prod's `spawn_app`, grown up).
//!
//! * [`app`]: spawn the real application (`spawn_app()`, [`TestAppBuilder`]) with typed helpers;
//! * [`services`]: fresh, isolated backing services per test — a new PostgreSQL database, a
//!   unique Redis key prefix, a unique NATS stream/subject prefix — or embedded stand-ins.
//!
//! Real services are used when their URLs are set (`scripts/test` sets them):
//! `BULWARK_TEST_POSTGRES_URL` (an admin URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`),
//! `BULWARK_TEST_REDIS_URL`, `BULWARK_TEST_NATS_URL`. With `BULWARK_TEST_REQUIRE_SERVICES=1`
//! a missing URL fails the test instead of skipping the real-service half.

pub mod app;
pub mod probe;
pub mod procs;
pub mod services;

pub use app::{Backend, TestApp, TestAppBuilder, spawn_app};
