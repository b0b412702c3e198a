//! `vireo run`: boot one guest in this process. The flags become a typed
//! [`VmSpec`] for the VMM library; the terminal, the signals and the jail
//! are this front end's; the library's errors come back here to be told
//! by the flag they came from.

use std::path::PathBuf;
use std::sync::Arc;

use vireo_api::devices::balloon::BalloonConfig;
use vireo_api::devices::block::BlockConfig;
use vireo_api::devices::console::ConsoleConfig;
use vireo_api::devices::net::NetConfig;
use vireo_api::devices::rng::RngConfig;
use vireo_api::devices::vsock::VsockConfig;
use vireo_api::options::OptionsError;
use vireo_devices::virtio::block::check_format_given;
use vireo_hypervisor::HypervisorError;
use vireo_vmcore::boot::BootError;
use vireo_vmcore::boot::BootSpec;
use vireo_vmcore::VmControl;
use vireo_vmcore::VmError;
use vireo_vmm::backend::BackendError;
use vireo_vmm::devices::{DeviceConfigs, DeviceError};
use vireo_vmm::incoming::{MachineMismatch, MigrateInError};
use vireo_vmm::migrate::{ListenError, PemFile, ReceiveError, TargetError};
use vireo_vmm::restore::RestoreError;
use vireo_vmm::snapshot_devices::RestoreOverrides;
use vireo_vmm::snapshot_devices::{DeviceDiff, DeviceKind, PeerDevicesError};
use vireo_vmm::start::Error;
use vireo_vmm::{Frontend, GuestConsole, Start, VmSpec, Vmm};

use crate::cli::RunArgs;
use crate::console::{self, RawTerminal};
use crate::signals;
use crate::Failure;
use vireo_guestkit::GuestKit;

const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=k";

pub fn run(args: RunArgs) -> Result<(), Failure> {
    // First, while single-threaded: the jail's cgroup, namespaces and
    // supervisor (only the VMM child returns).
    crate::jail_run::enter(&args)?;
    let spec = spec(&args)?;
    let mut terminal = Terminal::default();
    // The VMM turns the seccomp filters on before any other thread starts
    // (restores and migrations start device and post-copy threads), then
    // builds the machine.
    let vmm = Vmm::build(spec, &mut terminal).map_err(failure)?;
    // Everything is open and no guest code ran: into the jail, before the
    // launcher, the control socket and the vCPUs start.
    crate::jail_run::lock_down(&args, vmm.attached())?;
    vmm.run(&mut terminal).map_err(failure)
}

/// The VM the flags describe.
fn spec(args: &RunArgs) -> Result<VmSpec, Failure> {
    let start = match (&args.restore, &args.migrate_from) {
        (_, Some(uri)) => {
            check_migrate_flags(args)?;
            let secret = args
                .migrate_secret_file
                .as_deref()
                .map(vireo_vmm::migrate::read_secret)
                .transpose()
                .map_err(|e| Failure::Usage(format!("--migrate-secret-file {e}")))?;
            Start::MigrateIn {
                listen: vireo_vmm::migrate::Listen {
                    uri: uri.to_string(),
                    tls: args
                        .migrate_tls_cert
                        .clone()
                        .zip(args.migrate_tls_key.clone()),
                    client_ca: args.migrate_client_ca.clone(),
                    secret,
                },
                devices: parse_devices(args)?,
                mac_given: macs_given(args),
            }
        }
        (Some(dir), None) => {
            check_restore_flags(args, "--restore takes the machine from the snapshot")?;
            Start::Restore {
                dir: dir.clone(),
                lazy: args.restore_lazy,
                overrides: restore_overrides(args)?,
            }
        }
        (None, None) => Start::Boot {
            boot: boot_spec(args)?,
            devices: parse_devices(args)?,
        },
    };
    Ok(VmSpec {
        vcpus: args.cpus(),
        memory: args.memory(),
        accel: args.accel,
        start,
        seccomp: seccomp_policy(args),
        control_socket: args.control_socket.clone(),
        snapshot_dir_root: args.snapshot_dir_root.clone(),
    })
}

/// The per-thread seccomp filters (the default) or, with
/// `--no-seccomp`, none, saying what is lost.
fn seccomp_policy(args: &RunArgs) -> Option<vireo_sandbox::seccomp::Policy> {
    use vireo_sandbox::seccomp;
    if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VM's threads run without seccomp filters; a guest that takes over a vCPU \
             or device thread can make any syscall (open host files, exec programs, make sockets)"
        );
        return None;
    }
    let mut policy = seccomp::Policy::from_env();
    // The jail drops the whole process to its ids after threads run.
    if args.jail {
        let ids = crate::jail_run::ids(args);
        policy.drop_to = Some(seccomp::DropTo {
            uid: ids.uid,
            gid: ids.gid,
        });
    }
    Some(policy)
}

