//! Authentication and roles (K8): JWT bearer tokens.
//!
//! * HS256 with `auth.hs256_secret` (in embedded mode generated on first start into
//!   `<data_dir>/jwt-secret`, mode 0600), and `bulwark token issue` to mint local tokens;
//! * RS256/ES256 against `auth.jwks_url` (a production identity provider); keys are cached,
//!   refreshed every `auth.jwks_refresh`, and refetched (rate-limited) on an unknown `kid`.
//!
//! A verified token is remembered by its exact text (see [`VerifiedTokens`]) so a client that
//! sends the same token on every request pays for the signature check about once a minute.
//!
//! Handlers take [`Auth<R>`] as an extractor: 401 problem for a missing, malformed, expired or
//! wrongly signed token; 403 when the role does not satisfy `R`.

use std::collections::HashMap;
use std::io::Write as _;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::{AuthConfig, KernelConfig, Mode};
use crate::problem::Problem;

/// Roles carried in the token's role claim.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including administration.
    Admin,
    /// Labels data; can read what viewers read.
    Annotator,
    /// Accepts or rejects other people's labels; can label and read too.
    Reviewer,
    /// Places bids; can read what viewers read.
    Bidder,
    /// Reads.
    Viewer,
}

impl Role {
    /// Does holding `self` grant `required`? Admin grants all; reviewer grants annotator;
    /// every role grants viewer.
    pub fn grants(self, required: Role) -> bool {
        self == required
            || self == Role::Admin
            || required == Role::Viewer
            || (self == Role::Reviewer && required == Role::Annotator)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Annotator => "annotator",
            Role::Reviewer => "reviewer",
            Role::Bidder => "bidder",
            Role::Viewer => "viewer",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "annotator" => Some(Role::Annotator),
            "reviewer" => Some(Role::Reviewer),
            "bidder" => Some(Role::Bidder),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The token's `sub`.
    pub subject: String,
    pub roles: Vec<Role>,
}

impl Identity {
    pub fn has(&self, required: Role) -> bool {
        self.roles.iter().any(|r| r.grants(required))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token has no recognised role in claim `{0}`")]
    NoRole(String),
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
    #[error("cannot mint tokens: {0}")]
    CannotIssue(String),
    #[error("JWT secret file {path}: {source}")]
    SecretFile {
        path: String,
        source: std::io::Error,
    },
}

impl From<AuthError> for Problem {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::KeysUnavailable(_) => Problem::unavailable(err.to_string()),
            AuthError::Expired => {
                Problem::new(StatusCode::UNAUTHORIZED, "token-expired", "Token expired")
                    .detail(err.to_string())
            }
            AuthError::Missing => Problem::unauthorized(err.to_string()),
            _ => Problem::new(StatusCode::UNAUTHORIZED, "invalid-token", "Invalid token")
                .detail(err.to_string()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(flatten)]
    extra: serde_json::Map<String, serde_json::Value>,
}

enum Keys {
    Hs256 {
        decoding: DecodingKey,
        encoding: EncodingKey,
    },
    Jwks(Arc<Jwks>),
}

/// Verifies (and for HS256, mints) tokens.
pub struct Authenticator {
    keys: Keys,
    cfg: AuthConfig,
    verified: Arc<VerifiedTokens>,
}

/// How long a verified token is trusted without checking its signature again (at most; never
/// past its `exp`).
pub const VERIFIED_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Bound on remembered tokens; past it, expired ones are dropped, and if none were, all are.
const VERIFIED_TOKENS_MAX: usize = 10_000;

/// Tokens whose signature and claims were checked, by their exact text, with what they proved.
/// Envoy's JWT filter remembers verified tokens the same way: the signature check
/// (an HMAC, or an RSA/ECDSA verification with a JWKS) dominates the cost of an authenticated
/// request that is otherwise served from memory. Only the identical string hits; an entry lives
/// until the token's `exp` (plus leeway) and at most [`VERIFIED_TOKEN_TTL`]; a JWKS refresh
/// forgets them all, so a key rotated out stops authenticating within one refresh.
#[derive(Default)]
struct VerifiedTokens {
    entries: std::sync::Mutex<HashMap<String, VerifiedToken>>,
}

struct VerifiedToken {
    identity: Identity,
    /// `exp` plus leeway, seconds since the epoch.
    valid_until_secs: u64,
    trusted_until: Instant,
}

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<Identity> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(token)?;
        (Instant::now() < e.trusted_until && now_secs() <= e.valid_until_secs)
            .then(|| e.identity.clone())
    }

