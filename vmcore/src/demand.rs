//! Guest memory filled on demand through userfaultfd(2): the VM runs
//! before its memory is all there, and the first touch of a missing page —
//! by a vCPU, by the emulator, by a device thread or by the kernel on the
//! VMM's behalf (a `pwrite` from a guest buffer) — stops the toucher until
//! someone installs the page. Post-copy migration uses it: the target runs
//! the guest at once and asks the source for each page the guest touches,
//! while the rest streams in behind.
//!
//! [`DemandMemory::register`] arms every RAM region; a handler thread
//! takes faults with [`DemandMemory::next_fault`] and answers them, and
//! any thread may install pages ahead of time ([`DemandMemory::install`]).
//! Installing a page that is already there is harmless (the kernel says so
//! and nothing is overwritten), so a fault answer and a background push of
//! the same page may race. When every page is in, [`DemandMemory::finish`]
//! disarms the regions and memory is ordinary anonymous memory again.
//!
//! Needs userfaultfd for kernel-mode faults too (KVM and syscalls touch
//! guest memory from the kernel): root, CAP_SYS_PTRACE, read-write access
//! to /dev/userfaultfd or `vm.unprivileged_userfaultfd=1`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::uffd::{self, Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

pub const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error(
        "userfaultfd is not available to vireo ({0}); it is needed to fill guest memory on demand: \
         run as root, give the user read-write access to /dev/userfaultfd, or set \
         `sysctl vm.unprivileged_userfaultfd=1`"
    )]
    Unavailable(String),
    #[error("userfaultfd {op}: {reason}")]
    Uffd { op: &'static str, reason: String },
    #[error(
        "guest address {0:#x} (+{1} bytes) is not a whole number of pages inside one RAM region"
    )]
    BadRange(u64, usize),
}

fn uffd_err(op: &'static str) -> impl Fn(uffd::Error) -> DemandError {
    move |e| DemandError::Uffd {
        op,
        reason: e.to_string(),
    }
}

struct Region {
    gpa: u64,
    host: u64,
    len: u64,
    /// One bit per page: installed.
    present: Vec<AtomicU64>,
}

/// Guest RAM armed with userfaultfd.
pub struct DemandMemory {
    uffd: Uffd,
    regions: Vec<Region>,
    missing: AtomicUsize,
}