/// The library's error, told by the flag it came from; bad input exits 2,
/// a failure of the VM or the VMM 1.
fn failure(e: Error) -> Failure {
    let user = e.is_user_error();
    let message = match &e {
        Error::SeccompPolicy(e) => {
            format!("{e} (--no-seccomp runs without filters, for debugging)")
        }
        Error::Backend(e) => backend_message(e),
        Error::Boot(e) | Error::Start(e) => vm_message(e),
        Error::Devices(e) => device_message(e),
        Error::Restore { dir, source } => {
            let reason = match source {
                RestoreError::Backend(e) => backend_message(e),
                RestoreError::Device(e) => device_message(e),
                other => other.to_string(),
            };
            format!("--restore {}: {reason}", dir.display())
        }
        Error::Machine(m) => machine_message(m),
        Error::Listen(e) => listen_message(e),
        Error::MigrateIn { uri, source } => {
            format!("--migrate-from {uri}: {}", migrate_in_message(source))
        }
        Error::ControlSocket { path, source } => {
            format!("--control-socket {}: {source}", path.display())
        }
        other => other.to_string(),
    };
    if user {
        Failure::Usage(message)
    } else {
        Failure::Vm(message)
    }
}

/// A VM core error: the core names the quantity, this adds the flag the
/// user gave it with.
fn vm_message(e: &VmError) -> String {
    let flag = match e {
        VmError::Limit { source, .. } => return crate::cli::limit_usage(source),
        VmError::Boot(BootError::InitrdTooLarge { .. } | BootError::GuestMemoryTooSmall(_)) => {
            Some("--memory")
        }
        VmError::Boot(BootError::CmdlineTooLong { .. } | BootError::BadCmdline(_)) => {
            Some("--cmdline/--append")
        }
        _ => None,
    };
    match flag {
        Some(flag) => format!("{e} ({flag})"),
        None => e.to_string(),
    }
}

fn backend_message(e: &BackendError) -> String {
    match e {
        BackendError::Mismatch { saved, accel } => format!(
            "the VM ran on the {saved} backend; it cannot run on --accel {}",
            accel.as_str()
        ),
        BackendError::Kvm(HypervisorError::KvmMissing) => format!("{e} (--accel emu)"),
        other => other.to_string(),
    }
}

fn device_message(e: &DeviceError) -> String {
    match e {
        DeviceError::Console(e) => format!("--virtio-console: {e}"),
        DeviceError::Net { tap, source } => format!("--net tap={tap}: {source}"),
        DeviceError::HostNet(e) => format!("--jail: {e}"),
        DeviceError::Balloon(e) => format!("--balloon: {e}"),
        other => other.to_string(),
    }
}

/// How `--migrate-from` listens, by the flags that set it.
fn listen_message(e: &ListenError) -> String {
    match e {
        ListenError::Address(m) => format!("--migrate-from {m}"),
        ListenError::Unencrypted(addr) => format!(
            "--migrate-from {addr}: a TCP migration must be encrypted: give --migrate-tls-cert and --migrate-tls-key \
             (or use unix:PATH for a migration on this host)"
        ),
        ListenError::Unauthenticated(addr) => format!(
            "--migrate-from {addr}: the target must know its source: give --migrate-secret-file FILE \
             (the source sends the same file with `migrate-to ... --secret-file FILE`) \
             and/or --migrate-client-ca CA.pem (the source gives --cert and --key)"
        ),
        ListenError::TlsOnUnix(addr) => format!(
            "--migrate-from {addr}: a Unix socket needs no TLS; drop --migrate-tls-cert, --migrate-tls-key and --migrate-client-ca"
        ),
    }
}

