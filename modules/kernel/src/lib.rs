//! The Bulwark kernel: everything the modules share. It names no module: the app hands it
//! the module list.
//!
//! Only this crate talks to the backing services; modules receive them through
//! [`module::Context`]. See docs/architecture.md for the code map and invariants.

pub mod auth;
pub mod bus;
pub mod config;
pub mod db;
pub mod home;
pub mod http;
pub mod kv;
pub mod log_format;
pub mod module;
pub mod problem;
pub mod readiness;
pub mod services;
pub mod shutdown;
pub mod telemetry;
pub mod ws;

pub use async_trait::async_trait;