    fn put(&self, token: &str, identity: Identity, valid_until_secs: u64) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= VERIFIED_TOKENS_MAX {
            let secs = now_secs();
            entries.retain(|_, e| now < e.trusted_until && secs <= e.valid_until_secs);
            if entries.len() >= VERIFIED_TOKENS_MAX {
                entries.clear();
            }
        }
        entries.insert(
            token.to_owned(),
            VerifiedToken {
                identity,
                valid_until_secs,
                trusted_until: now + VERIFIED_TOKEN_TTL,
            },
        );
    }

    fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.keys {
            Keys::Hs256 { .. } => "hs256",
            Keys::Jwks(_) => "jwks",
        };
        f.debug_struct("Authenticator")
            .field("keys", &kind)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authenticator {
    /// From config: JWKS when `auth.jwks_url` is set, else HS256 with the configured secret,
    /// else (embedded mode) the secret in `<data_dir>/jwt-secret`, generated if missing.
    pub async fn from_config(cfg: &KernelConfig) -> Result<Self, AuthError> {
        if let Some(url) = &cfg.auth.jwks_url {
            let verified = Arc::new(VerifiedTokens::default());
            let jwks = Jwks::new(url.clone(), cfg.auth.jwks_refresh, verified.clone());
            if let Err(error) = jwks.refresh().await {
                tracing::warn!(message = "JWKS fetch failed at start; will retry.", %error);
            }
            jwks.clone().spawn_refresher();
            return Ok(Self {
                keys: Keys::Jwks(jwks),
                cfg: cfg.auth.clone(),
                verified,
            });
        }
        let secret = match &cfg.auth.hs256_secret {
            Some(s) => s.expose().to_owned(),
            None if cfg.mode == Mode::Embedded => {
                load_or_generate_secret(&secret_path(&cfg.data_dir))?
            }
            None => {
                return Err(AuthError::KeysUnavailable(
                    "auth.hs256_secret or auth.jwks_url is required".into(),
                ));
            }
        };
        Ok(Self::hs256(secret.as_bytes(), cfg.auth.clone()))
    }

    /// HS256 with an explicit secret.
    pub fn hs256(secret: &[u8], cfg: AuthConfig) -> Self {
        Self {
            keys: Keys::Hs256 {
                decoding: DecodingKey::from_secret(secret),
                encoding: EncodingKey::from_secret(secret),
            },
            cfg,
            verified: Arc::default(),
        }
    }

    /// Mint an HS256 token for `subject` with `role`, valid for `ttl`.
    pub fn issue(&self, subject: &str, role: Role, ttl: Duration) -> Result<String, AuthError> {
        let Keys::Hs256 { encoding, .. } = &self.keys else {
            return Err(AuthError::CannotIssue(
                "tokens come from the identity provider when auth.jwks_url is set".into(),
            ));
        };
        if subject.is_empty() {
            return Err(AuthError::CannotIssue("subject must not be empty".into()));
        }
        let iat = now_secs();
        let mut extra = serde_json::Map::new();
        extra.insert(
            self.cfg.role_claim.clone(),
            serde_json::Value::String(role.as_str().to_owned()),
        );
        let claims = MintClaims {
            sub: subject,
            iss: &self.cfg.issuer,
            aud: &self.cfg.audience,
            iat,
            exp: iat + ttl.as_secs().max(1),
            extra,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| AuthError::CannotIssue(e.to_string()))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.leeway = self.cfg.leeway.as_secs();
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        v
    }

    /// Verify a bearer token and return who it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(identity) = self.verified.get(token) {
            return Ok(identity);
        }
        let (identity, exp) = self.verify_signed(token).await?;
        let valid_until = exp.saturating_add(self.cfg.leeway.as_secs());
        self.verified.put(token, identity.clone(), valid_until);
        Ok(identity)
    }

    /// The full check: signature, algorithm, issuer, audience, expiry, role. Returns the
    /// identity and the token's `exp`.
    async fn verify_signed(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let (key, alg) = match &self.keys {
            Keys::Hs256 { decoding, .. } => {
                if header.alg != Algorithm::HS256 {
                    return Err(AuthError::Invalid(format!(
                        "algorithm {:?} not accepted",
                        header.alg
                    )));
                }
                (decoding.clone(), Algorithm::HS256)
            }
            Keys::Jwks(jwks) => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| AuthError::Invalid("token has no `kid`".into()))?;
                let (key, alg) = jwks.key(kid).await?;
                if header.alg != alg {
                    return Err(AuthError::Invalid(format!(
                        "algorithm {:?} does not match key {kid}",
                        header.alg
                    )));
                }
                (key, alg)
            }
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &self.validation(alg),
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::InvalidToken
            | jsonwebtoken::errors::ErrorKind::Base64(_) => AuthError::Malformed(e.to_string()),
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        // Required and checked by the validation above.
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let roles: Vec<Role> = match claims.get(&self.cfg.role_claim) {
            Some(serde_json::Value::String(s)) => Role::parse(s).into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().and_then(Role::parse))
                .collect(),
            _ => Vec::new(),
        };
        if roles.is_empty() {
            return Err(AuthError::NoRole(self.cfg.role_claim.clone()));
        }
        Ok((Identity { subject, roles }, exp))
    }
}

