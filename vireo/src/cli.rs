//! The command line: every verb and flag, with help text and examples.

use std::path::PathBuf;

use vireo_api::vm::{Accel, LimitError, MIN_MEMORY};

use clap::{Args, Parser, Subcommand, ValueEnum};
use vireo_api::units::MemorySize;

const ABOUT: &str = "vireo: a virtual machine monitor for Linux KVM";

const LONG_ABOUT: &str = "\
vireo runs virtual machines on Linux KVM: one process per VM, the guest's
serial console on your terminal.

Quick start (builds a guest from Debian's packages, then boots it):
  vireo image build --out guest-kit
  vireo run --image guest-kit";

#[derive(Debug, Parser)]
#[command(name = "vireo", version = vireo_daemon::version::LONG, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug). VIREO_LOG=filter overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size of `run`'s many flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux guest in this process, its serial console on this terminal.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Build guest kits; create, inspect and convert disk images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the vireo daemon: VM definitions, their processes and the REST API.
    #[command(after_help = crate::vm_cli::args::SERVE_EXAMPLES)]
    Serve(crate::vm_cli::args::ServeArgs),
    /// Manage VMs through the daemon: create, list, show, start, stop, console.
    #[command(long_about = crate::vm_cli::args::VM_ABOUT)]
    Vm(crate::vm_cli::args::VmArgs),
    /// Manage the API tokens of TCP (TLS) clients: create, list, revoke.
    #[command(long_about = crate::token_cli::TOKEN_ABOUT)]
    Token(crate::token_cli::TokenArgs),
    /// Open the daemon's web UI through a local port (127.0.0.1) for a
    /// daemon that listens only on its Unix socket.
    #[command(after_help = crate::ui::UI_EXAMPLES)]
    Ui(crate::ui::UiArgs),
    /// Check this host for VMs and their jail: /dev/kvm, VT-x/AMD-V or PVM,
    /// what --accel auto picks, cgroups, namespaces, seccomp, Landlock,
    /// userfaultfd, TAP, nftables, free space, the daemon's socket, the web UI.
    #[command(after_help = crate::doctor::DOCTOR_EXAMPLES)]
    Doctor(crate::doctor::DoctorArgs),
    /// Print the shell completion script for SHELL on stdout (packaging;
    /// hidden from help).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vireo.1 and one per subcommand, vireo-run.1,
    /// ...) into DIR (packaging; hidden from help).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

const RUN_EXAMPLES: &str = "\
Examples:
  vireo run --image guest-kit
  vireo run --image guest-kit --append 'vireo.run=uname -a'
  vireo run --kernel vmlinuz --initrd initrd.img --cpus 2 --memory 512
  vireo run --kernel vmlinux --cmdline 'console=ttyS0 panic=-1 reboot=k'
  vireo run --kernel vmlinux --accel emu      # no /dev/kvm: software emulator
  vireo run --image guest-kit --disk path=disk.qcow2,format=qcow2 --net tap=tap0 --rng --balloon
  vireo run --image guest-kit --vsock cid=3,socket=/tmp/vm.vsock   # host port P: /tmp/vm.vsock_P
  vireo run --kernel vmlinux --control-socket /tmp/vm.sock   # then: echo 'snapshot /tmp/snap1' | nc -U /tmp/vm.sock
  vireo run --restore /tmp/snap1 [--restore-lazy]            # continue from the snapshot (disks rolled back)
  vireo run --restore /tmp/snap1 --restore-lazy --disk id=root,path=clone.qcow2,format=qcow2 --net id=net0,tap=tap1   # a clone
  sudo vireo run --jail --kernel vmlinux --control-socket /run/vm1/ctl.sock --cgroup vm1   # jailed, as the daemon runs VMs

Live migration: the target runs with its own definition (the same --cpus,
--memory and device flags as the source; disks on shared storage) and checks
the source's machine against it. On one host, over a Unix socket:
  vireo run --migrate-from unix:/tmp/mig.sock --cpus 2 --memory 512 --disk path=disk.raw,format=raw
  echo 'migrate-to unix:/tmp/mig.sock' | nc -U /tmp/vm.sock  # on the source's control socket
Between hosts, over TLS with a one-time secret (the file travels out of band):
  (umask 077; openssl rand -hex 32 > secret)
  vireo run --migrate-from tcp:0.0.0.0:4444 --migrate-tls-cert cert.pem --migrate-tls-key key.pem \\
      --migrate-secret-file secret --cpus 2 --memory 512 --disk path=/shared/disk.raw,format=raw
  echo 'migrate-to tcp:target.example:4444 --ca ca.pem --secret-file secret' | nc -U /tmp/vm.sock

The guest's COM1 is this terminal: output to stdout, stdin to the guest
(raw mode on a terminal; press Ctrl-A then x to quit). vireo exits 0 when the
guest powers off or resets, 1 when the VM fails, 2 on bad input.";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: a 64-bit ELF vmlinux or a bzImage (e.g. /boot/vmlinuz-*).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["image", "restore", "migrate_from"],
        conflicts_with_all = ["image", "restore", "migrate_from"]
    )]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) to load with the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// A guest kit made by `vireo image build`: its kernel, initrd and command line.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["restore", "migrate_from"])]
    pub image: Option<PathBuf>,

    /// Start the VM from a snapshot directory (written by the control
    /// socket's `snapshot DIR`) instead of booting: the machine (backend,
    /// vCPUs, memory, devices) is the one recorded in the snapshot, and
    /// each writable disk is rolled back to the snapshot's copy. With it,
    /// `--disk id=ID,path=FILE` opens that disk from FILE instead (no
    /// rollback), `--net id=ID,tap=NAME` and `--vsock cid=N,socket=PATH`
    /// replace a saved TAP or socket; other device flags are refused.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,

    /// With --restore: map the snapshot's memory file copy-on-write
    /// (MAP_PRIVATE) instead of reading it, so the VM runs in milliseconds
    /// whatever its size. The memory file's checksum is then not verified
    /// (its size and layout are), and it must not change while the VM runs.
    #[arg(long, requires = "restore")]
    pub restore_lazy: bool,

    /// Receive a live migration instead of booting: listen on unix:PATH
    /// (a socket on this host, made 0600) or tcp:HOST:PORT (port 0: any
    /// free port; TLS and source authentication required), printing
    /// `migration: listening on ADDR`; take one source's stream (sent by
    /// its control-socket command `migrate-to`), then run the VM. The
    /// target builds its machine from its OWN flags, which are required:
    /// --cpus, --memory and the device flags (--disk, --net, --vsock,
    /// --rng, --balloon, --virtio-console) as the source was started;
    /// a source whose machine differs (vCPUs, memory, device kinds, ids,
    /// count, disk formats, read-only flags) is refused and keeps running.
    /// Exits 2 if the stream fails or is corrupt.
    #[arg(
        long,
        value_name = "unix:PATH|tcp:HOST:PORT",
        conflicts_with = "restore"
    )]
    pub migrate_from: Option<String>,

    /// With --migrate-from tcp:...: serve the stream over TLS with this
    /// certificate (PEM); the source then passes `--ca` to `migrate-to`.
    #[arg(long, value_name = "PEM", requires_all = ["migrate_from", "migrate_tls_key"])]
    pub migrate_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --migrate-tls-cert.
    #[arg(long, value_name = "PEM", requires_all = ["migrate_from", "migrate_tls_cert"])]
    pub migrate_tls_key: Option<PathBuf>,

    /// With --migrate-from: a file holding the one-time secret the source
    /// must send first (`migrate-to ... --secret-file FILE`; at least 16
    /// characters, e.g. from /dev/urandom). A source without it is refused
    /// and the target keeps waiting (at most 5 failures, 1 s apart).
    #[arg(long, value_name = "FILE", requires = "migrate_from")]
    pub migrate_secret_file: Option<PathBuf>,

    /// With --migrate-from tcp:...: sources must present a TLS client
    /// certificate issued by this CA (PEM); the source gives `--cert` and
    /// `--key` to `migrate-to`.
    #[arg(long, value_name = "PEM", requires_all = ["migrate_from", "migrate_tls_cert"])]
    pub migrate_client_ca: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 panic=-1 reboot=k", or the kit's].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Text appended to the kernel command line (e.g. "vireo.run=uname -a").
    #[arg(long, value_name = "STRING")]
    pub append: Option<String>,

    /// Number of vCPUs [default: 1; required with --migrate-from].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,

    /// Guest memory in MiB (or with an M or G suffix) [default: 256;
    /// required with --migrate-from].
    #[arg(long, value_name = "MIB")]
    pub memory: Option<MemorySize>,

    /// Which backend runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,

    /// A virtio-blk disk (repeatable; the first is vda):
    /// `path=FILE[,readonly=on][,id=NAME][,serial=S][,format=raw|qcow2][,bw=10M][,ops=1000]`.
    #[arg(long, value_name = "OPTS")]
    pub disk: Vec<String>,

    /// A directory backing files of --disk images may also live in
    /// (repeatable; a daemon's storage directories). Without it a qcow2
    /// image's backing file must be in the image's own directory.
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,

    /// A virtio-net device on a TAP (repeatable):
    /// `tap=NAME[,mac=52:54:00:12:34:56][,mtu=N][,bw=100M][,ops=20000]`.
    /// The TAP is opened or created (that needs CAP_NET_ADMIN, or a TAP made
    /// for your user with `ip tuntap add NAME mode tap user $USER`).
    #[arg(long, value_name = "OPTS")]
    pub net: Vec<String>,

    /// A virtio-vsock device: `cid=N,socket=PATH`. A guest connection to
    /// host port P goes to the Unix socket PATH_P; a host program connects
    /// to PATH and writes `CONNECT P` to reach guest port P.
    #[arg(long, value_name = "OPTS")]
    pub vsock: Option<String>,

    /// A virtio-rng device fed from the host's getrandom(2); `bw=1M` limits
    /// it to that many bytes per second.
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<String>,

    /// A virtio-balloon device: `target=MIB` (memory taken from the guest at
    /// start), `deflate_on_oom=on|off`, `free_page_reporting=on|off` (the
    /// guest hands freed memory back to the host; default on).
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub balloon: Option<String>,

    /// A virtio-console device (hvc0) on this terminal: stdin goes to it
    /// instead of the UART. Boot the guest with console=hvc0. `cols=N,rows=M`
    /// sets its size.
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub virtio_console: Option<String>,

    /// Unix socket on which to accept `pause`, `resume`, `power-button`,
    /// `status`, `snapshot [--paused] DIR` ... commands (one line each; a
    /// JSON line answers). The daemon uses it.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// The control socket's `snapshot DIR` writes only beneath this
    /// directory (the daemon passes its VM's snapshots directory). Without
    /// it DIR may be any new directory outside /proc, /sys, /dev, /etc,
    /// /boot and /usr whose parent is not reached through a symlink.
    #[arg(long, value_name = "DIR", requires = "control_socket")]
    pub snapshot_dir_root: Option<PathBuf>,

    /// Run without the per-thread seccomp filters (they are on by default:
    /// each vCPU, device, control and migration thread may make only the
    /// syscalls its job needs, and any other kills the VM). For debugging
    /// only: a guest that escapes into a thread then has every syscall.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Run the VM jailed (needs root), as the daemon runs every VM: its own
    /// cgroup (cpu, memory, pids limits), PID, mount, IPC, UTS and network
    /// namespaces, a tmpfs root holding only the control and vsock socket
    /// directories and the disks (read-only, for snapshots), an unprivileged
    /// uid/gid, no capabilities, no_new_privs, rlimits. The process started
    /// stays as a small supervisor (signals forwarded, the VM's exit status
    /// returned); the VMM is its child. See `vireo doctor`.
    #[arg(long, conflicts_with = "no_jail", help_heading = "Jail")]
    pub jail: bool,

    /// Run without the jail (the default for a direct `vireo run`; the
    /// daemon passes it only when started with `vireo serve --no-jail`).
    #[arg(long, help_heading = "Jail")]
    pub no_jail: bool,

    /// With --jail: the uid the VM runs as [default: 65534, nobody].
    #[arg(long, value_name = "UID", requires = "jail", help_heading = "Jail")]
    pub jail_uid: Option<u32>,

    /// With --jail: the gid the VM runs as [default: the uid given, else 65534].
    #[arg(long, value_name = "GID", requires = "jail", help_heading = "Jail")]
    pub jail_gid: Option<u32>,

    /// With --jail: an empty directory the jail's root (a tmpfs, seen only
    /// by the VM) is mounted on [default: /run/vireo/jail].
    #[arg(long, value_name = "DIR", requires = "jail", help_heading = "Jail")]
    pub jail_dir: Option<PathBuf>,

    /// With --jail: `own` (an empty network namespace from the start: TAPs
    /// and a --migrate-from listener are opened in the host's before the
    /// jail locks, an outgoing migration uses TCP sockets kept from it) or
    /// `host`.
    #[arg(long, value_enum, default_value_t = JailNetArg::Own, help_heading = "Jail")]
    pub jail_net: JailNetArg,

    /// With --jail: a host path (file or directory) the VM also sees, at
    /// the same path, writable (repeatable).
    #[arg(long, value_name = "PATH", requires = "jail", help_heading = "Jail")]
    pub jail_bind: Vec<PathBuf>,

    /// With --jail: an inherited descriptor to keep open (all but 0-2 are
    /// closed; repeatable). The daemon keeps its console pipes, 3 and 4.
    #[arg(long, value_name = "FD", requires = "jail", help_heading = "Jail")]
    pub jail_keep_fd: Vec<i32>,

    /// With --jail: the VM's cgroup, `vireo/NAME` beneath this process's
    /// own (v2, or v1's cpu, memory and pids hierarchies) [default: run-PID].
    #[arg(long, value_name = "NAME", requires = "jail", help_heading = "Jail")]
    pub cgroup: Option<String>,

    /// With --jail: CPU time limit in CPUs (1.5 = one and a half) [default: vCPUs + 1].
    #[arg(long, value_name = "CPUS", requires = "jail", help_heading = "Jail")]
    pub cgroup_cpus: Option<f64>,

    /// With --jail: memory limit in MiB [default: --memory + 256 for the VMM].
    #[arg(long, value_name = "MIB", requires = "jail", help_heading = "Jail")]
    pub cgroup_memory: Option<u64>,

    /// With --jail: pids.max (threads count) [default: 256].
    #[arg(long, value_name = "N", requires = "jail", help_heading = "Jail")]
    pub cgroup_pids: Option<u64>,

    /// With --jail: the largest file the VM may write, in MiB (RLIMIT_FSIZE) [default: 16 TiB].
    #[arg(long, value_name = "MIB", requires = "jail", help_heading = "Jail")]
    pub jail_max_file_size: Option<u64>,
}

