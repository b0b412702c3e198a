//! Virtio devices in snapshots: what a machine records of its devices in
//! a snapshot (so a restore rebuilds them with no device configuration),
//! the copies of its disks a snapshot holds (`DIR/disks/<id>.<format>`),
//! and how a restore puts the disks back (rolls each one back to the copy)
//! or takes the caller's own disk, TAP or vsock socket instead
//! ([`RestoreOverrides`]); and a migration target's devices against the
//! source's record.

mod disk_copy;
mod peer;
mod record;
mod restore;

pub use disk_copy::{copy_disks, CopyDisksError, DiskCopy, DiskFile, DISKS_DIR};
pub use peer::{
    check_peer_devices, check_peer_record, migrated_configs, DeviceDiff, DeviceKind,
    PeerDevicesError,
};
pub use record::{DeviceSet, DiskRecord, FrontendRecord, NetRecord, RecordError, RngRecord};
pub use restore::{restore_configs, RestoreDevicesError, RestoreOverrides};

/// What the tests of these modules share.
#[cfg(test)]
mod test_util {
    use std::path::{Path, PathBuf};

    use vireo_api::devices::balloon::BalloonConfig;
    use vireo_api::devices::block::BlockConfig;
    use vireo_api::devices::console::ConsoleConfig;
    use vireo_api::devices::net::NetConfig;
    use vireo_api::devices::rng::RngConfig;
    use vireo_api::devices::vsock::VsockConfig;

    use crate::devices::DeviceConfigs;

    /// `vireo run`-style device flags as (flag, options) pairs; a flag
    /// without options (`--rng`) has empty ones.
    pub(super) fn pairs<'a>(flags: &[&'a str]) -> Vec<(&'a str, &'a str)> {
        let mut out = Vec::new();
        let mut it = flags.iter().peekable();
        while let Some(flag) = it.next() {
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().copied().unwrap_or(""),
                _ => "",
            };
            out.push((*flag, value));
        }
        out
    }

    /// A scratch directory removed when dropped.
    pub(super) struct TempDir(PathBuf);
    impl TempDir {
        pub(super) fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    pub(super) fn tempdir() -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vireo-vsnap-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub(super) fn saved() -> DeviceConfigs {
        DeviceConfigs {
            disks: vec![
                BlockConfig::from_options("path=/d/root.raw,id=root").unwrap(),
                BlockConfig::from_options("path=/d/data.qcow2,id=data").unwrap(),
            ],
            nets: vec![
                NetConfig::from_options("tap=t0").unwrap(),
                NetConfig::from_options("tap=t1,id=lan").unwrap(),
            ],
            vsock: Some(VsockConfig::from_options("cid=5,socket=/run/a.sock").unwrap()),
            rng: Some(RngConfig::default()),
            console: Some(ConsoleConfig::default()),
            balloon: Some(BalloonConfig::default()),
            backing_dirs: Vec::new(),
        }
    }
}
