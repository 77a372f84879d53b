//! The only place that knows which modules exist. Each entry is a module's name (also its
//! cargo feature, config section, URL prefix and migration set) and its value; the kernel and
//! the scripts get the list from here (`bulwark modules` prints it).
//!
//! Modules start in this order, so a module that uses another's service
//! (`Context::service`) is listed after it.

use std::sync::Arc;

use bulwark_kernel::module::Module;

macro_rules! modules {
    ($($name:literal => $module:expr),* $(,)?) => {
        /// Every module of the codebase, compiled into this binary or not (a config section
        /// for one that is not compiled in is ignored with a warning instead of refused).
        pub const KNOWN: &[&str] = &[$($name),*];

        /// Every module compiled into this binary, in start order.
        // Pushed one by one because each line is behind its own feature.
        #[allow(clippy::vec_init_then_push)]
        pub fn compiled() -> Vec<Arc<dyn Module>> {
            #[allow(unused_mut)]
            let mut modules: Vec<Arc<dyn Module>> = Vec::new();
            $(
                #[cfg(feature = $name)]
                modules.push(Arc::new($module));
            )*
            modules
        }
    };
}

modules! {
    "cache" => bulwark_cache::CacheModule,
    "auction" => bulwark_auction::AuctionModule,
    "annotation" => bulwark_annotation::AnnotationModule,
    "pipeline" => bulwark_pipeline::PipelineModule,
    "reporting" => bulwark_reporting::ReportingModule,
}

/// Names of the compiled-in modules.
pub fn compiled_names() -> Vec<&'static str> {
    compiled().iter().map(|m| m.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each module's `name()` is the name it is listed under (the cfg line and the feature).
    #[test]
    fn compiled_modules_answer_to_their_listed_names() {
        let names = compiled_names();
        let listed: Vec<&str> = KNOWN
            .iter()
            .copied()
            .filter(|n| names.contains(n))
            .collect();
        assert_eq!(
            names, listed,
            "compiled modules out of list order or misnamed"
        );
    }

    /// The app's cargo features are exactly the listed modules (plus `default`).
    #[test]
    fn every_listed_module_has_a_cargo_feature() {
        let manifest = include_str!("../Cargo.toml");
        let table: toml::Table = toml::from_str(manifest).expect("app/Cargo.toml parses");
        let features = table
            .get("features")
            .and_then(|f| f.as_table())
            .expect("[features]");
        let mut declared: Vec<&str> = features
            .keys()
            .map(String::as_str)
            .filter(|f| *f != "default")
            .collect();
        declared.sort_unstable();
        let mut known = KNOWN.to_vec();
        known.sort_unstable();
        assert_eq!(declared, known);
    }

    /// Each compiled-in module has its migration set, in the same order (the migrations crate
    /// keeps its own per-module features and `sets()` lines).
    #[test]
    fn every_compiled_module_has_its_migration_set() {
        let sets: Vec<&str> = bulwark_migrations::sets()
            .iter()
            .map(|s| s.module())
            .filter(|m| *m != "kernel")
            .collect();
        assert_eq!(sets, compiled_names());
    }

    /// The kernel must not know the modules: no module name as a word (in code, strings or
    /// comments) in its sources. Identifiers are split at `_` and case is ignored, so
    /// `AUCTION_BIDS` or `Cache::new` count too. HTTP's own `Cache-Control` header is not a
    /// module name, so it is taken out of a line before the check.
    #[test]
    fn no_module_name_is_spelled_in_the_kernel() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/kernel");
        let mut found = Vec::new();
        let mut dirs = vec![root.join("src")];
        let mut files = vec![root.join("Cargo.toml")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read kernel dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        assert!(
            files.len() > 10,
            "kernel sources not found under {}",
            root.display()
        );
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for (no, line) in text.lines().enumerate() {
                let lower = line
                    .to_ascii_lowercase()
                    .replace("cache_control", "")
                    .replace("cache-control", "");
                let hit = lower
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .map(|w| w.to_ascii_lowercase())
                    .find(|w| KNOWN.contains(&w.as_str()));
                if let Some(word) = hit {
                    found.push(format!("{}:{}: `{word}`: {line}", path.display(), no + 1));
                }
            }
        }
        assert!(
            found.is_empty(),
            "module names in the kernel:\n{}",
            found.join("\n")
        );
    }
}
