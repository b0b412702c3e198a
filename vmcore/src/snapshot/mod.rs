//! Snapshots: the state of a paused VM — every vCPU, the platform
//! (interrupt controllers, timer, clock), every device and guest memory —
//! written to a directory, and read back into a new VM.
//!
//! Devices take part through [`device::Pausable`] and
//! [`device::Snapshottable`] (see [`device`]): a snapshot is a walk over
//! the machine's one [`device::DeviceList`], each device giving its typed,
//! versioned state under a stable id, and a restore hands each id's state
//! back to the device of the same id in the new machine.
//!
//! Everything is verified (format version, checksums, sizes, that the
//! saved configuration fits this vireo) before the new VM is created, so
//! a bad snapshot is refused before any guest state is touched. See
//! [`format`] for the files.

pub mod device;
pub mod format;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vireo_api::units::MemorySize;
use vireo_hypervisor::{BackendKind, CpuidEntry, PlatformState, VcpuState};
use vm_memory::{GuestAddress, GuestMemoryRegion};

use crate::memory::{self, GuestMemory, GuestMemoryBackend, RamLayout};
use device::{DeviceListError, SavedState};
use format::{FormatError, MemoryRegionRecord, StateFile, FLAG_DIFF, MEMORY_FILE, STATE_FILE};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Devices(#[from] DeviceListError),
    #[error("{} already holds a snapshot; pick a new directory or delete it first", .0.display())]
    AlreadyHolds(PathBuf),
    #[error("a diff snapshot cannot go into its parent's directory")]
    DiffIntoParent,
    #[error("{} holds no snapshot ({STATE_FILE} is missing)", .0.display())]
    NoSnapshot(PathBuf),
    #[error("{}: the chain of diff snapshots is longer than {MAX_CHAIN} (or loops); take a full snapshot", .0.display())]
    ChainTooLong(PathBuf),
    #[error("{} is a diff snapshot of {parent}, which holds no snapshot any more; restore needs its parent (restore the parent, or take a full snapshot)", .dir.display())]
    ParentGone { dir: PathBuf, parent: String },
    #[error("{} is a diff snapshot of {parent}, but that snapshot changed since (its state checksum is {found:#010x}, the diff expects {expected:#010x})", .dir.display())]
    ParentChanged {
        dir: PathBuf,
        parent: String,
        found: u32,
        expected: u32,
    },
    #[error("{} is a diff of {parent}, which describes another machine", .dir.display())]
    ParentMachine { dir: PathBuf, parent: String },
    /// Guest memory for the saved machine could not be made.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("cannot map {} at offset {offset}: {source}", .path.display())]
    MapMemory {
        path: PathBuf,
        offset: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("memory region at {0:#x} wraps")]
    RegionWraps(u64),
    #[error("guest memory layout: {0}")]
    MemoryLayout(#[source] vm_memory::GuestRegionCollectionError),
    /// The saved machine ran on another backend.
    #[error("the snapshot was taken on the {saved} backend and cannot be restored on {running}")]
    Backend {
        saved: vireo_hypervisor::BackendKind,
        running: vireo_hypervisor::BackendKind,
    },
    #[error("the VM must be paused to capture its state (it is {0:?})")]
    NotPaused(crate::RunState),
    #[error(transparent)]
    Hypervisor(#[from] vireo_hypervisor::HypervisorError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the machine was: enough to build it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The hypervisor backend (recorded as "kvm" or "emu"): state of one
    /// cannot be loaded into the other.
    pub backend: BackendKind,
    pub vcpus: u32,
    /// On the wire as `memory_mib`, a number of MiB (the format's field
    /// name since version 1).
    #[serde(rename = "memory_mib")]
    pub memory: MemorySize,
    /// The front end's own description of the machine (its devices).
    #[serde(default)]
    pub frontend: serde_json::Value,
}

impl MachineConfig {
    /// Where the machine's RAM is.
    pub fn ram_layout(&self) -> RamLayout {
        RamLayout::new(self.memory)
    }
}

/// A VM's whole state but its memory.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub config: MachineConfig,
    /// The CPUID each vCPU was given.
    pub cpuid: Vec<Vec<CpuidEntry>>,
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    /// (device id, state) in machine order.
    pub devices: Vec<(String, SavedState)>,
}

const CONFIG: &str = "config";
const MEMORY: &str = "memory";
const CPUID: &str = "cpuid";
const PLATFORM: &str = "platform";
const VCPU_PREFIX: &str = "vcpu/";
const DEVICE_PREFIX: &str = "device/";
const PARENT: &str = "parent";
const MEMORY_PAGES: &str = "memory_pages";
/// Longest chain of diff snapshots a restore follows.
pub const MAX_CHAIN: usize = 64;

/// A diff snapshot's parent: where it was and what its state file's
/// CRC-32 was when the diff was taken (a parent written over since is
/// refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub dir: String,
    pub state_crc32: u32,
}