/// An incoming migration's failure; a TLS file, or a device that differs
/// from the source's, by the flag that defines it.
fn migrate_in_message(e: &MigrateInError) -> String {
    match e {
        MigrateInError::Target(TargetError::Tls(tls)) => match tls.file() {
            Some(PemFile::ServerCert) => format!("--migrate-tls-cert: {tls}"),
            Some(PemFile::ServerKey) => format!("--migrate-tls-key: {tls}"),
            Some(PemFile::ClientCa) => format!("--migrate-client-ca: {tls}"),
            _ => tls.to_string(),
        },
        MigrateInError::Target(TargetError::Receive {
            peer,
            source: ReceiveError::Refused(refusal),
        }) => match refusal.downcast_ref::<PeerDevicesError>() {
            Some(PeerDevicesError::Differ(diffs)) => {
                format!("migration from {peer} failed: {}", differ_message(diffs))
            }
            _ => e.to_string(),
        },
        MigrateInError::Devices(PeerDevicesError::Differ(diffs)) => differ_message(diffs),
        other => other.to_string(),
    }
}

/// How this target's devices differ from the source's, each difference
/// with the flag (or the flag's option) that sets it.
fn differ_message(diffs: &[DeviceDiff]) -> String {
    let named: Vec<String> = diffs
        .iter()
        .map(|d| {
            let hint = match d {
                DeviceDiff::Presence { kind, .. } => match kind {
                    DeviceKind::Console => "(--virtio-console)",
                    DeviceKind::Rng => "(--rng)",
                    DeviceKind::Balloon => "(--balloon)",
                    DeviceKind::Vsock => "(--vsock)",
                    DeviceKind::Disk => "(--disk)",
                    DeviceKind::Net => "(--net)",
                },
                DeviceDiff::DiskCount { .. } => "(--disk)",
                DeviceDiff::NetCount { .. } => "(--net)",
                DeviceDiff::DiskFormat { .. } => "(format=)",
                DeviceDiff::DiskReadOnly { .. } => "(readonly=)",
                DeviceDiff::DiskSerial { .. } => "(serial=)",
                DeviceDiff::NetMtu { .. } => "(mtu=)",
                DeviceDiff::NetMac { .. } => "(drop mac= or give the source's)",
                DeviceDiff::VsockCid { .. }
                | DeviceDiff::DiskId { .. }
                | DeviceDiff::NetId { .. } => return d.to_string(),
            };
            format!("{d} {hint}")
        })
        .collect();
    format!(
        "the source's devices differ from this target's definition: {}",
        named.join("; ")
    )
}

/// A migration target's definition against the host or the source, by
/// the flag that sets it.
fn machine_message(m: &MachineMismatch) -> String {
    match m {
        MachineMismatch::Vcpus { .. } => format!("{m} (--cpus)"),
        MachineMismatch::Memory { .. } => format!("{m} (--memory)"),
        MachineMismatch::Limit(e) => crate::cli::limit_usage(e),
    }
}

/// The terminal side of a running VM: raw mode while it runs, stdin to
/// the guest console, SIGTERM/SIGINT/SIGHUP stop it.
#[derive(Default)]
struct Terminal {
    tty: bool,
    raw: Option<RawTerminal>,
}

impl Frontend for Terminal {
    fn notice(&mut self, message: &str) {
        eprintln!("vireo: {message}");
    }

    /// The daemon reads this line from the VM's stderr (the port of
    /// `tcp:HOST:0`).
    fn migration_listening(&mut self, addr: &str) {
        eprintln!("migration: listening on {addr}");
    }

    fn take_terminal(&mut self) {
        self.tty = console::stdin_is_tty();
        if self.tty {
            match RawTerminal::enable() {
                Ok(r) => self.raw = Some(r),
                Err(e) => tracing::warn!("console: cannot put the terminal in raw mode: {e}"),
            }
        }
    }

    fn stop_on_signals(&mut self, control: Arc<VmControl>) {
        if let Err(e) = signals::stop_vm_on_signals(control) {
            tracing::warn!("SIGTERM will not stop the VM cleanly: {e}");
        }
    }

    fn started(&mut self, console: GuestConsole, control: Arc<VmControl>) {
        console::spawn_stdin_pump(console, control, self.tty);
    }
}

