//! `vireo serve` (runs the daemon) and `vireo vm ...`, the daemon's command
//! line client. The client talks to the daemon only through its public REST
//! API, over the Unix socket, with a small blocking HTTP/1.1 client.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use vireo_api::model::{
    self, BalloonStatus, CloneVm, CreateSnapshot, CreateVm, SetBalloon, Snapshot, SnapshotList,
    StopVm, Vm, VmList,
};
use vireo_daemon::paths;

use crate::api_client::{self, ConnArgs};
use crate::Failure;
use crate::{console_client, vm_edit};
use vireo_api::client::{decode, Client, DEFAULT_TIMEOUT};
use vireo_api::units::MemorySize;
use vireo_api::vm::Accel;

pub const SERVE_EXAMPLES: &str = "\
Examples:
  vireo serve                                   # per-user defaults
  vireo serve --state-dir /srv/vireo --listen unix:/run/vireo.sock
  vireo serve --listen unix:/run/vireo.sock --listen tcp:0.0.0.0:8443 \\
      --tls-cert /etc/vireo/cert.pem --tls-key /etc/vireo/key.pem
  vireo serve --no-jail                         # debugging: VMs unconfined (audit-logged)

Defaults: as root, state in /var/lib/vireo and the socket /run/vireo.sock;
as a user, state in $XDG_STATE_HOME/vireo (else ~/.local/state/vireo) and the
socket $XDG_RUNTIME_DIR/vireo.sock (else vireo.sock in the state directory).
The socket is mode 0660 (owner, and the `vireo` group if it exists):
anyone who can connect to it is an admin of the daemon, so membership of
the `vireo` group equals admin (it may define VMs over any image in the
storage directories and read every console). One
daemon per state directory (a lock file refuses a second). VMs keep running
when the daemon stops; the next daemon on the same state directory re-adopts
them. The API is JSON over HTTP/1.1 under /v1, described at /v1/openapi.json.

Host files named through the API (disks, kernels, initrds, guest kits)
must lie beneath a storage directory: --storage DIR (repeatable), default
STATE_DIR/storage (created 0700). Absolute paths must be beneath one;
relative paths are taken in the first. Symlinks, `..`, device nodes and the
daemon's own files are refused. Each disk's format is fixed when it is
defined (format=raw|qcow2, else probed once then), never guessed later.

Unix-socket clients act as admin (audited with their uid). TCP is served
only over TLS, and its clients need a token (`vireo token create --role
viewer|operator|admin`), sent as `Authorization: Bearer TOKEN`
(`?access_token=` only on the console WebSocket and the event stream). A
client address with 10 invalid tokens in a minute gets 429 for a minute;
at most --max-connections TLS connections are held. Every changing or
refused request is a JSON line in STATE_DIR/audit.log.";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for the state database, the lock file and the VMs' logs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where the API listens, repeatable: unix:PATH, or tcp:HOST:PORT with
    /// --tls-cert and --tls-key [default: the default socket, below].
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,

    /// The TLS certificate chain (PEM) for tcp: listeners.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS private key (PEM: PKCS#8, RSA or EC) for tcp: listeners.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// A storage directory, repeatable: disk images, kernels, initrds and
    /// guest kits named through the API must lie beneath one (relative
    /// paths are taken in the first) [default: STATE_DIR/storage].
    #[arg(long, value_name = "DIR")]
    pub storage: Vec<PathBuf>,

    /// Most connections the TLS listeners hold at once; more are closed at
    /// once.
    #[arg(long, value_name = "N", default_value_t = vireo_daemon::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Start VMs without the jail (for debugging only): each VM process
    /// then runs as the daemon's user with its privileges, and each start
    /// writes a warning to the audit log. By default every VM is jailed
    /// (`vireo run --jail`: own uid, cgroup, namespaces and root), which
    /// needs the daemon to run as root; see `vireo doctor`.
    #[arg(long)]
    pub no_jail: bool,
}

pub const VM_ABOUT: &str = "\
Manage VMs through the vireo daemon (`vireo serve`): define, start, stop,
inspect. The daemon is found at --socket PATH, else $VIREO_SOCKET, else the
default socket ($XDG_RUNTIME_DIR/vireo.sock for users, /run/vireo.sock for
root, and for users with no daemon of their own when the system daemon runs,
e.g. the packaged vireo.service); a remote daemon's TLS listener with --url https://HOST:PORT (or
$VIREO_URL), a token in $VIREO_TOKEN (or --token-file) and its CA with
--ca-cert (or $VIREO_CA_CERT). Exit status: 0 on success, 2 when the request is wrong (unknown VM,
bad value, wrong state), 1 when the daemon or the VM fails.";

