//! `vireo image create|info|convert`: disk images through `vireo-block`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vireo_api::devices::block::Format;
use vireo_block::{LayerInfo, OpenOptions};

use crate::cli::{DiskFormat, ImageConvertArgs, ImageCreateArgs, ImageInfoArgs};
use crate::Failure;

fn usage(e: vireo_block::Error) -> Failure {
    Failure::Usage(e.to_string())
}

fn format_of(f: DiskFormat) -> Format {
    match f {
        DiskFormat::Qcow2 => Format::Qcow2,
        DiskFormat::Raw => Format::Raw,
    }
}

/// `vireo image create`.
pub fn create(args: ImageCreateArgs) -> Result<(), Failure> {
    let format = format_of(args.format);
    let file = &args.file;
    if file.exists() {
        return Err(Failure::Usage(format!(
            "{}: already exists; remove it first or pick another name",
            file.display()
        )));
    }
    let backing = match &args.backing {
        None => None,
        Some(_) if format == Format::Raw => {
            return Err(Failure::Usage(
                "--backing needs --format qcow2 (a raw image has no backing file)".into(),
            ))
        }
        Some(b) => {
            // Like qemu-img: a relative name is relative to the new image's directory.
            let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            let resolved = dir.join(b);
            // The operator names this file: detecting its format is what
            // qemu-img does too, and the format found is recorded in the
            // overlay so nothing guesses it again.
            let options = OpenOptions {
                read_only: true,
                backing_dirs: &args.backing_dir,
            };
            let image = vireo_block::probe(&resolved)
                .and_then(|f| vireo_block::open_as(&resolved, f, options))
                .map_err(|e| {
                    Failure::Usage(format!(
                        "backing file: {e}{}",
                        if b.is_relative() && !dir.as_os_str().is_empty() {
                            format!(" (a relative --backing is relative to {})", dir.display())
                        } else {
                            String::new()
                        }
                    ))
                })?;
            let name = b.to_str().ok_or_else(|| {
                Failure::Usage(format!(
                    "{}: the backing file name must be UTF-8",
                    b.display()
                ))
            })?;
            let (bformat, bsize) = (image.format(), image.size());
            Some((name.to_string(), bformat, bsize))
        }
    };
    let size = match (args.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, _, bsize))) => *bsize,
        (None, None) => return Err(Failure::Usage("--size is needed without --backing".into())),
    };
    match format {
        Format::Raw => vireo_block::create_raw(file, size).map_err(usage)?,
        Format::Qcow2 => {
            let b = backing.as_ref().map(|(n, f, _)| (n.as_str(), *f));
            vireo_block::create_qcow2(file, size, args.cluster_size, b).map_err(usage)?
        }
    }
    let mut line = format!("created {} ({format}, {})", file.display(), human(size));
    if let Some((name, bformat, _)) = &backing {
        line.push_str(&format!(", backing file {name} ({bformat})"));
    }
    println!("{line}");
    Ok(())
}

/// `vireo image info`.
pub fn info(args: ImageInfoArgs) -> Result<(), Failure> {
    let layers = vireo_block::info(&args.file, None, &args.backing_dir).map_err(usage)?;
    let mut out = String::new();
    if args.json {
        let rest: Vec<String> = layers[1..]
            .iter()
            .map(|l| format!("{{{}}}", layer_json(l)))
            .collect();
        out = format!(
            "{{{}, \"backing_chain\": [{}]}}\n",
            layer_json(&layers[0]),
            rest.join(", ")
        );
    } else {
        for (i, l) in layers.iter().enumerate() {
            if i == 1 {
                out.push_str("backing chain:\n");
            }
            let indent = if i == 0 { "" } else { "  " };
            out.push_str(&layer_text(l, indent));
        }
    }
    print!("{out}");
    Ok(())
}

fn layer_text(l: &LayerInfo, indent: &str) -> String {
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("{indent}{k:<14}{v}\n"));
    let bytes = |n: u64| {
        if n < 1024 {
            format!("{n} bytes")
        } else {
            format!("{} ({n} bytes)", human(n))
        }
    };
    row("file:", l.path.display().to_string());
    let version = l
        .version
        .map(|v| format!(" (version {v})"))
        .unwrap_or_default();
    row("format:", format!("{}{version}", l.format));
    row("virtual size:", bytes(l.virtual_size));
    if let Some(cs) = l.cluster_size {
        row("cluster size:", cs.to_string());
    }
    row("allocated:", bytes(l.allocated_bytes));
    row("file size:", bytes(l.file_size));
    if let Some(b) = &l.backing_file {
        let f = l.backing_format.as_deref().unwrap_or("raw, not recorded");
        row("backing file:", format!("{b} (format: {f})"));
    }
    s
}

