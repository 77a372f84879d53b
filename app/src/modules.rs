//! The only place that knows which modules exist (each behind its cargo feature).

use std::sync::Arc;

use bulwark_kernel::module::Module;

/// Every module compiled into this binary, in start order.
// Pushed one by one because each line is behind its own feature.
#[allow(clippy::vec_init_then_push)]
pub fn compiled() -> Vec<Arc<dyn Module>> {
    #[allow(unused_mut)]
    let mut modules: Vec<Arc<dyn Module>> = Vec::new();
    #[cfg(feature = "cache")]
    modules.push(Arc::new(bulwark_cache::CacheModule));
    #[cfg(feature = "auction")]
    modules.push(Arc::new(bulwark_auction::AuctionModule));
    #[cfg(feature = "annotation")]
    modules.push(Arc::new(bulwark_annotation::AnnotationModule));
    #[cfg(feature = "pipeline")]
    modules.push(Arc::new(bulwark_pipeline::PipelineModule));
    #[cfg(feature = "reporting")]
    modules.push(Arc::new(bulwark_reporting::ReportingModule));
    modules
}

/// Names of the compiled-in modules.
pub fn compiled_names() -> Vec<&'static str> {
    compiled().iter().map(|m| m.name()).collect()
}