#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

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
    /// Change a stopped VM's definition: only the options given change.
    #[command(after_help = UPDATE_EXAMPLES)]
    Update(UpdateArgs),
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
    /// Attach to the VM's serial console (Ctrl-] detaches), or print its
    /// scrollback (the last 256 KiB) with --scrollback.
    #[command(after_help = CONSOLE_EXAMPLES)]
    Console(ConsoleArgs),
    /// Reset a running VM and start it again (new process, same definition).
    #[command(after_help = "Example:\n  vireo vm reboot web")]
    Reboot(NameArgs),
    /// Edit a stopped VM's definition in $VISUAL/$EDITOR (else vi); what
    /// changed is sent to the daemon.
    #[command(after_help = EDIT_EXAMPLES)]
    Edit(NameArgs),
    /// Show a running VM's balloon, or set how much memory it takes from
    /// the guest (the VM needs a balloon device: create it with --balloon).
    #[command(
        after_help = "Examples:\n  vireo vm balloon web\n  vireo vm balloon web --target 256   # take 256 MiB back from the guest\n  vireo vm balloon web --target 0     # give it all back"
    )]
    Balloon(BalloonArgs),
    /// Take a snapshot of a running or paused VM (vCPUs, devices, memory,
    /// disks), kept by the daemon under a tag.
    #[command(after_help = SNAPSHOT_EXAMPLES)]
    Snapshot(SnapshotArgs),
    /// List a VM's snapshots.
    #[command(
        after_help = "Examples:\n  vireo vm snapshots web\n  vireo vm snapshots web --json | jq '.snapshots[].tag'"
    )]
    Snapshots(SnapshotsArgs),
    /// Start a VM from one of its snapshots: a running VM's process is
    /// replaced (its console stays) and its disks are rolled back.
    #[command(
        after_help = "Example:\n  vireo vm restore web --tag before-upgrade\n\nA later `vireo vm reboot` boots the VM's definition, not the snapshot."
    )]
    Restore(TagArgs),
    /// Make a new VM from a VM's snapshot and start it: its own disks
    /// (overlays of the snapshot's), TAPs and vsock socket, memory shared
    /// copy-on-write with the snapshot.
    #[command(after_help = CLONE_EXAMPLES)]
    Clone(CloneArgs),
    /// Delete a snapshot (refused while a clone or a diff snapshot needs it).
    #[command(
        name = "snapshot-delete",
        after_help = "Example:\n  vireo vm snapshot-delete web --tag before-upgrade"
    )]
    SnapshotDelete(TagArgs),
    /// Live-migrate a running VM to another vireo daemon (its TLS API):
    /// the guest keeps running there, and this daemon forgets it.
    #[command(after_help = MIGRATE_EXAMPLES)]
    Migrate(MigrateArgs),
}

const MIGRATE_EXAMPLES: &str = "\
Examples:
  vireo vm migrate web --to https://host2:8443 \\
      --target-token-file ~/.config/vireo/host2.token --target-ca-cert host2-ca.pem
  vireo vm migrate busy-db --to https://host2:8443 --postcopy \\
      --target-token-file ~/.config/vireo/host2.token --target-ca-cert host2-ca.pem

The target daemon needs a TCP listener (--listen tcp:HOST:PORT with --tls-cert
and --tls-key); the token is one of its admin tokens, the CA the one its
certificate is checked against (default: the system's CA bundle). The
migration stream uses the target daemon's certificate too, and a one-time
secret the target hands out for this migration (its receiving process refuses
any other peer); the target runs the VM's definition as sent and refuses a
machine that differs from it. Disks must be on storage both hosts see at the
same paths; a VM with snapshots is refused.
(--token-file and --ca-cert, without `target-`, are for reaching the source
daemon, as on every `vireo vm` command.)";

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// The target daemon's TLS API, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub to: String,

    /// A file holding an admin token of the target daemon [default: $VIREO_TARGET_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub target_token_file: Option<PathBuf>,

    /// The CA certificate (PEM) the target daemon's certificate is checked against.
    #[arg(long, value_name = "PEM")]
    pub target_ca_cert: Option<PathBuf>,

    /// Post-copy: after one full copy the guest runs on the target at once
    /// and fetches the pages it dirtied since on demand (for guests that
    /// dirty memory faster than the link carries it; if the link breaks
    /// during post-copy the VM stops on both hosts).
    #[arg(long)]
    pub postcopy: bool,
}