/// `--jail-net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JailNetArg {
    /// A network namespace of its own, empty.
    Own,
    /// The host's network namespace.
    Host,
}

/// A definition's quantity out of its limits, named by its flag.
pub fn limit_usage(e: &LimitError) -> String {
    match e {
        LimitError::VcpuCount { requested, max } => {
            format!("--cpus {requested}: this backend runs 1 to {max} vCPUs")
        }
        LimitError::MemoryTooSmall { requested } => {
            format!("--memory {}: at least {MIN_MEMORY}", requested.mib())
        }
        LimitError::MemoryTooLarge { requested, host } => format!(
            "--memory {}: more than this host's {host} of RAM and swap",
            requested.mib()
        ),
        LimitError::BalloonTooLarge { target_mib, memory } => format!(
            "--balloon target={target_mib}: must be less than --memory {} (the balloon takes \
             that much from the guest)",
            memory.mib()
        ),
    }
}

impl RunArgs {
    /// The vCPUs to run.
    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or(vireo_api::vm::DEFAULT_VCPUS)
    }

    /// The guest memory.
    pub fn memory(&self) -> MemorySize {
        self.memory.unwrap_or(vireo_api::vm::DEFAULT_MEMORY)
    }
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest kit: Debian's kernel and a busybox initramfs written by vireo.
    #[command(after_help = IMAGE_BUILD_EXAMPLES)]
    Build(ImageBuildArgs),
    /// Create an empty disk image: qcow2 (optionally over a backing file) or raw.
    #[command(after_help = IMAGE_CREATE_EXAMPLES)]
    Create(ImageCreateArgs),
    /// Show a disk image's format, sizes and backing chain.
    #[command(after_help = IMAGE_INFO_EXAMPLES)]
    Info(ImageInfoArgs),
    /// Copy a disk image (with its backing chain) into a new qcow2 or raw file.
    #[command(after_help = IMAGE_CONVERT_EXAMPLES)]
    Convert(ImageConvertArgs),
}

