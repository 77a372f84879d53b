//! Every end-to-end suite in one test binary (`cargo test -p bulwark-tests --test it`): the
//! whole application is linked once, not once per suite. One module per area; a new suite is a
//! file beside this one and a `mod` line below. Filter by module: `--test it -- cache::`.
//!
//! The suites share one process: the metrics recorder, the tracer and the log filter are
//! installed once, by the first application. Read metrics relative to a value taken before,
//! or run the test in a process of its own with `bulwark_tests::isolated!`.

mod annotation;
mod annotation_export;
mod annotation_page;
mod auction;
mod auction_kill;
mod bus_conformance;
mod bus_kill;
mod bus_lag;
mod cache;
mod cache_queries;
mod cli;
mod database;
mod drain;
mod http;
mod jwks;
mod kv_conformance;
mod logs;
mod module_cli;
mod otlp;
mod pipeline;
mod pipeline_ballista;
mod reporting;
mod resilience;
mod services;
