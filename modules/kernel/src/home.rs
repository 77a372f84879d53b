//! The front door, `GET /`: a small server-rendered page with the version, the compiled-in and
//! enabled modules, the enabled modules' pages, the API docs and the operational endpoints.
//! It needs no token; what it lists that needs one says so.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::auth::Role;

const TEMPLATE: &str = include_str!("../assets/home.html");

/// A browser page a module serves (declared in [`crate::module::ModuleParts::pages`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Link text: `Order book`.
    pub title: String,
    /// Absolute path. It may be a template with `{param}` segments (`/orders/{id}`): the home
    /// page then shows it and the description says where the parameter comes from.
    pub path: String,
    /// One or two sentences: what the page is and how to open it.
    pub description: String,
    /// The least role the page's token must carry; `None` for a page anyone may open.
    pub role: Option<Role>,
}

impl Page {
    pub fn new(
        title: impl Into<String>,
        path: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            path: path.into(),
            description: description.into(),
            role: None,
        }
    }

    /// The page needs a token carrying `role` (or one that grants it).
    pub fn role(mut self, role: Role) -> Self {
        self.role = Some(role);
        self
    }

    /// Does the path have parameters to fill in (so it cannot be linked as it is)?
    pub fn is_template(&self) -> bool {
        self.path.contains('{')
    }
}

/// One module as the home page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeModule {
    pub name: String,
    /// Runs in this process (`modules.enabled`); otherwise only compiled in.
    pub enabled: bool,
    /// Its pages; empty unless enabled.
    pub pages: Vec<Page>,
}

/// What the home page shows, gathered once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Home {
    pub version: String,
    /// Every module this binary can run, compiled-in order; each says whether it is enabled.
    pub modules: Vec<HomeModule>,
}

impl Home {
    /// `compiled`: the modules compiled into the binary; `enabled`: each module this process
    /// started, with the pages it declared. Pages of modules that are not enabled are dropped.
    pub fn new<'a>(
        version: impl Into<String>,
        compiled: impl IntoIterator<Item = &'a str>,
        enabled: impl IntoIterator<Item = (&'a str, Vec<Page>)>,
    ) -> Self {
        let mut modules: Vec<HomeModule> = compiled
            .into_iter()
            .map(|name| HomeModule {
                name: name.to_owned(),
                enabled: false,
                pages: Vec::new(),
            })
            .collect();
        for (name, pages) in enabled {
            match modules.iter_mut().find(|m| m.name == name) {
                Some(m) => {
                    m.enabled = true;
                    m.pages.extend(pages);
                }
                // Started but not in the compiled list (a test harness's extra module).
                None => modules.push(HomeModule {
                    name: name.to_owned(),
                    enabled: true,
                    pages,
                }),
            }
        }
        Self {
            version: version.into(),
            modules,
        }
    }