const IMAGE_BUILD_EXAMPLES: &str = "\
Examples:
  vireo image build                  # into ./guest-kit
  vireo image build --out /var/lib/vireo/kit

Needs apt-get and dpkg-deb and reaches only the Debian package archive
(run `apt-get update` first on a fresh machine). The kit holds vmlinuz,
initrd.img and vireo-kit.conf; boot it with `vireo run --image DIR`.";

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// Directory to write the kit into (created if missing).
    #[arg(long, value_name = "DIR", default_value = "guest-kit")]
    pub out: PathBuf,
}

const IMAGE_CREATE_EXAMPLES: &str = "\
Examples:
  vireo image create disk.qcow2 --size 10G
  vireo image create disk.raw --size 512M --format raw
  vireo image create overlay.qcow2 --backing base.raw      # size of base.raw
  vireo image create small.qcow2 --size 1G --cluster-size 4K

Sizes are bytes or take a K, M, G or T suffix (powers of 1024). A qcow2
image only grows as the guest writes; a raw image is a sparse file. A
relative --backing path is relative to FILE's directory, as with qemu-img;
the backing file is only read, never written. FILE must not exist yet.";

const IMAGE_INFO_EXAMPLES: &str = "\
Examples:
  vireo image info disk.qcow2
  vireo image info overlay.qcow2 --json

