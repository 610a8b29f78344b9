//! The static site's privacy settings: one Content-Security-Policy in the page and in the
//! headers file static hosts read, and the page's pre-download check reads it like a browser.

use sefi::app::catalog::{ModelSource, PRESETS, csp_allows};

fn page_policy() -> String {
    let html = std::fs::read_to_string("index.html").unwrap();
    let start = html.find("content=\"default-src").expect("a CSP meta tag") + "content=\"".len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_string()
}

#[test]
fn the_headers_file_carries_the_page_policy() {
    let headers = std::fs::read_to_string("www/_headers").unwrap();
    let line = headers
        .lines()
        .find_map(|l| l.trim().strip_prefix("Content-Security-Policy: "))
        .expect("a Content-Security-Policy header");
    assert_eq!(line, page_policy());
}

#[test]
fn presets_and_the_hub_cdn_are_allowed_and_nothing_else() {
    let policy = page_policy();
    let origin = "https://sefi.example";
    for p in PRESETS {
        let source = ModelSource::parse(p.address, origin).unwrap();
        assert!(
            csp_allows(&policy, source.address(), origin),
            "{}",
            p.address
        );
    }
    for cdn in [
        "https://cdn-lfs.huggingface.co/x",
        "https://cas-bridge.xethub.hf.co/x",
        "https://us.aws.cdn.hf.co/x",
    ] {
        assert!(csp_allows(&policy, cdn, origin), "{cdn}");
    }
    assert!(csp_allows(
        &policy,
        "https://sefi.example/models/a/",
        origin
    ));
    for other in [
        "https://example.org/model.safetensors",
        "https://evil-huggingface.co/x",
        "http://huggingface.co/x",
    ] {
        assert!(!csp_allows(&policy, other, origin), "{other}");
    }
}