/// Resolve kernel, initrd and command line from the flags and the kit.
fn boot_spec(args: &RunArgs) -> Result<BootSpec, Failure> {
    let (kernel, initrd, cmdline) = match (&args.image, &args.kernel) {
        (Some(dir), _) => {
            let kit = GuestKit::open(dir).map_err(|e| Failure::Usage(e.to_string()))?;
            (kit.kernel, args.initrd.clone().or(Some(kit.initrd)), kit.cmdline)
        }
        (None, Some(kernel)) => (kernel.clone(), args.initrd.clone(), DEFAULT_CMDLINE.to_string()),
        (None, None) => {
            return Err(Failure::Usage(
                "nothing to boot — pass --kernel PATH or --image DIR (make one with `vireo image build`)".into(),
            ))
        }
    };
    let mut cmdline = args.cmdline.clone().unwrap_or(cmdline);
    if let Some(extra) = &args.append {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    for (flag, path) in [("--kernel", Some(&kernel)), ("--initrd", initrd.as_ref())] {
        if let Some(p) = path {
            check_readable(flag, p)?;
        }
    }
    Ok(BootSpec {
        kernel,
        initrd,
        cmdline,
        vcpus: args.cpus(),
    })
}

fn check_readable(flag: &str, path: &PathBuf) -> Result<(), Failure> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Failure::Usage(format!(
            "{flag} {}: not a regular file",
            path.display()
        ))),
        Err(e) => Err(Failure::Usage(format!("{flag} {}: {e}", path.display()))),
    }
}

/// Parse the device flags (every one, so a typo fails before anything is
/// opened).
/// A device's options refused, named by its flag (`--disk: …`).
pub fn options_usage(e: OptionsError) -> Failure {
    Failure::Usage(format!("--{}: {}", e.device, e.message))
}