/// The fields of one layer as JSON members (without the braces).
fn layer_json(l: &LayerInfo) -> String {
    let opt_num = |v: Option<u64>| v.map_or("null".to_string(), |n| n.to_string());
    let opt_str = |v: &Option<String>| v.as_deref().map_or("null".to_string(), json_string);
    format!(
        "\"file\": {}, \"format\": {}, \"version\": {}, \"virtual_size\": {}, \"cluster_size\": {}, \
         \"allocated_bytes\": {}, \"file_size\": {}, \"backing_file\": {}, \"backing_format\": {}",
        json_string(&l.path.display().to_string()),
        json_string(l.format.name()),
        opt_num(l.version.map(u64::from)),
        l.virtual_size,
        opt_num(l.cluster_size),
        l.allocated_bytes,
        l.file_size,
        opt_str(&l.backing_file),
        opt_str(&l.backing_format),
    )
}

fn json_string(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A size for people: "10 GiB", "1.5 MiB", "512 bytes".
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Progress on stderr: a percentage updated in place on a terminal,
/// a line every few seconds otherwise.
struct Progress {
    tty: bool,
    what: String,
    last_percent: Option<u64>,
    last_line: Instant,
    printed: bool,
}

impl Progress {
    const LINE_EVERY: Duration = Duration::from_secs(5);

    fn new(what: String) -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            tty,
            what,
            last_percent: None,
            last_line: Instant::now(),
            printed: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.last_percent != Some(percent) {
                let _ = write!(err, "\r{}: {percent:3}%", self.what);
                let _ = err.flush();
                self.last_percent = Some(percent);
                self.printed = true;
            }
        } else if self.last_line.elapsed() >= Self::LINE_EVERY {
            let _ = writeln!(err, "vireo: {}: {percent}%", self.what);
            self.last_line = Instant::now();
            self.printed = true;
        }
    }

    fn finish(&mut self) {
        if self.tty && self.printed {
            let _ = writeln!(std::io::stderr(), "\r{}: 100%", self.what);
        } else if self.printed {
            let _ = writeln!(std::io::stderr(), "vireo: {}: 100%", self.what);
        }
    }
}

/// Removes a half-written destination unless disarmed.
struct RemoveOnError(Option<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `vireo image convert`.
pub fn convert(args: ImageConvertArgs) -> Result<(), Failure> {
    let format = format_of(args.format);
    if args.dst.exists() {
        return Err(Failure::Usage(format!(
            "{}: already exists; remove it first or pick another name",
            args.dst.display()
        )));
    }
    // The operator names the source, as with qemu-img its format is
    // detected; its backing files stay confined to their directories.
    let mut src = vireo_block::probe(&args.src)
        .and_then(|f| {
            let options = OpenOptions {
                read_only: true,
                backing_dirs: &args.backing_dir,
            };
            vireo_block::open_as(&args.src, f, options)
        })
        .map_err(usage)?;
    let size = src.size();
    match format {
        Format::Raw => vireo_block::create_raw(&args.dst, size).map_err(usage)?,
        Format::Qcow2 => {
            vireo_block::create_qcow2(&args.dst, size, args.cluster_size, None).map_err(usage)?
        }
    }
    let mut guard = RemoveOnError(Some(args.dst.clone()));
    let mut dst =
        vireo_block::open_as(&args.dst, format, OpenOptions::writable()).map_err(usage)?;
    let chunk = args.cluster_size.clamp(1 << 20, 4 << 20) as usize;
    let mut buf = vec![0u8; chunk];
    let mut progress = Progress::new(format!("converting {}", args.src.display()));
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(chunk as u64) as usize;
        src.read_at(&mut buf[..n], done).map_err(usage)?;
        // A new image reads zeros: zero ranges need no writing.
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(&buf[..n], done).map_err(usage)?;
        }
        done += n as u64;
        progress.update(done, size);
    }
    dst.flush().map_err(usage)?;
    drop(dst);
    progress.finish();
    guard.0 = None;
    println!(
        "converted {} ({}) to {} ({format}, {})",
        args.src.display(),
        src.format(),
        args.dst.display(),
        human(size)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(1536 << 10), "1.5 MiB");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