/// Where embedded mode keeps its generated secret.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt-secret")
}

fn load_or_generate_secret(path: &Path) -> Result<String, AuthError> {
    let err = |source| AuthError::SecretFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_owned()),
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "secret shorter than 32 characters",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(mut f) => {
            f.write_all(secret.as_bytes()).map_err(err)?;
            tracing::warn!(
                message = "Generated a JWT signing secret (mode 0600); mint tokens with `bulwark token issue`.",
                path = %path.display()
            );
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_generate_secret(path),
        Err(e) => Err(err(e)),
    }
}

/// Cached JSON Web Key Set of an identity provider.
struct Jwks {
    url: String,
    refresh_every: Duration,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
    last_fetch: RwLock<Option<Instant>>,
    /// Forgotten on every successful refresh.
    verified: Arc<VerifiedTokens>,
}

impl Jwks {
    fn new(url: String, refresh_every: Duration, verified: Arc<VerifiedTokens>) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Arc::new(Self {
            url,
            refresh_every,
            client,
            keys: RwLock::default(),
            last_fetch: RwLock::default(),
            verified,
        })
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        *self.last_fetch.write().await = Some(Instant::now());
        let set: JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| AuthError::KeysUnavailable(format!("JWKS is not valid JSON: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => continue,
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid, (k, alg));
                }
                Err(error) => tracing::warn!(message = "Skipping unusable JWK.", kid, %error),
            }
        }
        *self.keys.write().await = keys;
        self.verified.clear();
        Ok(())
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        if let Some(k) = self.keys.read().await.get(kid) {
            return Ok(k.clone());
        }
        // Unknown kid: the provider may have rotated. Refetch, at most once a second.
        let stale = self
            .last_fetch
            .read()
            .await
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
        if stale {
            self.refresh().await?;
        }
        self.keys
            .read()
            .await
            .get(kid)
            .cloned()
            .ok_or_else(|| AuthError::Invalid(format!("unknown signing key `{kid}`")))
    }

    fn spawn_refresher(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(self.refresh_every).await;
                if let Err(error) = self.refresh().await {
                    tracing::warn!(message = "JWKS refresh failed; keeping cached keys.", %error);
                }
            }
        });
    }
}

/// Role requirement of an [`Auth`] extractor.
pub trait RoleRequirement: Send + Sync + 'static {
    /// `None`: any authenticated caller.
    const ROLE: Option<Role>;
}

/// Marker types for [`Auth`].
pub mod require {
    use super::{Role, RoleRequirement};
    /// Any authenticated caller.
    pub struct Any;
    pub struct Admin;
    pub struct Annotator;
    pub struct Reviewer;
    pub struct Bidder;
    pub struct Viewer;
    impl RoleRequirement for Any {
        const ROLE: Option<Role> = None;
    }
    impl RoleRequirement for Admin {
        const ROLE: Option<Role> = Some(Role::Admin);
    }
    impl RoleRequirement for Annotator {
        const ROLE: Option<Role> = Some(Role::Annotator);
    }
    impl RoleRequirement for Reviewer {
        const ROLE: Option<Role> = Some(Role::Reviewer);
    }
    impl RoleRequirement for Bidder {
        const ROLE: Option<Role> = Some(Role::Bidder);
    }
    impl RoleRequirement for Viewer {
        const ROLE: Option<Role> = Some(Role::Viewer);
    }
}

