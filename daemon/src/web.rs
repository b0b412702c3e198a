//! The web UI, embedded at compile time (see `daemon/build.rs`) and served
//! at `/`: its files by path, `index.html` for every other path that is not
//! the API (the UI routes in the browser), never for `/v1/*` or `/metrics`.
//! Content-hashed files under `/assets/` are cached for a year; `index.html`
//! is revalidated on every load, so a new daemon serves its new UI at once.

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// The embedded files: (path under `web/dist`, contents), sorted by path.
pub fn files() -> &'static [(&'static str, &'static [u8])] {
    assets::FILES
}

/// True when the build embedded a UI (always, from the committed web/dist,
/// unless `VIREO_WEB_DIST` named a directory without one).
pub fn built() -> bool {
    files().iter().any(|(p, _)| *p == "index.html")
}

/// What the browser may load and where it may connect: only this origin.
/// (xterm.js sets inline styles, hence `style-src 'unsafe-inline'`.)
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; \
                   base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_CACHE: &str = "no-cache";

/// The page `/` shows when the binary was built without the UI.
const NOT_BUILT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vireo: web UI not built</title>
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#1f2328;line-height:1.5}code,pre{background:#eaeef2;padding:.1em .3em;border-radius:4px}</style></head>
<body><h1>The web UI is not in this build</h1>
<p>This <code>vireo</code> binary was compiled from a source tree without <code>web/dist</code> (or with <code>VIREO_WEB_DIST</code> naming an empty directory), so it has no UI to serve.
The REST API works (it is under <code>/v1/</code>, described at <a href="/v1/openapi.json">/v1/openapi.json</a>).</p>
<p>To get the UI, build it (needs Node.js and npm), then rebuild vireo:</p>
<pre>scripts/build-web
cargo build --release</pre>
</body></html>
"#;

/// The content type of an embedded file, by its extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        _ => "application/octet-stream",
    }
}

/// True for the paths that belong to the API, never to the UI: `/metrics`,
/// and `/v1/...` or any other version (`/v2/...` is the API's JSON 404).
pub fn is_api_path(path: &str) -> bool {
    if path == "/metrics" {
        return true;
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    first.len() > 1 && first.starts_with('v') && first[1..].bytes().all(|b| b.is_ascii_digit())
}

fn page(
    status: StatusCode,
    ctype: &'static str,
    cache: &'static str,
    body: &'static [u8],
) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if ctype.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    res
}

/// Answer a GET/HEAD of a non-API `path` from `files`; `None` when the path
/// is the API's or the method is not GET/HEAD (the caller answers those).
pub fn respond(
    files: &'static [(&'static str, &'static [u8])],
    method: &Method,
    path: &str,
) -> Option<Response> {
    if is_api_path(path) || (method != Method::GET && method != Method::HEAD) {
        return None;
    }
    let find = |p: &str| files.iter().find(|(name, _)| *name == p).map(|(_, b)| *b);
    let Some(index) = find("index.html") else {
        return Some(page(
            StatusCode::OK,
            "text/html; charset=utf-8",
            NO_CACHE,
            NOT_BUILT.as_bytes(),
        ));
    };
    let rel = path.trim_start_matches('/');
    if !rel.is_empty() && rel != "index.html" {
        if let Some(body) = find(rel) {
            let cache = if rel.starts_with("assets/") {
                IMMUTABLE
            } else {
                NO_CACHE
            };
            return Some(page(StatusCode::OK, content_type(rel), cache, body));
        }
        if rel.starts_with("assets/") {
            // A missing script must not come back as HTML.
            return Some(page(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                NO_CACHE,
                b"no such file in this vireo's web UI\n",
            ));
        }
    }
    Some(page(
        StatusCode::OK,
        "text/html; charset=utf-8",
        NO_CACHE,
        index,
    ))
}

