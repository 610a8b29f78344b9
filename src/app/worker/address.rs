//! The worker's address: its loader script, and the test parameters the page passes on to it.

/// The worker's loader script as trunk emits it (`data-bin="sefi-worker"` with
/// `data-loader-shim`); a same-origin script, so the CSP needs no `blob:` workers.
pub const LOADER: &str = "./sefi-worker_loader.js";

/// Test hook: `?max-binding-mib=N` in the page's address is passed on to the worker, which
/// then asks WebGPU for a device that binds at most N MiB of a buffer (WebGPU's default is
/// 128): a phone's or an integrated GPU's limits, on any GPU.
pub const MAX_BINDING_PARAM: &str = "max-binding-mib";

/// `?gpu-memory-mib=N` in the page's address tells the worker the GPU's memory, which
/// browsers do not: models, generations and training runs that the memory model says need
/// more are refused before they start, with what to change.
pub const GPU_MEMORY_PARAM: &str = "gpu-memory-mib";

/// The loader's address, with the page's `max-binding-mib` and `gpu-memory-mib` when it has
/// them.
pub fn loader_url(page_query: &str) -> String {
    let page = web_sys::UrlSearchParams::new_with_str(page_query).ok();
    let passed: Vec<String> = [MAX_BINDING_PARAM, GPU_MEMORY_PARAM]
        .into_iter()
        .filter_map(|name| {
            let mib = page.as_ref()?.get(name)?.parse::<u64>().ok()?;
            Some(format!("{name}={mib}"))
        })
        .collect();
    if passed.is_empty() {
        LOADER.to_string()
    } else {
        format!("{LOADER}?{}", passed.join("&"))
    }
}
