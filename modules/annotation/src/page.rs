//! The labeling page (N11), `GET /annotation/`: one self-contained HTML file with its script
//! and style inline, nothing loaded from elsewhere. It calls the REST API under
//! `/api/annotation/` with the token it was opened with (`?token=`, kept in session storage
//! and removed from the address bar). See docs/annotation.md, "Labeling page".

use axum::response::IntoResponse;
use bulwark_kernel::auth::Role;
use bulwark_kernel::home::Page;

/// The page, as written in `assets/annotation.html`.
const HTML: &str = include_str!("../assets/annotation.html");

/// Where the page is served.
pub const PATH: &str = "/annotation/";

#[cfg(test)]
use bulwark_kernel::home::{NONCE_MARK, page_csp as csp};

/// `GET /annotation/`: the single-page labeling app (projects, labeling, overview). It needs
/// no token to load; every API call it makes does.
#[utoipa::path(get, path = "/annotation/", tag = "annotation",
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
pub async fn page() -> impl IntoResponse {
    bulwark_kernel::home::nonce_page(HTML)
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(page))]
pub struct PageApi;

/// The home page's entry for the labeling page.
pub fn home_entry() -> Page {
    Page::new(
        "Labeling",
        PATH,
        "Label a project's items from the keyboard (1-9 pick, Enter submit, S skip, Z undo) \
         with a lock countdown, and watch its progress live. Open it as \
         /annotation/?token=TOKEN with a token of role annotator (bulwark token issue --sub \
         NAME --role annotator); the page keeps the token for the tab and removes it from the \
         address bar.",
    )
    .role(Role::Annotator)
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
