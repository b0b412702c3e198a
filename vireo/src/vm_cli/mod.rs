//! `vireo serve` (runs the daemon) and `vireo vm ...`, the daemon's command
//! line client. The client talks to the daemon only through its public REST
//! API, over the Unix socket, with a small blocking HTTP/1.1 client.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use vireo_api::model::{
    BalloonStatus, CloneVm, CreateSnapshot, CreateVm, SetBalloon, Snapshot, SnapshotList, StopVm,
    Vm, VmList,
};
use vireo_daemon::paths;

use crate::api_client;
use crate::Failure;
use crate::{console_client, vm_edit};
use vireo_api::client::{decode, Client, DEFAULT_TIMEOUT};

pub mod args;

use args::{
    absolute, BalloonArgs, ConsoleArgs, CreateArgs, ListArgs, MigrateArgs, NameArgs, ServeArgs,
    ShowArgs, SnapshotArgs, SnapshotsArgs, UpdateArgs, VmArgs, VmCommand,
};

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
    let body = serde_json::to_vec(&vireo_api::model::Migrate {
        to: a.to.clone(),
        token,
        ca_cert,
        postcopy: a.postcopy,
    })
    .expect("serialisable");
    let done: vireo_api::model::Migrated = client.call_with_timeout(
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