const SNAPSHOT_EXAMPLES: &str = "\
Examples:
  vireo vm snapshot web                        # tag: the UTC time, e.g. 20261123-223000
  vireo vm snapshot web --tag before-upgrade
  vireo vm snapshot web --tag t2 --diff        # only memory changed since this run's last snapshot

The VM pauses while its state is written to STATE_DIR/vms/NAME/snapshots/TAG/
and then runs on (a paused VM stays paused). Bring it back with
`vireo vm restore web --tag before-upgrade`.";

const CLONE_EXAMPLES: &str = "\
Examples:
  vireo vm snapshot web --tag golden
  vireo vm clone web web2 --from-snapshot golden
  vireo vm clone web web3 --from-snapshot golden

The snapshot cannot be deleted while its clones exist.";

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// The snapshot's name: 1-64 of letters, digits, '.', '_', '-'
    /// [default: the UTC time, YYYYmmdd-HHMMSS].
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// Write only the memory changed since this run's last snapshot.
    #[arg(long)]
    pub diff: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// The snapshot's tag (see `vireo vm snapshots NAME`).
    #[arg(long, value_name = "TAG")]
    pub tag: String,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The VM whose snapshot to clone.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// The new VM's name.
    #[arg(value_name = "NEW")]
    pub new: String,

    /// The snapshot to start the clone from.
    #[arg(long, value_name = "TAG")]
    pub from_snapshot: String,
}

const CONSOLE_EXAMPLES: &str = "\
Examples:
  vireo vm console web                      # live; Ctrl-] detaches
  vireo vm console web --scrollback | tail -20
  printf 'root\\n' | vireo vm console web   # type, then watch until it stops

On a terminal the console is live: keystrokes go to the guest (raw mode),
Ctrl-] detaches and leaves the VM running. With stdin a pipe or file, its
bytes go to the guest, then the output is printed until the VM stops (or
Ctrl-C). With --scrollback, or when neither stdin nor stdout is a terminal
and stdin has nothing to send (e.g. /dev/null), the scrollback is printed.";

const EDIT_EXAMPLES: &str = "\
Examples:
  vireo vm edit web
  EDITOR=nano vireo vm edit web

The editor gets the fields `vireo vm update` can change, as JSON. Only the
fields you change are sent (a field you delete stays as it was; set it to
null to clear it); if the daemon refuses them, the message is shown
and (on a terminal) the editor opens again. The VM must be stopped.";

const CREATE_EXAMPLES: &str = "\
Examples:
  vireo vm create web --image guest-kit --cpus 2 --memory 512
  vireo vm create tiny --kernel ./vmlinux --cmdline 'console=ttyS0' --accel emu
  vireo vm create db --image guest-kit --disk path=db.qcow2,format=qcow2,id=data \\
      --net tap=tap0 --rng --balloon

Relative paths (also --disk path= and --vsock socket=) are made absolute
here (the daemon has its own working directory); the files must exist and
lie beneath one of the daemon's storage directories (`vireo serve --storage`,
default STATE_DIR/storage; no symlinks, no device nodes). A disk without
format= gets the format its first bytes show now, recorded once. The device options are `vireo run`'s (see
`vireo run --help`); a --net without mac= gets a fixed random MAC.";

const UPDATE_EXAMPLES: &str = "\
Examples:
  vireo vm update web --memory 1024 --cpus 4
  vireo vm update web --disk root.qcow2,format=qcow2 --disk path=data.qcow2,readonly=on
  vireo vm update web --balloon target=128 --no-rng
  vireo vm update web --no-disks --no-nets

The VM must be stopped. --disk and --net replace the whole list; --image
replaces --kernel (and the other way round).";

/// The paravirtual devices, as `vireo run` takes them.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// A virtio-blk disk (repeatable; the first is vda):
    /// `path=IMAGE[,readonly=on][,id=ID][,serial=S][,format=raw|qcow2][,bw=10M][,ops=1000]`.
    #[arg(long, value_name = "OPTS")]
    pub disk: Vec<String>,

    /// A virtio-net device on a TAP (repeatable):
    /// `tap=NAME[,mac=52:54:00:12:34:56][,mtu=N][,bw=100M][,ops=20000]`.
    #[arg(long, value_name = "OPTS")]
    pub net: Vec<String>,

    /// A virtio-vsock device: `cid=N,socket=PATH`.
    #[arg(long, value_name = "OPTS")]
    pub vsock: Option<String>,

    /// A virtio-rng device (`--rng` alone: the defaults; `--rng=bw=1M`).
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "", require_equals = true)]
    pub rng: Option<String>,

    /// A virtio-balloon device (`--balloon` alone: the defaults;
    /// `--balloon=target=128,deflate_on_oom=off`).
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "", require_equals = true)]
    pub balloon: Option<String>,
}

