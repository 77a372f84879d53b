//! The pipeline page (P4), `GET /pipeline/`: one self-contained HTML file with its script
//! and style inline, nothing loaded from elsewhere. It calls the REST API under
//! `/api/pipeline/` with the token it was opened with (`?token=`, kept in session storage
//! and removed from the address bar). See docs/pipeline.md, "Web UI".

use axum::response::IntoResponse;
use bulwark_kernel::home::Page;

/// The page, as written in `assets/pipeline.html`.
const HTML: &str = include_str!("../assets/pipeline.html");

/// Where the page is served.
pub const PATH: &str = "/pipeline/";

#[cfg(test)]
use bulwark_kernel::home::{NONCE_MARK, page_csp as csp};

/// `GET /pipeline/`: the single-page pipeline app (DAGs, grid, graph, task logs, trigger, clear, backfill). It needs
/// no token to load; every API call it makes does.
#[utoipa::path(get, path = "/pipeline/", tag = "pipeline",
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
pub async fn page() -> impl IntoResponse {
    bulwark_kernel::home::nonce_page(HTML)
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
