//! Embeds the web UI into the daemon at compile time: every file under
//! `web/dist` (built by `scripts/build-web`) becomes an entry of a static
//! table (`include_bytes!`), so `vireo serve` is one file to deploy. When the
//! UI has not been built, the table is empty and the daemon answers `/` with
//! a page saying how to build it: the Rust build never needs node.
//!
//! `VIREO_WEB_DIST=DIR` embeds another directory instead.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_type()?.is_dir() {
            collect(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let Some(rel) = rel.to_str() else {
                panic!("web/dist: file name is not UTF-8: {}", path.display());
            };
            out.push((rel.replace('\\', "/"), path.clone()));
        }
    }
    Ok(())
}

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let web = manifest.join("..").join("web");
    println!("cargo:rerun-if-env-changed=VIREO_WEB_DIST");
    let dist = std::env::var_os("VIREO_WEB_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| web.join("dist"));
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        // Vite rewrites dist/ on every build, which changes its mtime.
        println!("cargo:rerun-if-changed={}", dist.display());
        collect(&dist, &dist, &mut files)
            .unwrap_or_else(|e| panic!("reading the web UI in {}: {e}", dist.display()));
        files.sort();
    } else if web.is_dir() {
        // Not built: build again once web/ changes (dist/ appears there).
        println!("cargo:rerun-if-changed={}", web.display());
    }
    let mut code = String::from(
        "/// The web UI's files (path under web/dist, contents), sorted by path.\n\
         pub static FILES: &[(&str, &[u8])] = &[\n",
    );
    for (rel, path) in &files {
        let abs = path.canonicalize().unwrap_or_else(|_| path.clone());
        let _ = writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?})),",
            abs.display().to_string()
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("web_assets.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