impl DeviceArgs {
    fn disks(&self) -> Vec<String> {
        self.disk
            .iter()
            .map(|d| absolute_option(d, "path", true))
            .collect()
    }

    fn vsock(&self) -> Option<String> {
        self.vsock
            .as_deref()
            .map(|v| absolute_option(v, "socket", false))
    }
}

/// Make the path in option `key` of a device option string absolute (the
/// bare first word when `bare` is set), leaving the rest as it is.
fn absolute_option(opts: &str, key: &str, bare: bool) -> String {
    opts.split(',')
        .enumerate()
        .map(|(i, part)| {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) if k.trim() == key => (Some(k), v),
                None if bare && i == 0 => (None, part),
                _ => return part.to_string(),
            };
            if v.is_empty() || Path::new(v).is_absolute() {
                return part.to_string();
            }
            let abs = absolute(Path::new(v)).display().to_string();
            match k {
                Some(k) => format!("{k}={abs}"),
                None => abs,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

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
    #[arg(long, value_name = "N", default_value_t = vireo_api::vm::DEFAULT_VCPUS)]
    pub cpus: u32,

    /// Guest memory in MiB (or with M or G: 512M, 2G).
    #[arg(long, value_name = "MIB", default_value_t = vireo_api::vm::DEFAULT_MEMORY)]
    pub memory: MemorySize,

    /// Which backend runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,

    #[command(flatten)]
    pub devices: DeviceArgs,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// A guest kit made by `vireo image build` (replaces --kernel).
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    pub image: Option<PathBuf>,

    /// Kernel image (replaces --image).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs).
    #[arg(long, value_name = "PATH", conflicts_with = "no_initrd")]
    pub initrd: Option<PathBuf>,

    /// Remove the initrd.
    #[arg(long)]
    pub no_initrd: bool,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", conflicts_with = "no_cmdline")]
    pub cmdline: Option<String>,

    /// Go back to the default command line.
    #[arg(long)]
    pub no_cmdline: bool,

    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,

    /// Guest memory in MiB (or with M or G: 512M, 2G).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<MemorySize>,

    /// Which backend runs the guest.
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,

    #[command(flatten)]
    pub devices: DeviceArgs,

    /// Remove every disk.
    #[arg(long, conflicts_with = "disk")]
    pub no_disks: bool,

    /// Remove every network device.
    #[arg(long, conflicts_with = "net")]
    pub no_nets: bool,

    /// Remove the vsock device.
    #[arg(long, conflicts_with = "vsock")]
    pub no_vsock: bool,

    /// Remove the rng device.
    #[arg(long, conflicts_with = "rng")]
    pub no_rng: bool,

    /// Remove the balloon device.
    #[arg(long, conflicts_with = "balloon")]
    pub no_balloon: bool,
}

#[derive(Debug, Args)]
pub struct BalloonArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Set the balloon's target: how much memory (MiB) it takes from the guest.
    #[arg(long, value_name = "MIB")]
    pub target: Option<u64>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
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
pub struct ConsoleArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Print the scrollback (the last 256 KiB) and exit instead of attaching.
    #[arg(long)]
    pub scrollback: bool,
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
    let mut listen = args
        .listen
        .iter()
        .map(|l| vireo_daemon::parse_listen(l).map_err(Failure::Usage))
        .collect::<Result<Vec<_>, _>>()?;
    if listen.is_empty() {
        listen.push(vireo_daemon::Listen::Unix(paths::default_socket()));
    }
    for l in &mut listen {
        if let vireo_daemon::Listen::Unix(p) = l {
            *p = absolute(p);
        }
    }
    let vmm = std::env::current_exe()
        .map_err(|e| Failure::Vm(format!("cannot find the vireo binary to run VMs with: {e}")))?;
    if !args.no_jail {
        // Refuse at once what would make every VM start fail.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Failure::Usage(
                "vireo serve runs every VM jailed, which needs root: run the daemon as root, \
                 or pass --no-jail to run VMs unconfined as your user (debugging only)"
                    .into(),
            ));
        }
        vireo_sandbox::cgroup::detect().map_err(|e| {
            Failure::Usage(format!(
                "vireo serve runs every VM in a cgroup, and {e} (or pass --no-jail, debugging only)"
            ))
        })?;
    }
    let cfg = vireo_daemon::ServeConfig {
        state_dir: absolute(&state_dir),
        listen,
        tls_cert: args.tls_cert.as_deref().map(absolute),
        tls_key: args.tls_key.as_deref().map(absolute),
        vmm,
        storage: args.storage.iter().map(|d| absolute(d)).collect(),
        max_connections: args.max_connections,
        no_jail: args.no_jail,
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
    let client = api_client::client(args.conn)?;
    match args.command {
        VmCommand::Create(a) => create(&client, a),
        VmCommand::Update(a) => update(&client, a),
        VmCommand::Balloon(a) => balloon(&client, a),
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
        VmCommand::Console(a) => console(&client, a),
        VmCommand::Reboot(a) => {
            let vm: Vm = client.call("POST", &vm_path(&a.name, "/reboot"), None)?;
            match (vm.state.is_active(), vm.pid) {
                (true, Some(pid)) => println!("rebooted {} (pid {pid})", vm.name),
                _ => {
                    return Err(Failure::Vm(format!(
                        "{} did not come back: {}",
                        vm.name,
                        describe_state(&vm)
                    )))
                }
            }
            Ok(())
        }
        VmCommand::Edit(a) => edit(&client, a),
        VmCommand::Snapshot(a) => snapshot(&client, a),
        VmCommand::Snapshots(a) => snapshots(&client, a),
        VmCommand::Restore(a) => {
            let vm: Vm = client.call_with_timeout(
                "POST",
                &snapshot_path(&a.name, &a.tag, "/restore"),
                None,
                SNAPSHOT_TIMEOUT,
            )?;
            println!(
                "restored {} from snapshot {} ({})",
                vm.name,
                a.tag,
                match vm.pid {
                    Some(pid) => format!("pid {pid}"),
                    None => describe_state(&vm),
                }
            );
            Ok(())
        }
        VmCommand::Clone(a) => {
            let body = serde_json::to_vec(&CloneVm {
                name: a.new.clone(),
                from_snapshot: a.from_snapshot.clone(),
            })
            .expect("serialisable");
            let vm: Vm = client.call_with_timeout(
                "POST",
                &vm_path(&a.name, "/clone"),
                Some(&body),
                SNAPSHOT_TIMEOUT,
            )?;
            println!(
                "cloned {} from {}@{} ({})",
                vm.name,
                a.name,
                a.from_snapshot,
                match vm.pid {
                    Some(pid) => format!("pid {pid}"),
                    None => describe_state(&vm),
                }
            );
            Ok(())
        }
        VmCommand::Migrate(a) => migrate(&client, a),
        VmCommand::SnapshotDelete(a) => {
            client.request(
                "DELETE",
                &snapshot_path(&a.name, &a.tag, ""),
                None,
                DEFAULT_TIMEOUT,
            )?;
            println!("deleted snapshot {} of {}", a.tag, a.name);
            Ok(())
        }
    }
}