    /// The page's HTML. `metrics_listen`: the separate metrics address, when `/metrics` is not
    /// on the main port.
    pub fn render(&self, metrics_listen: Option<SocketAddr>) -> String {
        let mut modules = String::new();
        for m in &self.modules {
            let name = escape(&m.name);
            if m.enabled {
                let _ = writeln!(
                    modules,
                    r#"  <li data-module="{name}" data-enabled="true"><b>{name}</b>: enabled. Status: <code>GET /api/{name}/status</code> <span class="token">token: viewer</span></li>"#
                );
            } else {
                let _ = writeln!(
                    modules,
                    r#"  <li class="off" data-module="{name}" data-enabled="false"><b>{name}</b>: compiled in, not enabled in this process (<code>modules.enabled</code>)</li>"#
                );
            }
        }
        if self.modules.is_empty() {
            modules
                .push_str("  <li class=\"muted\">No module is compiled into this binary.</li>\n");
        }

        let mut pages = String::new();
        for m in self.modules.iter().filter(|m| m.enabled) {
            for p in &m.pages {
                let path = escape(&p.path);
                let title = escape(&p.title);
                let head = if p.is_template() {
                    format!("<b>{title}</b> <code>{path}</code>")
                } else {
                    format!(r#"<a href="{path}">{title}</a> <code>{path}</code>"#)
                };
                let token = match p.role {
                    Some(r) => format!(r#"<span class="token">token: {}</span>"#, r.as_str()),
                    None => r#"<span class="open">no token</span>"#.to_owned(),
                };
                let _ = writeln!(
                    pages,
                    r#"  <li data-module="{}" data-path="{path}">{head} ({}) {token}<br>{}</li>"#,
                    escape(&m.name),
                    escape(&m.name),
                    escape(&p.description),
                );
            }
        }
        if pages.is_empty() {
            pages.push_str("  <li class=\"muted\">No enabled module has a page yet.</li>\n");
        }

        let metrics = match metrics_listen {
            None => r#"<li><a href="/metrics">/metrics</a>: Prometheus metrics <span class="open">no token</span></li>"#.to_owned(),
            Some(addr) => format!(
                r#"<li id="metrics-elsewhere"><code>/metrics</code>: Prometheus metrics, served on the separate metrics listener <code>server.metrics_listen = {}</code>, not on this port <span class="open">no token</span></li>"#,
                escape(&addr.to_string())
            ),
        };

        fill(
            TEMPLATE,
            &[
                ("version", escape(&self.version)),
                ("modules", modules),
                ("pages", pages),
                ("metrics", metrics),
            ],
        )
    }
}

/// Replace each `{{name}}` of `template` in one pass, so a value is never itself scanned for
/// placeholders. An unknown name is left as it is.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}").and_then(|end| {
            let name = &after[..end];
            values
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (v, end))
        }) {
            Some((value, end)) => {
                out.push_str(value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Escape text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The placeholder of the per-response nonce in a self-contained page (on its `<script>` and
/// `<style>` tags).
pub const NONCE_MARK: &str = "__CSP_NONCE__";

/// The Content-Security-Policy of a self-contained page: its own inline script and style (by
/// nonce) and calls to its own origin; no other origin, no frames, no plugins, no forms posting
/// elsewhere.
pub fn page_csp(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// Serve a module's self-contained HTML page (`html` carries [`NONCE_MARK`]) with a fresh nonce,
/// its CSP, `no-store` and `no-referrer`.
pub fn nonce_page(html: &str) -> impl axum::response::IntoResponse + use<> {
    use axum::http::header;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    (
        [
            (header::CONTENT_SECURITY_POLICY, page_csp(&nonce)),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        axum::response::Html(html.replace(NONCE_MARK, &nonce)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> Home {
        Home::new(
            "1.2.3",
            ["m1", "m2", "m3"],
            [
                ("m1", vec![]),
                (
                    "m2",
                    vec![
                        Page::new("Room", "/m2/{id}", "Needs an id.").role(Role::Viewer),
                        Page::new("<Lobby>", "/m2/lobby?a=1&b=2", "{{pages}} <script>"),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn lists_compiled_and_enabled_modules_distinctly() {
        let html = home().render(None);
        assert!(html.contains("<title>Bulwark</title>"));
        assert!(html.contains(r#"<span class="version" id="version">1.2.3</span>"#));
        assert!(html.contains(r#"data-module="m1" data-enabled="true""#));
        assert!(html.contains(r#"data-module="m2" data-enabled="true""#));
        assert!(html.contains(r#"data-module="m3" data-enabled="false""#));
        assert!(html.contains(r#"<a href="/metrics">"#));
        for name in ["version", "modules", "metrics"] {
            assert!(!html.contains(&format!("{{{{{name}}}}}")), "{name} filled");
        }
        // The one left is the text of a page description, not the placeholder.
        assert_eq!(html.matches("{{pages}}").count(), 1);
    }

    #[test]
    fn template_pages_are_shown_not_linked_and_everything_is_escaped() {
        let html = home().render(None);
        assert!(html.contains("<b>Room</b> <code>/m2/{id}</code>"));
        assert!(!html.contains(r#"href="/m2/{id}""#));
        assert!(html.contains(r#"<span class="token">token: viewer</span>"#));
        assert!(html.contains(r#"<a href="/m2/lobby?a=1&amp;b=2">&lt;Lobby&gt;</a>"#));
        // A value is not scanned for placeholders, and markup in it is inert.
        assert!(html.contains("{{pages}} &lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn pages_of_modules_not_enabled_are_dropped() {
        let h = Home::new("1", ["m2"], std::iter::empty::<(&str, Vec<Page>)>());
        let html = h.render(None);
        assert!(html.contains(r#"data-module="m2" data-enabled="false""#));
        assert!(html.contains("No enabled module has a page yet."));
    }

    #[test]
    fn separate_metrics_port_is_named_not_linked() {
        let addr: SocketAddr = "127.0.0.1:9090".parse().expect("addr");
        let html = home().render(Some(addr));
        assert!(!html.contains(r#"href="/metrics""#));
        assert!(html.contains("server.metrics_listen = 127.0.0.1:9090"));
    }

    #[test]
    fn an_extra_started_module_is_listed_as_enabled() {
        let h = Home::new("1", ["m1"], [("probe", vec![])]);
        assert_eq!(h.modules.len(), 2);
        assert!(h.modules[1].enabled);
    }

    #[test]
    fn fill_leaves_unknown_and_unclosed_placeholders() {
        assert_eq!(fill("a{{x}}b{{y", &[("z", "1".into())]), "a{{x}}b{{y");
        assert_eq!(fill("{{x}}{{x}}", &[("x", "<>".into())]), "<><>");
    }
}