impl DemandMemory {
    /// Arm every region of `mem` (anonymous memory no page of which has
    /// been touched yet; pages already there are reported present when
    /// installed over). From now on a touch of a missing page waits for
    /// [`DemandMemory::install`].
    pub fn register(mem: &GuestMemory) -> Result<DemandMemory, DemandError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Faults from the kernel (KVM, syscalls on guest buffers) too.
            .user_mode_only(false)
            .create()
            .map_err(|e| DemandError::Unavailable(e.to_string()))?;
        let mut regions = Vec::new();
        let mut pages = 0usize;
        for r in mem.iter() {
            let len = r.len();
            let host = r.as_ptr() as u64;
            uffd.register(host as *mut libc::c_void, len as usize)
                .map_err(uffd_err("register"))?;
            let n = len.div_ceil(PAGE) as usize;
            pages += n;
            regions.push(Region {
                gpa: r.start_addr().0,
                host,
                len,
                present: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        Ok(DemandMemory {
            uffd,
            regions,
            missing: AtomicUsize::new(pages),
        })
    }

    /// Like [`DemandMemory::register`] for memory that holds most of its
    /// pages already: `missing` (a bitmap of pages per region) names the
    /// ones to fetch; their current contents are dropped first (stale
    /// copies must fault), every other page counts as present.
    pub fn register_missing(
        mem: &GuestMemory,
        missing: &[Vec<u64>],
    ) -> Result<DemandMemory, DemandError> {
        if missing.len() != mem.num_regions() {
            return Err(DemandError::Uffd {
                op: "register",
                reason: format!(
                    "{} page lists for {} memory regions",
                    missing.len(),
                    mem.num_regions()
                ),
            });
        }
        for (r, bits) in mem.iter().zip(missing) {
            let pages = r.len().div_ceil(PAGE);
            let mut page = 0;
            while page < pages {
                if !bit(bits, page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < pages && bit(bits, page) {
                    page += 1;
                }
                // SAFETY: the range lies inside the region's live private
                // anonymous mapping (page < pages); MADV_DONTNEED drops
                // those pages (they read as missing afterwards), which no
                // one uses yet: the VM has not started.
                let rc = unsafe {
                    libc::madvise(
                        r.as_ptr().add((start * PAGE) as usize).cast(),
                        ((page - start) * PAGE) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(DemandError::Uffd {
                        op: "madvise",
                        reason: std::io::Error::last_os_error().to_string(),
                    });
                }
            }
        }
        let d = DemandMemory::register(mem)?;
        let mut missing_pages = 0usize;
        for (r, bits) in d.regions.iter().zip(missing) {
            let pages = (r.len / PAGE) as usize;
            for (w, word) in r.present.iter().enumerate() {
                let want = bits.get(w).copied().unwrap_or(0);
                let valid = if (w + 1) * 64 <= pages {
                    u64::MAX
                } else {
                    (1u64 << (pages % 64)) - 1
                };
                word.store(!want & valid, Ordering::Release);
                missing_pages += (want & valid).count_ones() as usize;
            }
        }
        d.missing.store(missing_pages, Ordering::Release);
        Ok(d)
    }

    fn region_of_host(&self, host: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host - r.host < r.len)
    }

    fn region_of_gpa(&self, gpa: u64, len: usize) -> Result<&Region, DemandError> {
        let bad = || DemandError::BadRange(gpa, len);
        if gpa % PAGE != 0 || len == 0 || len as u64 % PAGE != 0 {
            return Err(bad());
        }
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len && gpa - r.gpa + len as u64 <= r.len)
            .ok_or_else(bad)
    }

    /// Wait up to `timeout` for the next fault on a missing page; its guest
    /// page address, or None when nothing faulted (or the fault was on a
    /// page installed meanwhile, which is then woken).
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, DemandError> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return Ok(None);
        }
        let event = match self.uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(None),
            Err(e) => return Err(uffd_err("read")(e)),
        };
        let Event::Pagefault { addr, .. } = event else {
            return Ok(None);
        };
        let host = (addr as u64) & !(PAGE - 1);
        let Some(region) = self.region_of_host(host) else {
            return Ok(None);
        };
        let gpa = region.gpa + (host - region.host);
        if self.is_present(gpa) {
            // Either installed between the fault and now, or a page that
            // counts as present but was never written here (fresh memory
            // is zero, and zero pages are not sent): map the zero page
            // where nothing is mapped, and wake the toucher either way.
            // SAFETY: one page of a registered region (found above);
            // ZEROPAGE fills only an unmapped page.
            match unsafe {
                self.uffd
                    .zeropage(host as *mut libc::c_void, PAGE as usize, true)
            } {
                Ok(_) => {}
                Err(e) if is_eexist(&e) => self
                    .uffd
                    .wake(host as *mut libc::c_void, PAGE as usize)
                    .map_err(uffd_err("wake"))?,
                Err(e) => return Err(uffd_err("zeropage")(e)),
            }
            return Ok(None);
        }
        Ok(Some(gpa))
    }

    /// Is the page at `gpa` installed?
    pub fn is_present(&self, gpa: u64) -> bool {
        let Ok(r) = self.region_of_gpa(gpa & !(PAGE - 1), PAGE as usize) else {
            return false;
        };
        let page = ((gpa - r.gpa) / PAGE) as usize;
        r.present[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn mark(&self, r: &Region, gpa: u64, len: usize) {
        let first = ((gpa - r.gpa) / PAGE) as usize;
        for page in first..first + len / PAGE as usize {
            let bit = 1u64 << (page % 64);
            if r.present[page / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                self.missing.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Install `data` (whole pages) at `gpa` and wake whoever waits on
    /// them. Pages already there are left as they are.
    pub fn install(&self, gpa: u64, data: &[u8]) -> Result<(), DemandError> {
        let r = self.region_of_gpa(gpa, data.len())?;
        let mut done = 0usize;
        while done < data.len() {
            let at = gpa + done as u64;
            let dst = (r.host + (at - r.gpa)) as *mut libc::c_void;
            let len = data.len() - done;
            // SAFETY: `dst..dst+len` lies inside a region registered with
            // this userfaultfd (checked by region_of_gpa), a live mapping
            // owned by the guest memory this outlives; `src` is `len`
            // readable bytes of `data`. UFFDIO_COPY only fills missing
            // pages atomically and never overwrites present ones.
            let r2 = unsafe { self.uffd.copy(data[done..].as_ptr().cast(), dst, len, true) };
            match r2 {
                Ok(n) if n > 0 => done += n,
                Err(uffd::Error::PartiallyCopied(n)) if n > 0 => done += n,
                Err(e) if is_eexist(&e) => {
                    // Some page of the range is there already: go page
                    // by page past it.
                    self.install_each(r, at, &data[done..])?;
                    done = data.len();
                }
                Ok(_) | Err(uffd::Error::PartiallyCopied(_)) => {
                    return Err(DemandError::Uffd {
                        op: "copy",
                        reason: format!("no progress at guest address {at:#x}"),
                    })
                }
                Err(e) => return Err(uffd_err("copy")(e)),
            }
        }
        self.mark(r, gpa, data.len());
        Ok(())
    }

    fn install_each(&self, r: &Region, gpa: u64, data: &[u8]) -> Result<(), DemandError> {
        for (k, page) in data.chunks(PAGE as usize).enumerate() {
            let at = gpa + k as u64 * PAGE;
            let dst = (r.host + (at - r.gpa)) as *mut libc::c_void;
            // SAFETY: as in `install`, one page.
            match unsafe { self.uffd.copy(page.as_ptr().cast(), dst, page.len(), true) } {
                Ok(_) => {}
                Err(e) if is_eexist(&e) => {
                    self.uffd
                        .wake(dst, PAGE as usize)
                        .map_err(uffd_err("wake"))?;
                }
                Err(e) => return Err(uffd_err("copy")(e)),
            }
        }
        Ok(())
    }

    /// Install zero pages at `gpa` (pages the source says are all zero).
    pub fn install_zero(&self, gpa: u64, len: usize) -> Result<(), DemandError> {
        let r = self.region_of_gpa(gpa, len)?;
        for k in 0..len / PAGE as usize {
            let at = gpa + k as u64 * PAGE;
            let dst = (r.host + (at - r.gpa)) as *mut libc::c_void;
            // SAFETY: as in `install`: one registered page; ZEROPAGE maps
            // the zero page only where nothing is mapped.
            match unsafe { self.uffd.zeropage(dst, PAGE as usize, true) } {
                Ok(_) => {}
                Err(e) if is_eexist(&e) => {
                    self.uffd
                        .wake(dst, PAGE as usize)
                        .map_err(uffd_err("wake"))?;
                }
                Err(e) => return Err(uffd_err("zeropage")(e)),
            }
        }
        self.mark(r, gpa, len);
        Ok(())
    }

    /// Pages not installed yet.
    pub fn missing(&self) -> usize {
        self.missing.load(Ordering::Acquire)
    }

    /// Disarm every region: memory is ordinary memory again (a page still
    /// missing reads as zero from now on).
    pub fn finish(self) -> Result<(), DemandError> {
        for r in &self.regions {
            self.uffd
                .unregister(r.host as *mut libc::c_void, r.len as usize)
                .map_err(uffd_err("unregister"))?;
        }
        Ok(())
    }
}

fn bit(bits: &[u64], page: u64) -> bool {
    bits.get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// The kernel's "a page is there already".
fn is_eexist(e: &uffd::Error) -> bool {
    e.is_eexist()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    /// The bytes the "source" has for the page at `gpa`.
    fn page_of(gpa: u64) -> Vec<u8> {
        (0..PAGE).map(|i| ((gpa >> 12) as u8) ^ (i as u8)).collect()
    }

    fn armed(mib: u64) -> Option<(Arc<GuestMemory>, Arc<DemandMemory>)> {
        let mem = Arc::new(crate::memory::test_memory(mib));
        match DemandMemory::register(&mem) {
            Ok(d) => Some((mem, Arc::new(d))),
            Err(DemandError::Unavailable(why)) => {
                eprintln!("skipping: userfaultfd unavailable here: {why}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Serve faults from `page_of` until `stop` says so.
    fn serve(
        d: Arc<DemandMemory>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Vec<u64>> {
        std::thread::spawn(move || {
            let mut faults = Vec::new();
            while !stop.load(Ordering::Acquire) {
                if let Some(gpa) = d.next_fault(Duration::from_millis(20)).unwrap() {
                    faults.push(gpa);
                    d.install(gpa, &page_of(gpa)).unwrap();
                }
            }
            faults
        })
    }

    #[test]
    fn touched_pages_are_fetched_once_and_prefetched_ones_never() {
        let Some((mem, d)) = armed(16) else { return };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = serve(d.clone(), stop.clone());
        let total = d.missing();
        assert_eq!(total, 16 << 8);
        // Prefetched before anyone looks: no fault for it.
        d.install(0x5000, &page_of(0x5000)).unwrap();
        d.install_zero(0x9000, 2 * PAGE as usize).unwrap();
        // A "vCPU" reads pages (user-mode faults) twice.
        let reader = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    for gpa in [0x5000u64, 0x7000, 0x7800, 0x9000, 0xa000, 0xf0_0000] {
                        let v: u8 = mem.read_obj(GuestAddress(gpa + 3)).unwrap();
                        let page = gpa & !(PAGE - 1);
                        let want = if page == 0x9000 || page == 0xa000 {
                            0
                        } else {
                            page_of(page)[(gpa - page + 3) as usize]
                        };
                        assert_eq!(v, want, "byte at {gpa:#x}");
                    }
                }
            })
        };
        reader.join().unwrap();
        // The kernel touches guest memory on the VMM's behalf (a device's
        // write(2) from a guest buffer): a kernel-mode fault, served too.
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let host = mem.get_host_address(GuestAddress(0x20_0000)).unwrap();
        // SAFETY: 16 bytes of mapped guest memory into our own pipe.
        let n = unsafe { libc::write(fds[1], host.cast(), 16) };
        assert_eq!(n, 16);
        let mut buf = [0u8; 16];
        // SAFETY: reading what we wrote into a local buffer.
        assert_eq!(
            unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 16) },
            16
        );
        assert_eq!(&buf[..], &page_of(0x20_0000)[..16]);
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        stop.store(true, Ordering::Release);
        let mut faults = server.join().unwrap();
        faults.sort_unstable();
        assert_eq!(
            faults,
            vec![0x7000, 0x20_0000, 0xf0_0000],
            "one fault per missing page touched"
        );
        assert_eq!(d.missing(), total - 6);
        // Disarmed: the rest is plain zero-filled memory.
        Arc::try_unwrap(d).ok().unwrap().finish().unwrap();
        let v: u64 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
        assert_eq!(v, 0);
    }

    /// Memory filled by pre-copy, then a few pages named stale: those
    /// (and only those) fault and get the fresh copy.
    #[test]
    fn only_the_named_pages_are_fetched_again() {
        let mem = crate::memory::test_memory(4);
        for gpa in (0..4u64 << 20).step_by(PAGE as usize) {
            mem.write_slice(&[0xaa; PAGE as usize], GuestAddress(gpa))
                .unwrap();
        }
        let mut stale = vec![vec![0u64; 16]];
        for page in [3u64, 64, 65, 1023] {
            stale[0][(page / 64) as usize] |= 1 << (page % 64);
        }
        let d = match DemandMemory::register_missing(&mem, &stale) {
            Ok(d) => Arc::new(d),
            Err(DemandError::Unavailable(why)) => {
                eprintln!("skipping: userfaultfd unavailable here: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(d.missing(), 4);
        let mem = Arc::new(mem);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = serve(d.clone(), stop.clone());
        // Never written here and not named: reads as zero, no request.
        // SAFETY: dropping a page of our own mapping before it is read.
        unsafe {
            libc::madvise(
                mem.get_host_address(GuestAddress(200 * PAGE))
                    .unwrap()
                    .cast(),
                PAGE as usize,
                libc::MADV_DONTNEED,
            )
        };
        let z: u64 = mem.read_obj(GuestAddress(200 * PAGE)).unwrap();
        assert_eq!(z, 0);
        for page in [0u64, 3, 64, 65, 100, 1023] {
            let v: u8 = mem.read_obj(GuestAddress(page * PAGE + 1)).unwrap();
            let want = if [3, 64, 65, 1023].contains(&page) {
                page_of(page * PAGE)[1]
            } else {
                0xaa
            };
            assert_eq!(v, want, "page {page}");
        }
        stop.store(true, Ordering::Release);
        let mut faults = server.join().unwrap();
        faults.sort_unstable();
        assert_eq!(faults, vec![3 * PAGE, 64 * PAGE, 65 * PAGE, 1023 * PAGE]);
        assert_eq!(d.missing(), 0);
    }

    #[test]
    fn installing_twice_keeps_the_first_copy_and_ranges_are_checked() {
        let Some((mem, d)) = armed(2) else { return };
        d.install(0x1000, &[1u8; 2 * PAGE as usize]).unwrap();
        // Overlapping: the page at 0x2000 is there, 0x3000 is not.
        d.install(0x2000, &[2u8; 2 * PAGE as usize]).unwrap();
        let a: u8 = mem.read_obj(GuestAddress(0x2000)).unwrap();
        let b: u8 = mem.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!((a, b), (1, 2));
        assert!(d.is_present(0x3fff) && !d.is_present(0x4000));
        assert_eq!(d.missing(), 512 - 3);
        for (gpa, len) in [
            (0x1001, 4096),
            (0x1000, 100),
            (2 << 20, 4096),
            ((2 << 20) - 4096, 8192),
        ] {
            assert!(
                matches!(
                    d.install(gpa, &vec![0; len]),
                    Err(DemandError::BadRange(..))
                ),
                "{gpa:#x}+{len}"
            );
        }
    }
}
