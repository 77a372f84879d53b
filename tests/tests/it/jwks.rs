//! K8 with a production identity provider: ES256 tokens verified against a JWKS URL, keys
//! cached, refetched on an unknown `kid` (key rotation), wrong algorithms and unknown keys
//! refused. The keys below are throwaway test keys generated for this file.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_tests::{Backend, TestAppBuilder};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::sync::RwLock;

const K1_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHuE4BVseZPONtBLK
x7W7+QJkYe2iyW25YpWEeOTRrx+hRANCAAQmeeUNfUFi/FCT/wBZeAFrQCr9WpS0
MPF03iWQ6j9VoR1oIVYEenW9vrmvbUe0AY38Zv37bulltJU/IS1bT3Q8
-----END PRIVATE KEY-----";
const K1_X: &str = "JnnlDX1BYvxQk_8AWXgBa0Aq_VqUtDDxdN4lkOo_VaE";
const K1_Y: &str = "HWghVgR6db2-ua9tR7QBjfxm_ftu6WW0lT8hLVtPdDw";

const K2_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgXtnVxYKGO7PxTZpE
yobRC2nWeIrjvGV7vLEspsnYdjqhRANCAARMW2bhBefYKHCuTJp/V5ZZPjyGXHZ4
wSG36djCbW7eaIEQoS1evb6HJCA48C2XNN89IMRdZjaZ2uetafWUfrDQ
-----END PRIVATE KEY-----";
const K2_X: &str = "TFtm4QXn2Chwrkyaf1eWWT48hlx2eMEht-nYwm1u3mg";
const K2_Y: &str = "gRChLV69vockIDjwLZc03z0gxF1mNpna561p9ZR-sNA";

fn jwk(kid: &str, x: &str, y: &str) -> serde_json::Value {
    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": x, "y": y})
}

fn es256(kid: &str, pem: &str, role: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({"sub": "idp-user", "role": [role], "iss": "bulwark", "aud": "bulwark", "exp": now + 300});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(pem.as_bytes()).expect("pem"),
    )
    .expect("sign")
}

/// A stand-in identity provider serving `keys` at `/jwks.json`, counting fetches.
async fn start_idp(
    keys: Arc<RwLock<serde_json::Value>>,
    fetches: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    let idp = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (keys.clone(), fetches.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                axum::Json(k.read().await.clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, idp).await });
    addr
}

#[tokio::test]
async fn es256_tokens_verify_against_a_rotating_jwks() {
    let keys = Arc::new(RwLock::new(
        serde_json::json!({"keys": [jwk("k1", K1_X, K1_Y)]}),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let idp_addr = start_idp(keys.clone(), fetches.clone()).await;

    let app = TestAppBuilder::new(Backend::Embedded)
        .set("auth.jwks_url", format!("http://{idp_addr}/jwks.json"))
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "keys fetched once at start"
    );

    // A token signed by the provider's key works; the key is cached.
    let t1 = es256("k1", K1_PEM, "viewer");
    for _ in 0..3 {
        assert_eq!(app.get("/api/cache/status", Some(&t1)).await.status(), 200);
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "cached, not refetched per request"
    );

    // Roles come from an array claim too; wrong role is 403.
    assert_eq!(app.get("/api/admin/config", Some(&t1)).await.status(), 403);

    // A key the provider has not published yet: refused.
    let t2 = es256("k2", K2_PEM, "admin");
    assert_eq!(app.get("/api/admin/config", Some(&t2)).await.status(), 401);

    // The provider rotates: k2 published. An unknown kid triggers a (rate-limited) refetch.
    *keys.write().await =
        serde_json::json!({"keys": [jwk("k1", K1_X, K1_Y), jwk("k2", K2_X, K2_Y)]});
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/api/admin/config", Some(&t2)).await.status(), 200);

    // A token claiming k1 but signed with k2's private key: bad signature.
    let forged = es256("k1", K2_PEM, "admin");
    assert_eq!(
        app.get("/api/admin/config", Some(&forged)).await.status(),
        401
    );

    // HS256 tokens are not accepted when a JWKS is configured (no algorithm confusion).
    let hs = app.token(bulwark_kernel::auth::Role::Admin);
    assert_eq!(app.get("/api/admin/config", Some(&hs)).await.status(), 401);

    // Minting is refused: tokens come from the identity provider.
    let res = app
        .post_json(
            "/api/admin/tokens",
            Some(&t2),
            &serde_json::json!({"sub": "x", "role": "viewer"}),
        )
        .await;
    assert_eq!(res.status(), 409);
}

/// A key the provider stops publishing stops authenticating at the next refresh, even for a
/// token verified (and remembered) before.
#[tokio::test]
async fn a_key_rotated_out_stops_authenticating_after_the_next_refresh() {
    let keys = Arc::new(RwLock::new(
        serde_json::json!({"keys": [jwk("k1", K1_X, K1_Y)]}),
    ));
    let idp_addr = start_idp(keys.clone(), Arc::default()).await;
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("auth.jwks_url", format!("http://{idp_addr}/jwks.json"))
        .set("auth.jwks_refresh", "300ms")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let t1 = es256("k1", K1_PEM, "viewer");
    assert_eq!(app.get("/api/cache/status", Some(&t1)).await.status(), 200);
    *keys.write().await = serde_json::json!({"keys": [jwk("k2", K2_X, K2_Y)]});
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        app.get("/api/cache/status", Some(&t1)).await.status(),
        401,
        "a remembered token must not outlive its key"
    );
}
