//! Embeds the web UI into the daemon at compile time: every file under
//! `web/dist` (built by `scripts/build-web`) becomes an entry of a static
//! table (`include_bytes!`), so `vireo serve` is one file to deploy. When the
//! UI has not been built, the table is empty and the daemon answers `/` with
//! a page saying how to build it: the Rust build never needs node.
//!
//! `VIREO_WEB_DIST=DIR` embeds another directory instead.
//!
//! It also records the git commit the binary is built from, for
//! `vireo --version` and `GET /v1/version`: `VIREO_GIT_COMMIT` when set
//! (packagers building from a tarball), else `git rev-parse --short HEAD`
//! when the source tree is a git checkout, else "unknown".

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

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The commit to report, and rerun-if-changed lines that rebuild when HEAD
/// moves (a new commit, a checkout).
/// Also says where it came from: "env", "git" or "none".
fn git_commit(root: &Path) -> (String, &'static str) {
    println!("cargo:rerun-if-env-changed=VIREO_GIT_COMMIT");
    if let Some(c) = std::env::var("VIREO_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        return (c.trim().to_string(), "env");
    }
    // .git is a directory in a clone, a file in a worktree.
    if !root.join(".git").exists() {
        return ("unknown".into(), "none");
    }
    if let Some(dir) = git(root, &["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(common) = git(root, &["rev-parse", "--git-common-dir"]) {
            let common = root.join(common);
            if let Some(head_ref) = git(root, &["symbolic-ref", "-q", "HEAD"]) {
                let r = common.join(head_ref);
                if r.exists() {
                    println!("cargo:rerun-if-changed={}", r.display());
                }
            }
            let packed = common.join("packed-refs");
            if packed.exists() {
                println!("cargo:rerun-if-changed={}", packed.display());
            }
        }
    }
    match git(root, &["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => (c, "git"),
        None => ("unknown".into(), "none"),
    }
}

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest.join("..");
    let (commit, source) = git_commit(&root);
    println!("cargo:rustc-env=VIREO_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=VIREO_GIT_COMMIT_SOURCE={source}");
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
