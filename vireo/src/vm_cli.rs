//! `vireo serve` (runs the daemon) and `vireo vm ...`, the daemon's command
//! line client. The client talks to the daemon only through its public REST
//! API, over the Unix socket, with a small blocking HTTP/1.1 client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use vireo_daemon::model::{self, CreateVm, ErrorBody, StopVm, Vm, VmList};
use vireo_daemon::paths;

use crate::cli::Accel;
use crate::Failure;

pub const SERVE_EXAMPLES: &str = "\
Examples:
  vireo serve                                   # per-user defaults
  vireo serve --state-dir /srv/vireo --listen unix:/run/vireo.sock

Defaults: as root, state in /var/lib/vireo and the socket /run/vireo.sock;
as a user, state in $XDG_STATE_HOME/vireo (else ~/.local/state/vireo) and the
socket $XDG_RUNTIME_DIR/vireo.sock (else vireo.sock in the state directory).
The socket is mode 0660 (owner, and the `vireo` group if it exists). One
daemon per state directory (a lock file refuses a second). VMs keep running
when the daemon stops; the next daemon on the same state directory re-adopts
them. The API is JSON over HTTP/1.1 under /v1, described at /v1/openapi.json.";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for the state database, the lock file and the VMs' logs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where the API listens: unix:PATH (see the defaults below).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub const VM_ABOUT: &str = "\
Manage VMs through the vireo daemon (`vireo serve`): define, start, stop,
inspect. The daemon is found at --socket PATH, else $VIREO_SOCKET, else the
default socket ($XDG_RUNTIME_DIR/vireo.sock for users, /run/vireo.sock for
root). Exit status: 0 on success, 2 when the request is wrong (unknown VM,
bad value, wrong state), 1 when the daemon or the VM fails.";

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The daemon's Unix socket [default: $VIREO_SOCKET, else the default socket].
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a new VM (it starts stopped).
    #[command(after_help = CREATE_EXAMPLES)]
    Create(CreateArgs),
    /// List the VMs with their state.
    #[command(
        after_help = "Examples:\n  vireo vm list\n  vireo vm list --json | jq '.vms[].name'"
    )]
    List(ListArgs),
    /// Show one VM's definition and state.
    #[command(after_help = "Examples:\n  vireo vm show web\n  vireo vm show web --json")]
    Show(ShowArgs),
    /// Start a VM: the daemon runs it as its own `vireo run` process.
    #[command(after_help = "Example:\n  vireo vm start web")]
    Start(NameArgs),
    /// Stop a VM: press its ACPI power button and wait for the guest to shut
    /// down (with --force, stop the VM process if it has not in time).
    #[command(
        after_help = "Examples:\n  vireo vm stop web\n  vireo vm stop web --force --timeout 5"
    )]
    Stop(StopArgs),
    /// Kill a VM at once (SIGKILL).
    #[command(after_help = "Example:\n  vireo vm kill web")]
    Kill(NameArgs),
    /// Pause a running VM's vCPUs (memory and devices are kept).
    #[command(after_help = "Example:\n  vireo vm pause web")]
    Pause(NameArgs),
    /// Resume a paused VM.
    #[command(after_help = "Example:\n  vireo vm resume web")]
    Resume(NameArgs),
    /// Delete a stopped VM's definition.
    #[command(after_help = "Example:\n  vireo vm delete web")]
    Delete(NameArgs),
    /// Print the VM's serial console scrollback (the last 256 KiB).
    #[command(after_help = "Example:\n  vireo vm console web | tail -20")]
    Console(NameArgs),
}

const CREATE_EXAMPLES: &str = "\
Examples:
  vireo vm create web --image guest-kit --cpus 2 --memory 512
  vireo vm create tiny --kernel ./vmlinux --cmdline 'console=ttyS0' --accel emu

Relative paths are made absolute here (the daemon has its own working
directory); the files must exist and be readable by the daemon.";

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name: letters, digits, '-', '_', '.' (at most 63).
    #[arg(value_name = "NAME")]
    pub name: String,

    /// A guest kit made by `vireo image build`.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "kernel",
        conflicts_with = "kernel"
    )]
    pub image: Option<PathBuf>,

    /// Kernel image: a 64-bit ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line [default: vireo run's, or the kit's].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = model::DEFAULT_VCPUS)]
    pub cpus: u32,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = model::DEFAULT_MEMORY_MIB)]
    pub memory: u64,

    /// Which backend runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Stop the VM process (SIGTERM, then SIGKILL) if the guest has not shut
    /// down within the timeout.
    #[arg(long)]
    pub force: bool,

    /// Seconds to wait for the guest to shut down after the power button.
    #[arg(long, value_name = "SECS", default_value_t = model::DEFAULT_STOP_TIMEOUT_SECS)]
    pub timeout: u64,
}