/// CRC-32 of `dir`'s whole state file: how a diff names its parent's
/// exact contents.
pub fn state_checksum(dir: &Path) -> Result<u32, SnapshotError> {
    let path = state_path(dir);
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(crc32fast::hash(&bytes))
}

/// Write a diff snapshot of `snap` to `dir`: only the pages set in
/// `dirty` (per region, from [`crate::RunningVm::take_snapshot_dirty`]),
/// with `parent` (a snapshot directory) recorded by path and checksum.
pub fn write_diff(
    dir: &Path,
    snap: &VmSnapshot,
    mem: &GuestMemory,
    dirty: &[Vec<u64>],
    parent: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, SnapshotError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SnapshotError::Io {
            path: path.clone(),
            source,
        }
    };
    let parent_dir = std::fs::canonicalize(parent).map_err(io(parent))?;
    let parent_ref = ParentRef {
        dir: parent_dir.display().to_string(),
        state_crc32: state_checksum(&parent_dir)?,
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let state = state_path(dir);
    if state.exists() {
        return Err(SnapshotError::AlreadyHolds(dir.to_path_buf()));
    }
    if std::fs::canonicalize(dir).map_err(io(dir))? == parent_dir {
        return Err(SnapshotError::DiffIntoParent);
    }
    let regions: Vec<(u64, &[u8])> = mem
        .iter()
        .map(|r| {
            // SAFETY: as in `write`: a live mapping owned by `mem`, read
            // while the VM is paused.
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, bytes)
        })
        .collect();
    let runs: Vec<Vec<(u64, u64)>> = regions
        .iter()
        .zip(dirty)
        .map(|((_, b), bits)| format::bitmap_runs(bits, b.len() as u64 / format::PAGE_SIZE))
        .collect();
    let pages: u64 = runs.iter().flatten().map(|(_, n)| n).sum();
    let records = format::write_memory_pages(&memory_path(dir), &regions, &runs, progress)?;
    let mut file = state_sections(snap)?;
    file.flags = FLAG_DIFF;
    file.add_json(MEMORY, &records)?;
    file.add_json(MEMORY_PAGES, &runs)?;
    file.add_json(PARENT, &parent_ref)?;
    file.write(&state)?;
    Ok(pages)
}

/// One diff of a chain: its memory file, records and the pages it holds.
#[derive(Debug, Clone)]
pub struct DiffLayer {
    pub dir: std::path::PathBuf,
    memory_path: std::path::PathBuf,
    records: Vec<MemoryRegionRecord>,
    runs: Vec<Vec<(u64, u64)>>,
}

/// Paths of a snapshot directory's files.
pub fn state_path(dir: &Path) -> std::path::PathBuf {
    dir.join(STATE_FILE)
}

pub fn memory_path(dir: &Path) -> std::path::PathBuf {
    dir.join(MEMORY_FILE)
}

/// Write `snap` and the guest memory to `dir` (created if missing; it must
/// not hold a snapshot already). Memory goes first and the state file last
/// (written under a temporary name and renamed), so a directory with a
/// state file always holds a complete snapshot.
pub fn write(
    dir: &Path,
    snap: &VmSnapshot,
    mem: &GuestMemory,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), SnapshotError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SnapshotError::Io {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let state = state_path(dir);
    if state.exists() {
        return Err(SnapshotError::AlreadyHolds(dir.to_path_buf()));
    }
    let regions: Vec<(u64, &[u8])> = mem
        .iter()
        .map(|r| {
            // SAFETY: the region is a live mapping of `r.len()` bytes owned
            // by `mem`; the VM is paused (no vCPU runs) and the front end
            // quiesces device threads around a snapshot, so nothing writes
            // it while we read.
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, bytes)
        })
        .collect();
    let records = format::write_memory(&memory_path(dir), &regions, progress)?;
    let mut file = state_sections(snap)?;
    file.add_json(MEMORY, &records)?;
    file.write(&state)?;
    Ok(())
}