fn parse_devices(args: &RunArgs) -> Result<DeviceConfigs, Failure> {
    let usage = options_usage;
    let disks = args
        .disk
        .iter()
        .map(|s| BlockConfig::from_options(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    for d in &disks {
        check_format_given(d).map_err(|e| Failure::Usage(e.to_string()))?;
    }
    let nets = args
        .net
        .iter()
        .map(|s| NetConfig::from_options(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    let vsock = args
        .vsock
        .as_deref()
        .map(VsockConfig::from_options)
        .transpose()
        .map_err(usage)?;
    let rng = args
        .rng
        .as_deref()
        .map(RngConfig::from_options)
        .transpose()
        .map_err(usage)?;
    let balloon = args
        .balloon
        .as_deref()
        .map(BalloonConfig::from_options)
        .transpose()
        .map_err(usage)?;
    if let Some(b) = &balloon {
        vireo_api::vm::check_balloon(b.target_mib, args.memory())
            .map_err(|e| Failure::Usage(crate::cli::limit_usage(&e)))?;
    }
    let console = args
        .virtio_console
        .as_deref()
        .map(ConsoleConfig::from_options)
        .transpose()
        .map_err(usage)?;
    Ok(DeviceConfigs {
        console,
        disks,
        nets,
        rng,
        vsock,
        balloon,
        backing_dirs: args.backing_dir.clone(),
    })
}

/// The device flags `--restore` accepts (as overrides); any other device
/// or boot flag is refused.
fn check_restore_flags(args: &RunArgs, why: &str) -> Result<(), Failure> {
    let refused = args.rng.is_some()
        || args.balloon.is_some()
        || args.virtio_console.is_some()
        || args.initrd.is_some()
        || args.cmdline.is_some()
        || args.append.is_some();
    if refused {
        return Err(Failure::Usage(format!(
            "{why}: drop --rng, --balloon, --virtio-console, --initrd, --cmdline and --append \
             (--disk id=ID,path=P, --net id=ID,tap=NAME and --vsock cid=N,socket=PATH may replace a saved disk, TAP or socket)"
        )));
    }
    Ok(())
}

/// `--disk`, `--net` and `--vsock` given with `--restore`: what replaces
/// a saved disk, TAP or socket.
fn restore_overrides(args: &RunArgs) -> Result<RestoreOverrides, Failure> {
    let usage = |flag: &str, s: &str, e: OptionsError| Failure::Usage(format!("{flag} {s}: {e}"));
    let disks = args
        .disk
        .iter()
        .map(|s| BlockConfig::from_options(s).map_err(|e| usage("--disk", s, e)))
        .collect::<Result<_, _>>()?;
    let nets = args
        .net
        .iter()
        .map(|s| {
            NetConfig::from_options(s)
                .map(|n| (n, s.contains("mac=")))
                .map_err(|e| usage("--net", s, e))
        })
        .collect::<Result<_, _>>()?;
    let vsock = args
        .vsock
        .as_deref()
        .map(|s| VsockConfig::from_options(s).map_err(|e| usage("--vsock", s, e)))
        .transpose()?;
    Ok(RestoreOverrides {
        disks,
        nets,
        vsock,
        backing_dirs: args.backing_dir.clone(),
    })
}

/// The flags `--migrate-from` needs and refuses: the target's own
/// machine (`--cpus`, `--memory`, the device flags) is required, the boot
/// flags are refused (the kernel is in the source's memory).
fn check_migrate_flags(args: &RunArgs) -> Result<(), Failure> {
    if args.initrd.is_some() || args.cmdline.is_some() || args.append.is_some() {
        return Err(Failure::Usage(
            "--migrate-from takes the running kernel from the source: drop --initrd, --cmdline and --append"
                .into(),
        ));
    }
    if args.cpus.is_none() || args.memory.is_none() {
        return Err(Failure::Usage(
            "--migrate-from: the target needs its own definition of the machine: give --cpus and --memory \
             and the device flags (--disk, --net, --vsock, --rng, --balloon, --virtio-console) the source \
             was started with; the source's machine is checked against them, never taken from it"
                .into(),
        ));
    }
    Ok(())
}

/// Which `--net` flags name their MAC.
fn macs_given(args: &RunArgs) -> Vec<bool> {
    args.net
        .iter()
        .map(|n| n.split(',').any(|kv| kv.trim_start().starts_with("mac=")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(argv: &[&str]) -> RunArgs {
        match crate::cli::Cli::try_parse_from(std::iter::once("vireo").chain(argv.iter().copied()))
        {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Run(a),
                ..
            }) => a,
            other => panic!("{:?}", other.err()),
        }
    }

    /// The library names the device; the front end adds the flag.
    #[test]
    fn device_differences_name_their_flags() {
        let m = differ_message(&[
            DeviceDiff::DiskCount {
                source: vec!["data".into()],
                own: vec![],
            },
            DeviceDiff::Presence {
                kind: DeviceKind::Rng,
                at_source: false,
            },
        ]);
        assert_eq!(
            m,
            "the source's devices differ from this target's definition: \
             the source has 1 disk(s) (data), this target 0 (none) (--disk); \
             the source has no rng, this target has one (--rng)"
        );
    }

    #[test]
    fn restore_takes_only_the_override_flags() {
        let restore = |extra: &[&str]| {
            let mut v = vec!["run", "--restore", "/x"];
            v.extend_from_slice(extra);
            run_args(&v)
        };
        assert!(check_restore_flags(&restore(&["--rng"]), "--restore").is_err());
        assert!(check_restore_flags(&restore(&["--disk", "id=a,path=b"]), "--restore").is_ok());
        let o = restore_overrides(&restore(&[
            "--net",
            "tap=c0,mac=52:54:00:00:00:01",
            "--net",
            "id=lan,tap=c1",
        ]))
        .unwrap();
        assert_eq!(
            o.nets.iter().map(|(_, mac)| *mac).collect::<Vec<_>>(),
            [true, false]
        );
        assert!(restore_overrides(&restore(&["--disk", "path=/a,bogus=1"])).is_err());
    }

    #[test]
    fn migrate_from_needs_the_targets_own_definition() {
        let e = check_migrate_flags(&run_args(&["run", "--migrate-from", "unix:/x"]))
            .err()
            .unwrap();
        assert!(
            matches!(&e, Failure::Usage(m) if m.contains("needs its own definition")),
            "{e:?}"
        );
        let own = |extra: &[&str]| {
            let mut v = vec![
                "run",
                "--migrate-from",
                "unix:/x",
                "--cpus",
                "1",
                "--memory",
                "64",
            ];
            v.extend_from_slice(extra);
            run_args(&v)
        };
        assert!(check_migrate_flags(&own(&["--disk", "path=/r,id=root,format=raw"])).is_ok());
        assert!(check_migrate_flags(&own(&["--append", "x"])).is_err());
        assert_eq!(
            macs_given(&own(&[
                "--net",
                "tap=a",
                "--net",
                "tap=b,mac=52:54:00:00:00:02"
            ])),
            [false, true]
        );
    }

    #[test]
    fn library_errors_are_told_by_their_flag() {
        let m = failure(Error::Machine(MachineMismatch::Limit(
            vireo_api::vm::LimitError::MemoryTooSmall {
                requested: vireo_api::units::MemorySize::from_mib(8).unwrap(),
            },
        )));
        assert!(
            matches!(&m, Failure::Usage(m) if m == "--memory 8: at least 16 MiB"),
            "{m:?}"
        );
        let m = failure(Error::ControlSocket {
            path: PathBuf::from("/s"),
            source: std::io::Error::other("busy"),
        });
        assert!(
            matches!(&m, Failure::Usage(m) if m == "--control-socket /s: busy"),
            "{m:?}"
        );
    }
}
