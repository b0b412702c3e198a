//! Shell completions and man pages generated from the clap definitions
//! (`vireo completions SHELL`, `vireo manpages DIR`, both hidden): the
//! Debian package ships them (scripts/build-deb), and being generated they
//! always match the flags.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::Failure;

/// Write the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "vireo", out);
    out.flush()
        .map_err(|e| Failure::Vm(format!("writing the {shell} completions: {e}")))
}

/// Write `vireo.1` and a page per visible subcommand into `dir` (created
/// when missing); the files written, sorted.
pub fn manpages(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::Usage(format!(
            "vireo manpages {}: cannot create the directory: {e}",
            dir.display()
        ))
    })?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(|e| {
        Failure::Vm(format!(
            "vireo manpages {}: writing the pages: {e}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Failure::Vm(format!("reading {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    files.sort();
    for f in &files {
        println!("{}", f.display());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        completions(shell, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completions_know_the_subcommands_and_their_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let text = completion(shell);
            for word in ["serve", "snapshot", "accel", "state-dir", "image"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
        // The packaging commands stay out of the help users read.
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("serve"), "{help}");
        assert!(
            !help.contains("manpages") && !help.contains("completions"),
            "{help}"
        );
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("vireo-manpages-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = manpages(&dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "vireo.1",
            "vireo-run.1",
            "vireo-serve.1",
            "vireo-image-build.1",
            "vireo-vm.1",
            "vireo-vm-create.1",
            "vireo-token.1",
        ] {
            assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
        }
        assert!(!names
            .iter()
            .any(|n| n.contains("manpages") || n.contains("completions")));
        let run = std::fs::read_to_string(dir.join("vireo-run.1")).unwrap();
        assert!(run.starts_with(".ie") || run.contains(".TH"), "{run}");
        assert!(run.contains("accel"), "vireo-run.1 documents --accel");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