/// The state file of `snap` without its memory records.
fn state_sections(snap: &VmSnapshot) -> Result<StateFile, SnapshotError> {
    let mut file = StateFile::new();
    file.add_json(CONFIG, &snap.config)?;
    file.add_json(CPUID, &snap.cpuid)?;
    file.add_json(PLATFORM, &snap.platform)?;
    for v in &snap.vcpus {
        file.add_json(&format!("{VCPU_PREFIX}{}", v.id), v)?;
    }
    for (id, state) in &snap.devices {
        file.add_json(&format!("{DEVICE_PREFIX}{id}"), state)?;
    }
    Ok(file)
}

/// `snap` in the state file encoding (version, checksums), without
/// memory: what live migration sends as the final state.
pub fn encode_state(snap: &VmSnapshot) -> Result<Vec<u8>, SnapshotError> {
    Ok(state_sections(snap)?.encode())
}

/// Decode and check what [`encode_state`] made (every section, vCPU
/// count); the memory is the caller's.
pub fn decode_state(bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    snapshot_of(&StateFile::decode(bytes)?)
}

/// The VM state in a decoded state file, checked for consistency.
fn snapshot_of(file: &StateFile) -> Result<VmSnapshot, SnapshotError> {
    let config: MachineConfig = file.json(CONFIG)?;
    let cpuid: Vec<Vec<CpuidEntry>> = file.json(CPUID)?;
    let platform: PlatformState = file.json(PLATFORM)?;
    let mut vcpus = Vec::new();
    let mut devices = Vec::new();
    for name in file.names() {
        if name.starts_with(VCPU_PREFIX) {
            vcpus.push(file.json::<VcpuState>(name)?);
        } else if let Some(id) = name.strip_prefix(DEVICE_PREFIX) {
            devices.push((id.to_string(), file.json(name)?));
        }
    }
    vcpus.sort_by_key(|v| v.id);
    let ids_ok = vcpus.iter().enumerate().all(|(i, v)| v.id as usize == i);
    if vcpus.len() != config.vcpus as usize || !ids_ok || cpuid.len() != vcpus.len() {
        return Err(FormatError::Corrupt(format!(
            "{} vCPUs configured, {} vCPU states and {} CPUID tables saved",
            config.vcpus,
            vcpus.len(),
            cpuid.len()
        ))
        .into());
    }
    Ok(VmSnapshot {
        config,
        cpuid,
        vcpus,
        platform,
        devices,
    })
}

/// A snapshot read and checked, its memory not loaded yet.
pub struct LoadedSnapshot {
    pub snapshot: VmSnapshot,
    /// The memory records of the chain's full snapshot.
    pub memory: Vec<MemoryRegionRecord>,
    memory_path: std::path::PathBuf,
    /// Diff snapshots to apply over it, oldest first (empty for a full
    /// snapshot).
    pub diffs: Vec<DiffLayer>,
}

/// Read `dir`'s state file and check it whole (version, checksums, every
/// section decodes, one state per vCPU, memory regions that match the
/// configured size and a memory file long enough).
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    load_chain(dir, 0)
}

fn load_chain(dir: &Path, depth: usize) -> Result<LoadedSnapshot, SnapshotError> {
    let state = state_path(dir);
    if !state.exists() {
        return Err(SnapshotError::NoSnapshot(dir.to_path_buf()));
    }
    let file = StateFile::read(&state)?;
    let snapshot = snapshot_of(&file)?;
    let config = &snapshot.config;
    let records: Vec<MemoryRegionRecord> = file.json(MEMORY)?;
    let expected = config.ram_layout().ranges();
    let layout_ok = expected.len() == records.len()
        && expected
            .iter()
            .zip(&records)
            .all(|((addr, size), r)| addr.0 == r.guest_addr && *size == r.size);
    if !layout_ok {
        return Err(FormatError::Corrupt(format!(
            "the memory regions saved do not match {} of RAM",
            config.memory
        ))
        .into());
    }
    let memory_path = memory_path(dir);
    format::check_memory_layout(&memory_path, &records)?;
    if file.flags & FLAG_DIFF == 0 {
        return Ok(LoadedSnapshot {
            snapshot,
            memory: records,
            memory_path,
            diffs: Vec::new(),
        });
    }
    // A diff: check its parent is there and unchanged, load the chain
    // below it, and put this diff on top.
    let parent: ParentRef = file.json(PARENT)?;
    let runs: Vec<Vec<(u64, u64)>> = file.json(MEMORY_PAGES)?;
    if depth >= MAX_CHAIN {
        return Err(SnapshotError::ChainTooLong(dir.to_path_buf()));
    }
    let parent_dir = Path::new(&parent.dir);
    if !state_path(parent_dir).exists() {
        return Err(SnapshotError::ParentGone {
            dir: dir.to_path_buf(),
            parent: parent.dir,
        });
    }
    let crc = state_checksum(parent_dir)?;
    if crc != parent.state_crc32 {
        return Err(SnapshotError::ParentChanged {
            dir: dir.to_path_buf(),
            parent: parent.dir,
            found: crc,
            expected: parent.state_crc32,
        });
    }
    let mut base = load_chain(parent_dir, depth + 1)?;
    let pc = &base.snapshot.config;
    if pc.backend != config.backend || pc.vcpus != config.vcpus || pc.memory != config.memory {
        return Err(SnapshotError::ParentMachine {
            dir: dir.to_path_buf(),
            parent: parent.dir,
        });
    }
    base.diffs.push(DiffLayer {
        dir: dir.to_path_buf(),
        memory_path,
        records,
        runs,
    });
    base.snapshot = snapshot;
    Ok(base)
}

