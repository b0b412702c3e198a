//! What this build is: the package version, the git commit it was built
//! from (see `daemon/build.rs`) and the version of the REST API it serves.
//! `vireo --version` prints them and `GET /v1/version` returns them.

use serde::Serialize;

/// The workspace's package version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit of the build ("unknown" outside a git checkout unless
/// `VIREO_GIT_COMMIT` was set at build time).
pub const COMMIT: &str = env!("VIREO_GIT_COMMIT");

/// The REST API's version: the `/v1` of its paths and `info.version` of
/// the OpenAPI document (which takes it from here).
pub const API_VERSION: &str = "1";

/// `vireo --version`'s text after the program name (a literal "1": concat!
/// takes no consts; a test holds it equal to [`API_VERSION`]).
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VIREO_GIT_COMMIT"),
    ", API v1)"
);

/// The body of `GET /v1/version`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[schema(as = Version)]
pub struct VersionInfo {
    /// The package version (semantic versioning), as `vireo --version`
    /// prints it.
    #[schema(examples("0.1.0"))]
    pub version: &'static str,
    /// The git commit the binary was built from (abbreviated hash), or
    /// `unknown` for a build outside a git checkout.
    #[schema(examples("5775ff7a1b2c"))]
    pub commit: &'static str,
    /// The version of this REST API: the `v1` of its paths and
    /// `info.version` of the OpenAPI document.
    #[schema(examples("1"))]
    pub api_version: &'static str,
}

pub fn info() -> VersionInfo {
    VersionInfo {
        version: VERSION,
        commit: COMMIT,
        api_version: API_VERSION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_version_is_the_one_openapi_json_declares() {
        let doc: serde_json::Value = serde_json::from_str(crate::openapi::openapi_json()).unwrap();
        assert_eq!(doc["info"]["version"], API_VERSION);
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths
            .keys()
            .filter(|r| r.starts_with("/v"))
            .all(|r| r.starts_with(&format!("/v{API_VERSION}/"))));
    }

    #[test]
    fn the_commit_is_this_checkout_or_unknown() {
        assert!(!COMMIT.is_empty());
        if env!("VIREO_GIT_COMMIT_SOURCE") == "env" {
            return;
        }
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let head = std::process::Command::new("git")
            .args(["-C", root, "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            // A checkout: the short hash is a prefix of HEAD's (the test
            // binary is rebuilt when HEAD moves).
            Some(head) => assert!(head.starts_with(COMMIT), "{COMMIT} vs HEAD {head}"),
            None => assert_eq!(COMMIT, "unknown"),
        }
        assert_eq!(
            LONG,
            format!("{VERSION} (commit {COMMIT}, API v{API_VERSION})")
        );
    }
}
