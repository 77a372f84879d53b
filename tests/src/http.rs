//! Requests against one running instance, in process ([`crate::TestApp`]) or a child process
//! ([`crate::TestProcess`]); both dereference to [`Http`]: URLs, tokens, JSON requests and
//! the metrics endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_kernel::auth::{Authenticator, Role};
use bulwark_kernel::config::AuthConfig;
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;

/// An instance's addresses, an HTTP client and what it takes to mint tokens it accepts.
pub struct Http {
    pub client: reqwest::Client,
    /// The main listener.
    pub addr: SocketAddr,
    /// The separate metrics listener, when `server.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    auth: AuthConfig,
    /// The HS256 secret the instance verifies with, when known.
    secret: Option<Vec<u8>>,
}

impl Http {
    pub(crate) fn new(
        addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        auth: AuthConfig,
        secret: Option<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            addr,
            metrics_addr,
            auth,
            secret,
        })
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://<addr><path>` (`ws_url("")` is the base an `AuctionClient` wants).
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// A valid token for `role` (subject `test-<role>`), ten minutes long.
    pub fn token(&self, role: Role) -> String {
        self.token_for(&format!("test-{}", role.as_str()), role)
    }

    /// A valid token for subject `sub` with `role`, ten minutes long.
    pub fn token_for(&self, sub: &str, role: Role) -> String {
        let secret = self
            .secret
            .as_deref()
            .expect("this instance's HS256 secret is known (set auth.hs256_secret)");
        Authenticator::hs256(secret, self.auth.clone())
            .issue(sub, role, Duration::from_secs(600))
            .expect("issue token")
    }

    /// A request to `path`, with `Authorization: Bearer <token>` when a token is given.
    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let req = self.client.request(method, self.url(path));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        send(self.request(Method::GET, path, token)).await
    }

    /// `POST` `body` as JSON.
    pub async fn post_json<T: Serialize + ?Sized>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &T,
    ) -> Response {
        send(self.request(Method::POST, path, token).json(body)).await
    }

    /// `PUT` `body` as JSON.
    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &T,
    ) -> Response {
        send(self.request(Method::PUT, path, token).json(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Response {
        send(self.request(Method::DELETE, path, token)).await
    }

    /// The Prometheus text of `/metrics` (on the metrics listener when there is one). In
    /// process, the recorder is shared by every application of the test binary.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics_addr.unwrap_or(self.addr);
        let res = send(self.client.get(format!("http://{addr}/metrics"))).await;
        assert_eq!(res.status(), 200, "GET /metrics");
        res.text().await.expect("metrics text")
    }

    /// The sum of the series of metric `name` that carry every label in `labels`; `None` when
    /// none is exported. See [`crate::metrics::value`].
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        crate::metrics::value(&self.metrics_text().await, name, labels)
    }

    /// Poll `/readyz` until it answers 200, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        crate::services::eventually(timeout, || async {
            let res = self.client.get(self.url("/readyz")).send().await.ok()?;
            (res.status() == 200).then_some(())
        })
        .await
        .is_some()
    }
}

async fn send(req: RequestBuilder) -> Response {
    req.send().await.expect("request")
}