impl LoadedSnapshot {
    /// A snapshot whose memory arrives some other way (live migration):
    /// [`LoadedSnapshot::memory`] must not be called on it.
    pub fn without_memory(snapshot: VmSnapshot) -> LoadedSnapshot {
        LoadedSnapshot {
            snapshot,
            memory: Vec::new(),
            memory_path: std::path::PathBuf::new(),
            diffs: Vec::new(),
        }
    }

    /// Guest memory with the snapshot's contents.
    ///
    /// Full (`lazy` false): anonymous memory filled from the file, each
    /// region's checksum verified before this returns.
    ///
    /// Lazy: each region maps the memory file MAP_PRIVATE, so pages are read
    /// from the file when the guest first touches them and copied when it
    /// first writes them; restore takes milliseconds whatever the size, the
    /// snapshot stays unchanged, and clones share the file's page cache.
    /// The state file is verified as always and the memory file's size and
    /// layout are checked, but its contents are NOT checksummed (that would
    /// read it all). The memory file must not be changed while a VM mapped
    /// from it runs.
    pub fn memory(
        &self,
        lazy: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<GuestMemory, SnapshotError> {
        let mem = self.base_memory(lazy, progress)?;
        // Diffs over the base, oldest first (over a lazy mapping their
        // pages are copied into private memory).
        for d in &self.diffs {
            let mut slices: Vec<&mut [u8]> = mem
                .iter()
                .map(|r| {
                    // SAFETY: as in `base_memory`: a mapping owned by
                    // `mem`, not shared with any VM yet; no overlap.
                    unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }
                })
                .collect();
            format::read_memory_pages(&d.memory_path, &d.records, &d.runs, &mut slices)?;
        }
        Ok(mem)
    }

    fn base_memory(
        &self,
        lazy: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<GuestMemory, SnapshotError> {
        if lazy {
            return self.map_memory();
        }
        let mem = memory::create_guest_memory(&self.snapshot.config.ram_layout())?;
        let mut slices: Vec<&mut [u8]> = mem
            .iter()
            .map(|r| {
                // SAFETY: each region is a fresh anonymous mapping of
                // `r.len()` bytes owned by `mem`, not shared with any VM
                // yet; the slices do not overlap.
                unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }
            })
            .collect();
        format::read_memory(&self.memory_path, &self.memory, &mut slices, progress)?;
        Ok(mem)
    }

    fn map_memory(&self) -> Result<GuestMemory, SnapshotError> {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion};
        let io = |source| SnapshotError::Io {
            path: self.memory_path.display().to_string(),
            source,
        };
        let file = Arc::new(std::fs::File::open(&self.memory_path).map_err(io)?);
        let mut regions = Vec::with_capacity(self.memory.len());
        for r in &self.memory {
            let region: MmapRegion<memory::AtomicBitmap> = MmapRegionBuilder::new_with_bitmap(
                r.size as usize,
                vm_memory::bitmap::NewBitmap::with_len(r.size as usize),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .build()
            .map_err(|e| SnapshotError::MapMemory {
                path: self.memory_path.clone(),
                offset: r.file_offset,
                source: e,
            })?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| SnapshotError::RegionWraps(r.guest_addr))?;
            regions.push(region);
        }
        GuestMemory::from_regions(regions).map_err(SnapshotError::MemoryLayout)
    }
}
