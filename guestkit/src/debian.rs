//! Fetching Debian packages without installing them: `apt-cache depends` to
//! resolve a meta package, `apt-get download` into a directory, and
//! `dpkg-deb -x` to unpack.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::ImageError;

/// The meta package that always depends on the current kernel.
pub const KERNEL_META: &str = "linux-image-amd64";
/// The statically linked busybox.
pub const BUSYBOX: &str = "busybox-static";

/// Run a command with the C locale (apt's messages are matched below) and
/// collect its output.
fn run(
    cmd: &mut Command,
    tool: &'static str,
    provider: &'static str,
) -> Result<Output, ImageError> {
    cmd.env("LC_ALL", "C").env("LANG", "C");
    cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::ToolMissing {
            tool,
            package: provider,
        },
        _ => ImageError::Spawn { tool, source },
    })
}

/// stdout and stderr together, as apt splits its errors across both.
fn all_output(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// The most telling lines of apt's output: its `E:`/`Err:` lines, else the
/// last line.
fn apt_detail(text: &str) -> String {
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("E:") || (l.starts_with("W:") && l.contains("Failed")))
        .collect();
    if errors.is_empty() {
        text.lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no output")
            .to_string()
    } else {
        errors.join(" / ")
    }
}

/// Turn a failed apt run into the error that says what to do.
pub fn classify_apt_failure(command: &str, package: &str, text: &str) -> ImageError {
    let detail = apt_detail(text);
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&[
        "Unable to locate package",
        "No packages found",
        "has no installation candidate",
    ]) {
        return ImageError::AptListsEmpty {
            package: package.to_string(),
            detail,
        };
    }
    if has(&["404  Not Found", "404 Not Found"]) {
        return ImageError::AptListsStale {
            package: package.to_string(),
            detail,
        };
    }
    if has(&[
        "Could not resolve",
        "Temporary failure resolving",
        "Could not connect",
        "Unable to connect",
        "Connection failed",
        "Connection timed out",
        "Network is unreachable",
        "No route to host",
    ]) {
        return ImageError::Network {
            package: package.to_string(),
            detail,
        };
    }
    ImageError::CommandFailed {
        command: command.to_string(),
        detail,
    }
}

/// The real package a meta package depends on, from `apt-cache depends`
/// output (`  Depends: linux-image-6.1.0-NN-amd64`). Virtual packages
/// (`<...>`) are skipped.
pub fn parse_depends(output: &str, prefix: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.split_whitespace().next()?;
        (dep.starts_with(prefix) && !dep.starts_with('<')).then(|| dep.to_string())
    })
}

/// Resolve [`KERNEL_META`] to the versioned kernel package.
pub fn resolve_kernel_package() -> Result<String, ImageError> {
    let command = format!("apt-cache depends {KERNEL_META}");
    let out = run(
        Command::new("apt-cache").args(["depends", KERNEL_META]),
        "apt-cache",
        "apt",
    )?;
    let text = all_output(&out);
    if !out.status.success() {
        return Err(classify_apt_failure(&command, KERNEL_META, &text));
    }
    parse_depends(&text, "linux-image-").ok_or_else(|| ImageError::KernelUnresolved {
        detail: apt_detail(&text),
    })
}

/// `apt-get download PACKAGE` into `dir`; the path of the `.deb`.
pub fn download(package: &str, dir: &Path) -> Result<PathBuf, ImageError> {
    let command = format!("apt-get download {package}");
    // Downloading as root into a directory the _apt user cannot write makes
    // apt warn and fall back; say up front that root does it.
    let out = run(
        Command::new("apt-get")
            .args(["-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(dir),
        "apt-get",
        "apt",
    )?;
    if !out.status.success() {
        return Err(classify_apt_failure(&command, package, &all_output(&out)));
    }
    let io = |source| ImageError::Io {
        action: "list the download directory",
        path: dir.to_path_buf(),
        source,
    };
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(dir.join(name));
        }
    }
    Err(ImageError::CommandFailed {
        command,
        detail: format!(
            "it reported success but no {prefix}*.deb appeared in {}",
            dir.display()
        ),
    })
}

