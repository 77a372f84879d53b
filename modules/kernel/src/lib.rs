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

/// Make rustls' `ring` provider the process default, once (later calls do nothing). With more
/// than one provider compiled in (the data stack brings `aws-lc-rs`), rustls cannot pick one by
/// itself, and a library that asks for the default (sqlx's TLS, for one) would panic at its
/// first TLS connection. The app calls this before anything connects.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod crypto_tests {
    /// With the provider installed, a client config builds from the process default.
    #[test]
    fn a_default_tls_client_config_builds() {
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let roots = rustls::RootCertStore::empty();
        let _config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
    }
}