/// The router's fallback: the UI for non-API GET/HEAD paths, else the API's
/// JSON 404/405.
pub async fn fallback(method: Method, uri: Uri) -> Response {
    if let Some(res) = respond(files(), &method, uri.path()) {
        return res;
    }
    if is_api_path(uri.path()) {
        crate::api::not_found().await.into_response()
    } else {
        crate::api::method_not_allowed().await.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static UI: &[(&str, &[u8])] = &[
        ("assets/index-abc123.css", b"body{}"),
        ("assets/index-abc123.js", b"console.log(1)"),
        ("favicon.svg", b"<svg/>"),
        ("index.html", b"<!doctype html><title>vireo</title>"),
    ];

    fn get(files: &'static [(&'static str, &'static [u8])], path: &str) -> Response {
        respond(files, &Method::GET, path).unwrap_or_else(|| panic!("{path} not served"))
    }

    fn head(res: &Response, name: header::HeaderName) -> &str {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    async fn body(res: Response) -> Vec<u8> {
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn files_get_their_types_and_cache_headers() {
        let js = get(UI, "/assets/index-abc123.js");
        assert_eq!(js.status(), StatusCode::OK);
        assert_eq!(
            head(&js, header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(head(&js, header::CACHE_CONTROL), IMMUTABLE);
        assert_eq!(head(&js, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert_eq!(body(js).await, b"console.log(1)");
        let css = get(UI, "/assets/index-abc123.css");
        assert_eq!(head(&css, header::CONTENT_TYPE), "text/css; charset=utf-8");
        let svg = get(UI, "/favicon.svg");
        assert_eq!(head(&svg, header::CONTENT_TYPE), "image/svg+xml");
        assert_eq!(head(&svg, header::CACHE_CONTROL), NO_CACHE);
        let index = get(UI, "/");
        assert_eq!(
            head(&index, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(head(&index, header::CACHE_CONTROL), NO_CACHE);
        assert!(head(&index, header::CONTENT_SECURITY_POLICY).contains("frame-ancestors 'none'"));
        assert_eq!(body(index).await, b"<!doctype html><title>vireo</title>");
    }

    #[tokio::test]
    async fn unknown_ui_paths_get_index_html_but_missing_assets_404() {
        for path in [
            "/vms/web",
            "/vms/my.vm/edit",
            "/wall",
            "/index.html",
            "/login",
        ] {
            let res = get(UI, path);
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            assert_eq!(
                body(res).await,
                b"<!doctype html><title>vireo</title>",
                "{path}"
            );
        }
        let res = get(UI, "/assets/index-gone.js");
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert!(head(&res, header::CONTENT_TYPE).starts_with("text/plain"));
    }

    #[test]
    fn the_api_and_other_methods_are_never_the_ui() {
        for path in [
            "/v1", "/v1/", "/v1/vms", "/v1/nope", "/v2/vms", "/v10", "/metrics",
        ] {
            assert!(respond(UI, &Method::GET, path).is_none(), "{path}");
        }
        assert!(respond(UI, &Method::POST, "/").is_none());
        assert!(respond(UI, &Method::DELETE, "/vms/web").is_none());
        assert!(respond(UI, &Method::HEAD, "/").is_some());
        assert!(!is_api_path("/v1x"));
        assert!(!is_api_path("/vms/v1"));
        assert!(!is_api_path("/v"));
        assert!(!is_api_path("/metricsx"));
    }

    #[tokio::test]
    async fn without_a_built_ui_every_page_says_how_to_build_it() {
        static NONE: &[(&str, &[u8])] = &[];
        for path in ["/", "/vms/web", "/assets/index-abc123.js"] {
            let res = get(NONE, path);
            assert_eq!(res.status(), StatusCode::OK);
            let text = String::from_utf8(body(res).await).unwrap();
            assert!(text.contains("scripts/build-web"), "{text}");
        }
    }

    /// A plain `cargo build` embeds the committed web/dist, byte for byte
    /// (web/dist used to be built only by scripts/build-web, so a build
    /// from a clean clone served the "not built" page).
    #[test]
    fn a_plain_build_embeds_the_committed_ui() {
        if option_env!("VIREO_WEB_DIST").is_some() {
            eprintln!("skipping: VIREO_WEB_DIST chose another directory");
            return;
        }
        assert!(built(), "web/dist/index.html was not embedded");
        let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/dist");
        let mut on_disk = Vec::new();
        let mut dirs = vec![dist.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let rel = p.strip_prefix(&dist).unwrap().to_str().unwrap().to_string();
                    on_disk.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        on_disk.sort();
        let embedded: Vec<(String, Vec<u8>)> = files()
            .iter()
            .map(|(n, b)| (n.to_string(), b.to_vec()))
            .collect();
        assert_eq!(embedded.len(), on_disk.len());
        for ((en, eb), (dn, db)) in embedded.iter().zip(&on_disk) {
            assert_eq!(en, dn);
            assert!(eb == db, "{en}: embedded bytes differ from web/dist");
        }
        let index =
            String::from_utf8_lossy(&on_disk.iter().find(|(n, _)| n == "index.html").unwrap().1)
                .to_string();
        assert!(index.contains("/assets/"), "{index}");
    }

    #[test]
    fn the_embedded_table_is_consistent() {
        // Whatever the build embedded: sorted, unique, and index.html present
        // exactly when the UI was built.
        let names: Vec<&str> = files().iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(built(), names.contains(&"index.html"));
        assert!(names
            .iter()
            .all(|n| !n.starts_with('/') && !n.contains("..")));
    }
}