/// `dpkg-deb -x DEB DEST`: unpack the files without installing anything.
pub fn unpack(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    let out = run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
        "dpkg-deb",
        "dpkg",
    )?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("dpkg-deb -x {} {}", deb.display(), dest.display()),
            detail: apt_detail(&all_output(&out)),
        });
    }
    Ok(())
}

/// Check that `elf` is an x86-64 executable with no program interpreter
/// (so it runs in an initramfs with no libc).
pub fn check_static_elf(elf: &[u8]) -> Result<(), &'static str> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("is not a 64-bit ELF executable");
    }
    let field = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at.checked_add(len)?)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    };
    if field(0x12, 2) != Some(0x3e) {
        return Err("is not built for x86-64");
    }
    let bad = "has a corrupt program header table";
    let phoff = usize::try_from(field(0x20, 8).ok_or(bad)?).map_err(|_| bad)?;
    let phentsize = field(0x36, 2).ok_or(bad)? as usize;
    let phnum = field(0x38, 2).ok_or(bad)? as usize;
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(bad)?;
        // PT_INTERP (3): the binary needs a dynamic loader.
        if field(at, 4).ok_or(bad)? == 3 {
            return Err("is dynamically linked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-48-amd64\n";
        assert_eq!(
            parse_depends(out, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-48-amd64")
        );
        let out =
            "linux-image-amd64\n  Depends: <linux-image-virtual>\n  Depends: initramfs-tools\n";
        assert_eq!(parse_depends(out, "linux-image-"), None);
        assert_eq!(parse_depends("", "linux-image-"), None);
    }

    #[test]
    fn classifies_apt_failures() {
        let e = classify_apt_failure("apt-get download x", "x", "E: Unable to locate package x\n");
        assert!(matches!(e, ImageError::AptListsEmpty { .. }));
        assert!(e.to_string().contains("run `apt-get update`"), "{e}");
        let e = classify_apt_failure("apt-cache depends x", "x", "E: No packages found\n");
        assert!(matches!(e, ImageError::AptListsEmpty { .. }));
        let e = classify_apt_failure("apt-get download x", "x", "Err:1 http://mirror x\n  404  Not Found [IP: 1.2.3.4 80]\nE: Failed to fetch http://mirror/x.deb  404  Not Found\n");
        assert!(matches!(e, ImageError::AptListsStale { .. }));
        assert!(e.to_string().contains("run `apt-get update`"), "{e}");
        let e = classify_apt_failure(
            "apt-get download x",
            "x",
            "Err:1 http://mirror x\n  Could not resolve 'mirror'\nE: Failed to fetch http://mirror/x.deb  Could not resolve 'mirror'\n",
        );
        assert!(matches!(e, ImageError::Network { .. }));
        assert!(e.to_string().contains("could not be reached"), "{e}");
        let e = classify_apt_failure("apt-get download x", "x", "something odd\n");
        assert!(matches!(e, ImageError::CommandFailed { .. }));
        assert!(e.to_string().contains("something odd"), "{e}");
    }

    #[test]
    fn static_elf_check() {
        let mut elf = vec![0u8; 0x40 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 0x3e;
        elf[0x20] = 0x40; // phoff
        elf[0x36] = 56; // phentsize
        elf[0x38] = 1; // phnum
        elf[0x40] = 1; // PT_LOAD
        assert_eq!(check_static_elf(&elf), Ok(()));
        elf[0x40] = 3; // PT_INTERP
        assert_eq!(check_static_elf(&elf), Err("is dynamically linked"));
        elf[0x38] = 200; // more headers than bytes
        assert!(check_static_elf(&elf).is_err());
        assert!(check_static_elf(b"#!/bin/sh").is_err());
    }
}