/// How long a snapshot, restore or clone may take (a big VM's memory and
/// disks are written or read).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);

fn snapshot_path(name: &str, tag: &str, suffix: &str) -> String {
    let tag = vm_path(tag, "");
    let tag = tag.trim_start_matches("/v1/vms/");
    vm_path(name, &format!("/snapshots/{tag}{suffix}"))
}

fn migrate(client: &Client, a: MigrateArgs) -> Result<(), Failure> {
    let token = match &a.target_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Failure::Usage(format!("--target-token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("VIREO_TARGET_TOKEN").ok(),
    };
    let ca_cert = match &a.target_ca_cert {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Failure::Usage(format!("--target-ca-cert {}: {e}", f.display())))?,
        ),
        None => None,
    };
    let body = serde_json::to_vec(&vireo_daemon::vms::Migrate {
        to: a.to.clone(),
        token,
        ca_cert,
        postcopy: a.postcopy,
    })
    .expect("serialisable");
    let done: vireo_daemon::vms::Migrated = client.call_with_timeout(
        "POST",
        &vm_path(&a.name, "/migrate"),
        Some(&body),
        SNAPSHOT_TIMEOUT,
    )?;
    let m = &done.migration;
    println!(
        "migrated {} to {} in {} ms ({} ms paused, {} round(s), {} sent)",
        done.vm,
        done.to,
        m.total_ms,
        m.downtime_ms,
        m.rounds,
        mib(m.bytes_sent)
    );
    if let Some(pc) = &m.postcopy {
        println!(
            "post-copy: {} page(s) fetched on demand, {} pushed, {} ms until the last",
            pc.pages_requested, pc.pages_pushed, pc.postcopy_ms
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

fn snapshot(client: &Client, a: SnapshotArgs) -> Result<(), Failure> {
    let body = serde_json::to_vec(&CreateSnapshot {
        tag: a.tag,
        diff: a.diff,
    })
    .expect("serialisable");
    let bytes = client.request(
        "POST",
        &vm_path(&a.name, "/snapshots"),
        Some(&body),
        SNAPSHOT_TIMEOUT,
    )?;
    if a.json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let s: Snapshot = decode(&bytes)?;
    println!(
        "{}: snapshot {} taken ({} memory, {} disk(s), {} on disk{})",
        s.vm,
        s.tag,
        mib(s.memory_bytes),
        s.disks.len(),
        mib(s.size_bytes),
        s.parent
            .as_deref()
            .map(|p| format!(", diff of {p}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn snapshots(client: &Client, a: SnapshotsArgs) -> Result<(), Failure> {
    let bytes = client.request(
        "GET",
        &vm_path(&a.name, "/snapshots"),
        None,
        DEFAULT_TIMEOUT,
    )?;
    if a.json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let list: SnapshotList = decode(&bytes)?;
    if list.snapshots.is_empty() {
        println!(
            "{} has no snapshots; take one with `vireo vm snapshot {}`",
            a.name, a.name
        );
        return Ok(());
    }
    let mut rows = vec![[
        "TAG".to_string(),
        "CREATED".into(),
        "STATE".into(),
        "MEMORY".into(),
        "DISKS".into(),
        "SIZE".into(),
        "PARENT".into(),
        "CLONES".into(),
    ]];
    for s in &list.snapshots {
        rows.push([
            s.tag.clone(),
            s.created_at.clone(),
            s.vm_state.as_str().into(),
            mib(s.memory_bytes),
            s.disks.len().to_string(),
            mib(s.size_bytes),
            s.parent.clone().unwrap_or_else(|| "-".into()),
            if s.clones.is_empty() {
                "-".into()
            } else {
                s.clones.join(",")
            },
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

/// Whether stdin has bytes to send (a pipe, socket or file), as opposed to
/// a terminal, /dev/null or nothing.
fn stdin_has_input() -> bool {
    // SAFETY: fstat fills a plain struct for fd 0 (or fails).
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(libc::STDIN_FILENO, &mut st) != 0 {
            return false;
        }
        matches!(
            st.st_mode & libc::S_IFMT,
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG
        )
    }
}

fn console(client: &Client, a: ConsoleArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let live = !a.scrollback
        && (std::io::stdin().is_terminal() || std::io::stdout().is_terminal() || stdin_has_input());
    if !live {
        let bytes = client.request("GET", &vm_path(&a.name, "/console"), None, DEFAULT_TIMEOUT)?;
        let mut out = std::io::stdout().lock();
        return out
            .write_all(&bytes)
            .and_then(|_| out.flush())
            .map_err(|e| Failure::Vm(format!("writing the console to stdout: {e}")));
    }
    let vm: Vm = client.call("GET", &vm_path(&a.name, ""), None)?;
    if !vm.state.is_active() {
        return Err(Failure::Usage(format!(
            "VM {} is {}: start it with `vireo vm start {}` (its last output: `vireo vm console {} --scrollback`)",
            vm.name,
            describe_state(&vm),
            vm.name,
            vm.name
        )));
    }
    // The session polls: a read returns after a short while without data.
    // Connect (and shake hands) with the default timeout, then poll.
    let stream = client.connect()?;
    stream
        .set_timeouts(console_client::POLL)
        .map_err(|e| Failure::Vm(format!("console connection to {}: {e}", client.describe())))?;
    let ws = console_client::open(
        stream,
        &vm_path(&a.name, "/console/ws"),
        client.auth_header(),
    )?;
    console_client::attach(ws, &a.name).map(|_| ())
}

fn edit(client: &Client, a: NameArgs) -> Result<(), Failure> {
    let vm: Vm = client.call("GET", &vm_path(&a.name, ""), None)?;
    if vm.state.is_active() {
        return Err(Failure::Usage(format!(
            "VM {} is {}: stop it before editing its definition (`vireo vm stop {}`)",
            vm.name,
            vm.state.as_str(),
            vm.name
        )));
    }
    let path = vm_path(&a.name, "");
    match vm_edit::edit(&vm, |body| Ok(client.call("PATCH", &path, Some(body))?))? {
        None => println!("no changes"),
        Some((vm, fields)) => println!(
            "updated {} ({}): {} vCPU, {} MiB, {}{}",
            vm.name,
            fields.join(", "),
            vm.vcpus,
            vm.memory_mib,
            vm.accel.as_str(),
            device_summary(&vm)
        ),
    }
    Ok(())
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
        accel: a.accel,
        disks: a.devices.disks(),
        nets: a.devices.net.clone(),
        vsock: a.devices.vsock(),
        rng: a.devices.rng.clone(),
        balloon: a.devices.balloon.clone(),
    };
    let body = serde_json::to_vec(&req).expect("serialisable");
    let vm: Vm = client.call("POST", "/v1/vms", Some(&body))?;
    println!(
        "created {} ({} vCPU, {} MiB, {}{}); start it with `vireo vm start {}`",
        vm.name,
        vm.vcpus,
        vm.memory_mib,
        vm.accel.as_str(),
        device_summary(&vm),
        vm.name
    );
    Ok(())
}

/// The PATCH body for `vm update`: only what was given.
fn update_body(a: &UpdateArgs) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{json, Value};
    let path = |p: &PathBuf| Value::from(absolute(p).display().to_string());
    let mut m = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    if let Some(p) = &a.image {
        set("image", path(p));
        set("kernel", Value::Null);
    }
    if let Some(p) = &a.kernel {
        set("kernel", path(p));
        set("image", Value::Null);
    }
    if let Some(p) = &a.initrd {
        set("initrd", path(p));
    }
    if a.no_initrd {
        set("initrd", Value::Null);
    }
    if let Some(c) = &a.cmdline {
        set("cmdline", c.as_str().into());
    }
    if a.no_cmdline {
        set("cmdline", Value::Null);
    }
    if let Some(n) = a.cpus {
        set("vcpus", n.into());
    }
    if let Some(n) = a.memory {
        set("memory_mib", n.mib().into());
    }
    if let Some(x) = a.accel {
        set("accel", x.as_str().into());
    }
    let d = &a.devices;
    if !d.disk.is_empty() || a.no_disks {
        set("disks", json!(d.disks()));
    }
    if !d.net.is_empty() || a.no_nets {
        set("nets", json!(d.net));
    }
    for (key, given, remove) in [
        ("vsock", d.vsock(), a.no_vsock),
        ("rng", d.rng.clone(), a.no_rng),
        ("balloon", d.balloon.clone(), a.no_balloon),
    ] {
        if let Some(v) = given {
            set(key, v.into());
        } else if remove {
            set(key, Value::Null);
        }
    }
    m
}

fn update(client: &Client, a: UpdateArgs) -> Result<(), Failure> {
    let body = update_body(&a);
    if body.is_empty() {
        return Err(Failure::Usage(format!(
            "nothing to change: give the options to change, e.g. `vireo vm update {} --memory 512` (see --help)",
            a.name
        )));
    }
    let body = serde_json::to_vec(&body).expect("serialisable");
    let vm: Vm = client.call("PATCH", &vm_path(&a.name, ""), Some(&body))?;
    println!(
        "updated {} ({} vCPU, {} MiB, {}{})",
        vm.name,
        vm.vcpus,
        vm.memory_mib,
        vm.accel.as_str(),
        device_summary(&vm)
    );
    Ok(())
}

/// `, 2 disks, 1 net, rng` (empty without devices).
fn device_summary(vm: &Vm) -> String {
    let plural = |n: usize, one: &str, many: &str| match n {
        0 => None,
        1 => Some(format!("1 {one}")),
        n => Some(format!("{n} {many}")),
    };
    let parts: Vec<String> = [
        plural(vm.disks.len(), "disk", "disks"),
        plural(vm.nets.len(), "net", "nets"),
        vm.vsock.as_ref().map(|_| "vsock".to_string()),
        vm.rng.as_ref().map(|_| "rng".to_string()),
        vm.balloon.as_ref().map(|_| "balloon".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.iter().map(|p| format!(", {p}")).collect()
}

fn balloon(client: &Client, a: BalloonArgs) -> Result<(), Failure> {
    let path = vm_path(&a.name, "/balloon");
    let bytes = match a.target {
        Some(target_mib) => {
            let body = serde_json::to_vec(&SetBalloon { target_mib }).expect("serialisable");
            client.request("PUT", &path, Some(&body), DEFAULT_TIMEOUT)?
        }
        None => client.request("GET", &path, None, DEFAULT_TIMEOUT)?,
    };
    if a.json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let b: BalloonStatus = decode(&bytes)?;
    let mib = |v: Option<u64>| v.map(|v| format!("{v} MiB")).unwrap_or_else(|| "?".into());
    println!(
        "{}: balloon target {} MiB, actual {} MiB; guest memory: total {}, available {}, free {}",
        a.name,
        b.target_mib,
        b.actual_mib,
        mib(b.total_mib),
        mib(b.available_mib),
        mib(b.free_mib)
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
    let mut rows = vec![
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
        [
            "uptime".into(),
            opt(&vm.uptime_secs.map(|s| format!("{s} s"))),
        ],
        ["last exit".into(), opt(&vm.last_exit)],
        ["last exit at".into(), opt(&vm.last_exit_at)],
    ];
    // One line per device, in `vireo run` flag order.
    let device = |v: &Option<String>| {
        v.as_ref().map(|s| {
            if s.is_empty() {
                "(defaults)".to_string()
            } else {
                s.clone()
            }
        })
    };
    let devices: Vec<[String; 2]> = vm
        .disks
        .iter()
        .map(|d| ["disk".to_string(), d.clone()])
        .chain(vm.nets.iter().map(|n| ["net".to_string(), n.clone()]))
        .chain(device(&vm.vsock).map(|v| ["vsock".to_string(), v]))
        .chain(device(&vm.rng).map(|v| ["rng".to_string(), v]))
        .chain(device(&vm.balloon).map(|v| ["balloon".to_string(), v]))
        .collect();
    if devices.is_empty() {
        rows.insert(10, ["devices".into(), "-".into()]);
    }
    for (i, d) in devices.into_iter().enumerate() {
        rows.insert(10 + i, d);
    }
    for [k, v] in rows {
        println!("{:<14}{v}", format!("{k}:"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded_in_paths() {
        assert_eq!(vm_path("web-1.a_b", "/start"), "/v1/vms/web-1.a_b/start");
        assert_eq!(vm_path("a b/c", ""), "/v1/vms/a%20b%2Fc");
    }

    #[test]
    fn device_paths_are_made_absolute() {
        let cwd = std::env::current_dir().unwrap().display().to_string();
        assert_eq!(
            absolute_option("d.qcow2,readonly=on", "path", true),
            format!("{cwd}/d.qcow2,readonly=on")
        );
        assert_eq!(
            absolute_option("id=x,path=sub/d.raw", "path", true),
            format!("id=x,path={cwd}/sub/d.raw")
        );
        assert_eq!(
            absolute_option("path=/abs.img,id=rel", "path", true),
            "path=/abs.img,id=rel"
        );
        assert_eq!(
            absolute_option("cid=3,socket=vm.sock", "socket", false),
            format!("cid=3,socket={cwd}/vm.sock")
        );
        // Not a key=value path: left for the daemon to refuse.
        assert_eq!(absolute_option("cid=3", "socket", false), "cid=3");
        assert_eq!(absolute_option("readonly=on", "path", true), "readonly=on");
    }

    #[test]
    fn update_sends_only_what_was_given() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(subcommand)]
            vm: VmCommand,
        }
        let body = |args: &[&str]| {
            let t = T::try_parse_from(["t", "update", "web"].iter().chain(args)).unwrap();
            let VmCommand::Update(a) = t.vm else {
                panic!("not update")
            };
            serde_json::Value::Object(update_body(&a))
        };
        assert_eq!(body(&[]), serde_json::json!({}));
        assert_eq!(
            body(&["--memory", "64", "--rng", "--no-balloon", "--net", "tap0"]),
            serde_json::json!({"memory_mib": 64, "rng": "", "balloon": null, "nets": ["tap0"]})
        );
        assert_eq!(
            body(&["--rng=bw=1M", "--no-disks", "--balloon=target=8"]),
            serde_json::json!({"rng": "bw=1M", "disks": [], "balloon": "target=8"})
        );
        assert_eq!(
            body(&["--image", "/kit"]),
            serde_json::json!({"image": "/kit", "kernel": null})
        );
        assert!(T::try_parse_from(["t", "update", "web", "--rng", "--no-rng"]).is_err());
    }

    #[test]
    fn tables_align() {
        let t = table(&[["A".to_string(), "BB".into()], ["ccc".into(), "d".into()]]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
