//! The flags of `vireo serve` and `vireo vm ...` (clap definitions, help
//! texts and examples); the verbs that carry them out are in the parent
//! module.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use vireo_api::units::MemorySize;
use vireo_api::vm::Accel;

use crate::api_client::ConnArgs;

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
    pub(super) fn disks(&self) -> Vec<String> {
        self.disk
            .iter()
            .map(|d| absolute_option(d, "path", true))
            .collect()
    }

    pub(super) fn vsock(&self) -> Option<String> {
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
    #[arg(long, value_name = "SECS", default_value_t = vireo_api::model::DEFAULT_STOP_TIMEOUT_SECS)]
    pub timeout: u64,
}

/// `p` made absolute against the working directory (the daemon does not
/// share it).
pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