Shows each file of the backing chain, top first: format, virtual size,
cluster size, the guest bytes the file holds itself, and its backing file.";

const IMAGE_CONVERT_EXAMPLES: &str = "\
Examples:
  vireo image convert disk.raw disk.qcow2 --format qcow2
  vireo image convert overlay.qcow2 flat.raw --format raw
  vireo image convert disk.img disk.qcow2 --format qcow2 --cluster-size 2M

SRC may be raw or qcow2 (compressed clusters and backing chains included);
DST is a new, standalone file (it must not exist). Zero ranges are not
written, so DST stays sparse. Progress goes to stderr.";

/// Disk image formats vireo writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskFormat {
    /// QEMU copy-on-write v3: grows as written, backing files, compression (read).
    Qcow2,
    /// The file is the disk, byte for byte.
    Raw,
}

#[derive(Debug, Args)]
pub struct ImageCreateArgs {
    /// The new image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Virtual disk size (e.g. 10G, 512M, 1048576) [default: the backing file's].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, required_unless_present = "backing")]
    pub size: Option<u64>,

    /// Image format.
    #[arg(long, value_enum, default_value_t = DiskFormat::Qcow2)]
    pub format: DiskFormat,

    /// Backing file (raw or qcow2) that unwritten parts of the disk read from (qcow2 only).
    #[arg(long, value_name = "FILE")]
    pub backing: Option<PathBuf>,