/// `vireo serve`.
pub fn serve(args: ServeArgs) -> Result<(), Failure> {
    let state_dir = args.state_dir.unwrap_or_else(paths::default_state_dir);
    let socket = match &args.listen {
        Some(l) => vireo_daemon::parse_listen(l).map_err(Failure::Usage)?,
        None => paths::default_socket(),
    };
    let vmm = std::env::current_exe()
        .map_err(|e| Failure::Vm(format!("cannot find the vireo binary to run VMs with: {e}")))?;
    let cfg = vireo_daemon::ServeConfig {
        state_dir: absolute(&state_dir),
        socket: absolute(&socket),
        vmm,
    };
    vireo_daemon::serve(cfg).map_err(|e| match e {
        vireo_daemon::ServeError::Usage(m) => Failure::Usage(m),
        vireo_daemon::ServeError::Failed(m) => Failure::Vm(m),
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `vireo vm ...`.
/// POST a state-changing action (`/kill`, `/pause`, ...) and print the result.
fn action(client: &Client, name: &str, path: &str) -> Result<(), Failure> {
    let vm: Vm = client.call("POST", &vm_path(name, path), None)?;
    println!("{}: {}", vm.name, describe_state(&vm));
    Ok(())
}

pub fn vm(args: VmArgs) -> Result<(), Failure> {
    let client = Client {
        socket: paths::client_socket(args.socket),
    };
    match args.command {
        VmCommand::Create(a) => create(&client, a),
        VmCommand::List(a) => list(&client, a),
        VmCommand::Show(a) => show(&client, a),
        VmCommand::Start(a) => {
            let vm: Vm = client.call("POST", &vm_path(&a.name, "/start"), None)?;
            println!(
                "started {} ({})",
                vm.name,
                match vm.pid {
                    Some(pid) => format!("pid {pid}"),
                    None => describe_state(&vm),
                }
            );
            Ok(())
        }
        VmCommand::Stop(a) => {
            let body = serde_json::to_vec(&StopVm {
                force: a.force,
                timeout_secs: Some(a.timeout),
            })
            .expect("serialisable");
            let vm: Vm = client.call_with_timeout(
                "POST",
                &vm_path(&a.name, "/stop"),
                Some(&body),
                Duration::from_secs(a.timeout + 30),
            )?;
            println!("{}: {}", vm.name, describe_state(&vm));
            Ok(())
        }
        VmCommand::Kill(a) => action(&client, &a.name, "/kill"),
        VmCommand::Pause(a) => action(&client, &a.name, "/pause"),
        VmCommand::Resume(a) => action(&client, &a.name, "/resume"),
        VmCommand::Delete(a) => {
            client.request("DELETE", &vm_path(&a.name, ""), None, DEFAULT_TIMEOUT)?;
            println!("deleted {}", a.name);
            Ok(())
        }
        VmCommand::Console(a) => {
            let bytes =
                client.request("GET", &vm_path(&a.name, "/console"), None, DEFAULT_TIMEOUT)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|_| out.flush())
                .map_err(|e| Failure::Vm(format!("writing the console to stdout: {e}")))
        }
    }
}

/// The API path of a VM, with its name percent-encoded where needed.
fn vm_path(name: &str, suffix: &str) -> String {
    let mut enc = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/v1/vms/{enc}{suffix}")
}

fn create(client: &Client, a: CreateArgs) -> Result<(), Failure> {
    let path = |p: &Option<PathBuf>| p.as_deref().map(|p| absolute(p).display().to_string());
    let req = CreateVm {
        name: a.name,
        vcpus: a.cpus,
        memory_mib: a.memory,
        kernel: path(&a.kernel),
        initrd: path(&a.initrd),
        cmdline: a.cmdline,
        image: path(&a.image),
        accel: match a.accel {
            Accel::Kvm => model::Accel::Kvm,
            Accel::Auto => model::Accel::Auto,
            Accel::Emu => model::Accel::Emu,
        },
    };
    let body = serde_json::to_vec(&req).expect("serialisable");
    let vm: Vm = client.call("POST", "/v1/vms", Some(&body))?;
    println!(
        "created {} ({} vCPU, {} MiB, {}); start it with `vireo vm start {}`",
        vm.name,
        vm.vcpus,
        vm.memory_mib,
        vm.accel.as_str(),
        vm.name
    );
    Ok(())
}

fn describe_state(vm: &Vm) -> String {
    match (&vm.last_exit, vm.state.is_active()) {
        (Some(why), false) => format!("{} ({why})", vm.state.as_str()),
        _ => vm.state.as_str().to_string(),
    }
}

fn list(client: &Client, a: ListArgs) -> Result<(), Failure> {
    let bytes = client.request("GET", "/v1/vms", None, DEFAULT_TIMEOUT)?;
    if a.json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let list: VmList = decode(&bytes)?;
    let mut rows = vec![[
        "NAME".to_string(),
        "STATE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "ACCEL".into(),
        "PID".into(),
        "LAST EXIT".into(),
    ]];
    for vm in &list.vms {
        rows.push([
            vm.name.clone(),
            vm.state.as_str().into(),
            vm.vcpus.to_string(),
            format!("{} MiB", vm.memory_mib),
            vm.accel.as_str().into(),
            vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            vm.last_exit.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    if list.vms.is_empty() {
        println!("no VMs yet; define one with `vireo vm create NAME --image DIR`");
        return Ok(());
    }
    print!("{}", table(&rows));
    Ok(())
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn show(client: &Client, a: ShowArgs) -> Result<(), Failure> {
    let bytes = client.request("GET", &vm_path(&a.name, ""), None, DEFAULT_TIMEOUT)?;
    if a.json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let vm: Vm = decode(&bytes)?;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows = [
        ["name".to_string(), vm.name.clone()],
        ["state".into(), vm.state.as_str().into()],
        [
            "pid".into(),
            vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ],
        ["vcpus".into(), vm.vcpus.to_string()],
        ["memory".into(), format!("{} MiB", vm.memory_mib)],
        ["accel".into(), vm.accel.as_str().into()],
        ["image".into(), opt(&vm.image)],
        ["kernel".into(), opt(&vm.kernel)],
        ["initrd".into(), opt(&vm.initrd)],
        ["cmdline".into(), opt(&vm.cmdline)],
        ["created".into(), vm.created_at.clone()],
        ["started".into(), opt(&vm.started_at)],
        ["last exit".into(), opt(&vm.last_exit)],
        ["last exit at".into(), opt(&vm.last_exit_at)],
    ];
    for [k, v] in rows {
        println!("{:<14}{v}", format!("{k}:"));
    }
    Ok(())
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::Vm(format!(
            "the daemon sent a reply this vireo cannot read: {e}"
        ))
    })
}

/// A blocking HTTP/1.1 client over the daemon's Unix socket, one request per
/// connection.
struct Client {
    socket: PathBuf,
}

impl Client {
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, Failure> {
        self.call_with_timeout(method, path, body, DEFAULT_TIMEOUT)
    }

    fn call_with_timeout<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<T, Failure> {
        decode(&self.request(method, path, body, timeout)?)
    }

    /// Send a request; a 2xx reply's body, or the API error as a Failure
    /// (4xx: the user's to fix, exit 2; 5xx: the daemon failed, exit 1).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let sock = self.socket.display();
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Failure::Vm(format!(
                "cannot reach the vireo daemon at {sock} — start it with `vireo serve`"
            )),
            std::io::ErrorKind::PermissionDenied => Failure::Usage(format!(
                "cannot reach the vireo daemon at {sock}: permission denied (the socket is for its owner and the `vireo` group)"
            )),
            _ => Failure::Vm(format!("cannot reach the vireo daemon at {sock}: {e}")),
        })?;
        let _ = stream.set_read_timeout(Some(timeout));
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let io_err =
            |e: std::io::Error| Failure::Vm(format!("talking to the vireo daemon at {sock}: {e}"));
        stream.write_all(req.as_bytes()).map_err(io_err)?;
        stream.write_all(body).map_err(io_err)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io_err)?;
        let (status, body) = parse_response(&raw).ok_or_else(|| {
            Failure::Vm(format!(
                "the vireo daemon at {sock} sent a malformed HTTP reply"
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.message,
            Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
        };
        Err(if (400..500).contains(&status) {
            Failure::Usage(message)
        } else {
            Failure::Vm(message)
        })
    }
}

/// Split an HTTP/1.1 response into its status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = &raw[end + 4..];
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((201, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((200, b"abcde".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn names_are_percent_encoded_in_paths() {
        assert_eq!(vm_path("web-1.a_b", "/start"), "/v1/vms/web-1.a_b/start");
        assert_eq!(vm_path("a b/c", ""), "/v1/vms/a%20b%2Fc");
    }

    #[test]
    fn tables_align() {
        let t = table(&[["A".to_string(), "BB".into()], ["ccc".into(), "d".into()]]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
