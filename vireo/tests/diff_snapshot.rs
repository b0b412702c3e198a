//! Diff snapshots: `snapshot --diff DIR` over the control socket writes
//! only the pages written since the process's previous snapshot and
//! records that one as its parent; `vireo run --restore` follows the chain
//! (full, then each diff). The guest keeps a checksum over 64 pages it
//! writes, so a page missing from a diff shows up as a wrong sum after the
//! restore. A missing or changed parent is refused before anything runs.
//!
//! Like the other guest tests they run on KVM, or on the emulator with
//! `VIREO_TEST_ACCEL=emu`.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::checksum::*;
use support::{run_vireo_args, LiveVm, TempDir, RUN_TIMEOUT};

/// Take `snapshot ARGS`: the reply, and bounds of the count saved: the
/// last count read before the command (the saved one is later) and the
/// last one printed shortly after the reply (the saved one is not later).
fn snapshot(vm: &mut LiveVm, socket: &Path, args: &str) -> (serde_json::Value, u64, u64) {
    let before = lines(&vm.output()).last().map(|l| l.0).unwrap_or(0);
    let reply = control(socket, &format!("snapshot {args}"));
    // What the guest printed before the reply is in the pipe by now, but
    // the test's reader thread may be slow to pass it on when the host is
    // busy: read until the output has been quiet for 200 ms (a paused
    // guest) or for one second at most (a running one; a later upper
    // bound only widens the window the restored guest must start in).
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if vm.read_chunk(left.min(Duration::from_millis(200))) != Some(true) {
            break;
        }
    }
    let output = vm.output();
    let mut after = lines(&output).last().map(|l| l.0).unwrap_or(0);
    // A guest paused in the middle of a line has printed part of the next
    // one: the restored guest finishes that line and its first whole line
    // is the one after it.
    if output
        .rsplit('\n')
        .next()
        .is_some_and(|tail| !tail.is_empty())
    {
        after += 1;
    }
    (reply, before, after)
}

/// Let the guest print `n` more lines.
fn more(vm: &mut LiveVm, n: usize) {
    let want = lines(&vm.output()).len() + n;
    let deadline = Instant::now() + RUN_TIMEOUT;
    while lines(&vm.output()).len() < want {
        assert!(
            Instant::now() < deadline,
            "the guest stopped: {}",
            vm.output()
        );
        if vm.read_chunk(Duration::from_secs(1)).is_none() {
            panic!("the VM exited: {}", vm.output());
        }
    }
}

fn restored_lines(dir: &Path, extra: &[&str]) -> Vec<(u64, u64)> {
    let mut args = vec![
        "run".to_string(),
        "--restore".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut vm = LiveVm::start(&[], &args, RUN_TIMEOUT);
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let l = lines(&vm.output());
        if l.len() >= 4 || Instant::now() > deadline {
            assert!(
                l.len() >= 4,
                "restore of {} printed {l:?}:\n{}",
                dir.display(),
                vm.output()
            );
            return l;
        }
        if vm.read_chunk(Duration::from_secs(1)).is_none() {
            return lines(&vm.output());
        }
    }
}

fn refused(dir: &Path, want: &str) {
    let args = vec![
        "run".to_string(),
        "--restore".into(),
        dir.display().to_string(),
    ];
    let out = run_vireo_args(&args, RUN_TIMEOUT);
    out.assert_status(2);
    assert!(
        out.stderr.contains(want),
        "expected {want:?} in the error\n{out}"
    );
    assert!(!out.stdout.contains("count="), "the guest ran:\n{out}");
}

#[test]
fn a_chain_of_diff_snapshots_restores_and_a_broken_chain_is_refused() {
    require_kvm!();
    let dir = TempDir::new("diffsnap");
    let kernel = kernel(&dir);
    let socket = dir.path().join("ctl.sock");
    let mut vm = LiveVm::start_kernel(
        &kernel,
        &["--control-socket", socket.to_str().expect("utf-8 path")],
    );
    assert!(vm.read_until("count=00000003 "), "{}", vm.output());
    wait_for_socket(&socket);
    let full = dir.path().join("full");
    let d1 = dir.path().join("d1");
    let d2 = dir.path().join("d2");

    // No parent yet.
    let (reply, _, _) = snapshot(&mut vm, &socket, &format!("--diff {}", d1.display()));
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("full snapshot first"),
        "{reply}"
    );

    let (reply, _, _) = snapshot(&mut vm, &socket, &full.display().to_string());
    assert_eq!(reply["ok"], true, "{reply}");
    more(&mut vm, 15);
    let (reply, d1_lo, d1_hi) = snapshot(&mut vm, &socket, &format!("--diff {}", d1.display()));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "running", "{reply}");
    let s = &reply["snapshot"];
    assert_eq!(s["diff"], true, "{reply}");
    assert_eq!(s["parent"], full.display().to_string(), "{reply}");
    let pages = s["pages"].as_u64().expect("pages");
    // The guest wrote a few of its 64 pages, its counter and stack: a
    // handful of pages out of 8192, never all of them.
    assert!(
        (1..200).contains(&pages),
        "{pages} pages in the diff: {reply}"
    );
    more(&mut vm, 15);
    let (reply, d2_lo, d2_hi) = snapshot(
        &mut vm,
        &socket,
        &format!("--diff --paused {}", d2.display()),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "paused", "{reply}");
    assert_eq!(
        reply["snapshot"]["parent"],
        d1.display().to_string(),
        "{reply}"
    );
    check_sums("original", &lines(&vm.output()));
    drop(vm);

    // The diff's memory file is sparse: far less on disk than the guest's memory.
    let meta = std::fs::metadata(d1.join("memory.raw")).expect("diff memory");
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 4 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );

    for (snap, lo, hi) in [(&d1, d1_lo, d1_hi), (&d2, d2_lo, d2_hi)] {
        for extra in [&[][..], &["--restore-lazy"][..]] {
            let l = restored_lines(snap, extra);
            check_sums(&format!("restored {}", snap.display()), &l);
            assert!(
                l[0].0 > lo && l[0].0 <= hi + 1,
                "{} {extra:?}: the restored guest went on from {}, the snapshot was taken between {lo} and {hi}",
                snap.display(),
                l[0].0
            );
        }
    }

    // The parent changed since the diff was taken.
    let state = d1.join("state.vsnap");
    let good = std::fs::read(&state).expect("state");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&state, &bad).expect("write");
    refused(&d2, "changed since");
    std::fs::write(&state, &good).expect("write");

    // The parent is gone.
    let moved = dir.path().join("moved");
    std::fs::rename(&full, &moved).expect("rename");
    refused(&d2, "holds no snapshot any more");
    refused(&d1, "holds no snapshot any more");
    std::fs::rename(&moved, &full).expect("rename");
    assert!(!restored_lines(&d2, &[]).is_empty());
}
