//! The pipeline page (P4), `GET /pipeline/`: one self-contained HTML file with its script
//! and style inline, nothing loaded from elsewhere. It calls the REST API under
//! `/api/pipeline/` with the token it was opened with (`?token=`, kept in session storage
//! and removed from the address bar). See docs/pipeline.md, "Web UI".

use axum::http::header;
use axum::response::{Html, IntoResponse};
use bulwark_kernel::home::Page;

/// The page, as written in `assets/pipeline.html`.
const HTML: &str = include_str!("../assets/pipeline.html");

/// Where the page is served.
pub const PATH: &str = "/pipeline/";

/// The placeholder of the per-response nonce in [`HTML`] (on its `<script>` and `<style>`).
const NONCE_MARK: &str = "__CSP_NONCE__";

/// The page's Content-Security-Policy: its own inline script and style (by nonce) and calls to
/// its own origin; no other origin, no frames, no plugins, no forms posting elsewhere.
fn csp(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `GET /pipeline/`: the single-page pipeline app (DAGs, grid, graph, task logs, trigger, clear, backfill). It needs
/// no token to load; every API call it makes does.
#[utoipa::path(get, path = "/pipeline/", tag = "pipeline",
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
pub async fn page() -> impl IntoResponse {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    (
        [
            (header::CONTENT_SECURITY_POLICY, csp(&nonce)),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        Html(HTML.replace(NONCE_MARK, &nonce)),
    )
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(page))]
pub struct PageApi;

/// The home page's entry for the pipeline page.
pub fn home_entry() -> Page {
    Page::new(
        "Pipelines",
        PATH,
        "DAGs with their last and next runs, a grid of runs by tasks coloured by state, the \
         graph, each task's log per try (live while it runs), and trigger, clear and backfill \
         for admins. Open it as /pipeline/?token=TOKEN with a token of role viewer or admin \
         (bulwark token issue --sub NAME --role admin).",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nonce_mark_is_on_a_script_or_style_tag() {
        let marks = HTML.matches(NONCE_MARK).count();
        let tags = HTML
            .matches(&format!(r#"<script nonce="{NONCE_MARK}">"#))
            .count()
            + HTML
                .matches(&format!(r#"<style nonce="{NONCE_MARK}">"#))
                .count();
        assert_eq!(marks, 2);
        assert_eq!(marks, tags);
        // Nothing outside the page: no external script, style or image.
        assert!(!HTML.contains("src=\"http"));
        assert!(!HTML.contains("href=\"http"));
    }

    #[test]
    fn the_policy_names_the_nonce_and_no_other_origin() {
        let p = csp("abc");
        assert!(p.contains("script-src 'nonce-abc'"));
        assert!(p.contains("connect-src 'self'"));
        assert!(!p.contains("unsafe"));
    }
}