    /// qcow2 cluster size: a power of two from 512 to 2M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,

    /// A directory the backing image's own backing files may also live in
    /// (repeatable).
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImageInfoArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// A directory backing files may also live in (repeatable); without
    /// it each backing file must be in its overlay's directory.
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImageConvertArgs {
    /// The image to read (raw or qcow2).
    #[arg(value_name = "SRC")]
    pub src: PathBuf,

    /// The new image to write.
    #[arg(value_name = "DST")]
    pub dst: PathBuf,

    /// Format of DST.
    #[arg(long, value_enum, default_value_t = DiskFormat::Qcow2)]
    pub format: DiskFormat,

    /// qcow2 cluster size of DST: a power of two from 512 to 2M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,

    /// A directory SRC's backing files may also live in (repeatable);
    /// without it each backing file must be in its overlay's directory.
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,
}

/// Parses a size: bytes, or a number with a K, M, G, T or P suffix
/// (powers of 1024; "KiB"/"KB" spellings accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let bad =
        || format!("\"{text}\" is not a size: use bytes or a number with K, M, G or T (e.g. 10G)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_needs_a_kernel_or_an_image() {
        assert!(Cli::try_parse_from(["vireo", "run"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--image", "d"]).is_err());
        let c = Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--cpus", "2"]).unwrap();
        match c.command {
            Command::Run(r) => {
                assert_eq!((r.cpus(), r.memory().mib(), r.accel), (2, 256, Accel::Auto))
            }
            _ => panic!("not run"),
        }
    }

    #[test]
    fn unknown_flags_and_bad_values_are_errors() {
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--cpus", "-1"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--accel", "xen"]).is_err());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("9999999P").is_err());
    }

    #[test]
    fn image_verbs_parse() {
        let c =
            Cli::try_parse_from(["vireo", "image", "create", "d.qcow2", "--size", "1G"]).unwrap();
        match c.command {
            Command::Image(ImageCommand::Create(a)) => {
                assert_eq!(
                    (a.size, a.format, a.cluster_size),
                    (Some(1 << 30), DiskFormat::Qcow2, 65536)
                )
            }
            _ => panic!("not create"),
        }
        // A size or a backing file is needed.
        assert!(Cli::try_parse_from(["vireo", "image", "create", "d.qcow2"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "image", "create", "d", "--backing", "b"]).is_ok());
        assert!(Cli::try_parse_from([
            "vireo", "image", "create", "d", "--size", "1G", "--format", "vmdk"
        ])
        .is_err());
        let c = Cli::try_parse_from(["vireo", "image", "convert", "a", "b", "--format", "raw"])
            .unwrap();
        assert!(
            matches!(c.command, Command::Image(ImageCommand::Convert(ref a)) if a.format == DiskFormat::Raw)
        );
        let c = Cli::try_parse_from(["vireo", "image", "info", "a", "--json"]).unwrap();
        assert!(matches!(c.command, Command::Image(ImageCommand::Info(ref a)) if a.json));
    }
}