/// Extractor: the caller's identity, with role `R` enforced.
pub struct Auth<R: RoleRequirement = require::Any>(pub Identity, PhantomData<R>);

impl<R: RoleRequirement> std::ops::Deref for Auth<R> {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.0
    }
}

/// The bearer token of a request: the `Authorization` header, or for WebSocket upgrades
/// (browsers cannot set headers there) the `access_token` query parameter.
fn bearer_token(parts: &Parts) -> Result<String, AuthError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Malformed("Authorization must be `Bearer <token>`".into()))?;
        return Ok(token.trim().to_owned());
    }
    let is_upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade
        && let Some(query) = parts.uri.query()
        && let Some(token) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("access_token="))
    {
        return Ok(token.to_owned());
    }
    Err(AuthError::Missing)
}

impl<S: Send + Sync, R: RoleRequirement> FromRequestParts<S> for Auth<R> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let authn = parts
            .extensions
            .get::<Arc<Authenticator>>()
            .cloned()
            .ok_or_else(|| Problem::internal("authenticator not installed"))?;
        let token = bearer_token(parts)?;
        let identity = authn.verify(&token).await?;
        if let Some(role) = R::ROLE
            && !identity.has(role)
        {
            return Err(Problem::forbidden(format!(
                "role `{}` required",
                role.as_str()
            )));
        }
        Ok(Auth(identity, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            hs256_secret: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            issuer: "bulwark".into(),
            audience: "bulwark".into(),
            role_claim: "role".into(),
            leeway: Duration::from_secs(0),
        }
    }

    #[test]
    fn role_grants() {
        assert!(Role::Admin.grants(Role::Bidder));
        assert!(Role::Bidder.grants(Role::Viewer));
        assert!(!Role::Viewer.grants(Role::Bidder));
        assert!(!Role::Annotator.grants(Role::Bidder));
        assert!(Role::Reviewer.grants(Role::Annotator));
        assert!(!Role::Annotator.grants(Role::Reviewer));
        assert!(!Role::Reviewer.grants(Role::Admin));
    }

    #[tokio::test]
    async fn issue_and_verify() {
        let a = Authenticator::hs256(&[7u8; 32], cfg());
        let t = a
            .issue("alice", Role::Bidder, Duration::from_secs(60))
            .expect("issue");
        let id = a.verify(&t).await.expect("verify");
        assert_eq!(id.subject, "alice");
        assert_eq!(id.roles, vec![Role::Bidder]);
    }

    #[tokio::test]
    async fn wrong_secret_and_garbage_are_rejected() {
        let a = Authenticator::hs256(&[7u8; 32], cfg());
        let b = Authenticator::hs256(&[8u8; 32], cfg());
        let t = b
            .issue("mallory", Role::Admin, Duration::from_secs(60))
            .expect("issue");
        assert!(matches!(a.verify(&t).await, Err(AuthError::Invalid(_))));
        assert!(matches!(
            a.verify("not-a-jwt").await,
            Err(AuthError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn verified_tokens_are_remembered_until_exp_only() {
        let a = Authenticator::hs256(&[7u8; 32], cfg());
        let t = a
            .issue("alice", Role::Viewer, Duration::from_secs(1))
            .expect("issue");
        assert!(a.verified.get(&t).is_none());
        let id = a.verify(&t).await.expect("verify");
        assert_eq!(
            a.verified.get(&t),
            Some(id),
            "remembered after a good check"
        );
        // Refused ones are not remembered.
        let forged = Authenticator::hs256(&[8u8; 32], cfg())
            .issue("mallory", Role::Admin, Duration::from_secs(60))
            .expect("issue");
        assert!(a.verify(&forged).await.is_err());
        assert!(a.verified.get(&forged).is_none());
        // Past `exp` (leeway 0) the remembered check no longer counts.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(matches!(a.verify(&t).await, Err(AuthError::Expired)));
    }

    #[test]
    fn generated_secret_is_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("bulwark-secret-{}", uuid::Uuid::new_v4()));
        let path = secret_path(&dir);
        let first = load_or_generate_secret(&path).expect("generate");
        let second = load_or_generate_secret(&path).expect("reload");
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
