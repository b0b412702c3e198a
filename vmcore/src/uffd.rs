//! The few userfaultfd(2) calls [`crate::demand`] needs, declared here
//! with `libc` and `vmm-sys-util`'s ioctl macros. The `userfaultfd` crate
//! did the same job, but its -sys crate runs bindgen at build time, which
//! wants libclang on the build machine; these half a dozen structs and
//! ioctl numbers are a stable kernel ABI (include/uapi/linux/userfaultfd.h)
//! and are all we use.
//!
//! The API follows the subset of that crate vireo used ([`UffdBuilder`],
//! [`Uffd::register`], [`Uffd::copy`], [`Uffd::zeropage`], [`Uffd::wake`],
//! [`Uffd::read_event`]), so its callers read the same.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::c_void;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

/// The ioctl "type" of userfaultfd (UFFDIO) and the API version UFFDIO_API
/// asks for (UFFD_API); both are 0xAA in the kernel's header.
const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

/// userfaultfd(2) flag: only faults from user mode (kernel-mode faults,
/// from KVM or a syscall touching guest memory, are then not reported).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

/// /dev/userfaultfd (Linux 6.1+): hands out userfaultfds that may take
/// kernel-mode faults to whoever may open it, whatever the sysctl says.
const UFFD_DEVICE_PATH: &str = "/dev/userfaultfd";

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// struct uffd_msg: an event byte, 7 reserved bytes, then a union whose
/// page-fault member is { flags, address, ptid } (32 bytes in all).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a userfaultfd: {0}")]
    Open(String),
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(io::Error),
    /// UFFDIO_COPY was interrupted after this many bytes (EAGAIN: the
    /// memory map changed under it); the rest may be retried.
    #[error("UFFDIO_COPY stopped after {0} bytes")]
    PartiallyCopied(usize),
    #[error("UFFDIO_COPY: {0}")]
    CopyFailed(io::Error),
    #[error("UFFDIO_ZEROPAGE: {0}")]
    ZeropageFailed(io::Error),
    #[error("{op}: {source}")]
    System { op: &'static str, source: io::Error },
    #[error("short userfaultfd message: {0} of 32 bytes")]
    IncompleteMsg(usize),
}

impl Error {
    /// The kernel's "a page is mapped there already" (EEXIST) from COPY or
    /// ZEROPAGE: harmless when two installers race for one page.
    pub fn is_eexist(&self) -> bool {
        match self {
            Error::CopyFailed(e) | Error::ZeropageFailed(e) => {
                e.raw_os_error() == Some(libc::EEXIST)
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A touch of a missing page at `addr` (not page-aligned: the faulting
    /// address itself).
    Pagefault { addr: *mut c_void, write: bool },
    /// Events of features vireo does not ask for (fork, remap, ...): the
    /// kernel's event number.
    Other(u8),
}

/// How to open a userfaultfd (the defaults of the `userfaultfd` crate:
/// close-on-exec, non-blocking, user-mode faults only).
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    close_on_exec: bool,
    non_blocking: bool,
    user_mode_only: bool,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        UffdBuilder::new()
    }
}

impl UffdBuilder {
    pub fn new() -> UffdBuilder {
        UffdBuilder {
            close_on_exec: true,
            non_blocking: true,
            user_mode_only: true,
        }
    }

    pub fn close_on_exec(&mut self, on: bool) -> &mut Self {
        self.close_on_exec = on;
        self
    }

    pub fn non_blocking(&mut self, on: bool) -> &mut Self {
        self.non_blocking = on;
        self
    }

    /// `false`: report faults taken in kernel mode too (KVM, syscalls on
    /// guest buffers). Needs /dev/userfaultfd, CAP_SYS_PTRACE or
    /// `vm.unprivileged_userfaultfd=1`.
    pub fn user_mode_only(&mut self, on: bool) -> &mut Self {
        self.user_mode_only = on;
        self
    }

    /// Open the userfaultfd (from /dev/userfaultfd when it exists and may
    /// be opened, else with the system call) and do the UFFDIO_API
    /// handshake.
    pub fn create(&self) -> Result<Uffd> {
        let mut flags = 0;
        if self.close_on_exec {
            flags |= libc::O_CLOEXEC;
        }
        if self.non_blocking {
            flags |= libc::O_NONBLOCK;
        }
        if self.user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        let fd = match open_device(flags) {
            Ok(fd) => fd,
            // The system call is allowed to root and CAP_SYS_PTRACE even
            // where the device is missing or closed to us: try it before
            // giving up, and name both reasons if it fails too.
            Err(dev) => open_syscall(flags).map_err(|sys| {
                Error::Open(format!("{UFFD_DEVICE_PATH}: {dev}; userfaultfd(2): {sys}"))
            })?,
        };
        let uffd = Uffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on our userfaultfd reads and writes one
        // struct uffdio_api, which `api` is.
        let rc = unsafe { ioctl_with_mut_ref(&uffd.fd, UFFDIO_API(), &mut api) };
        if rc < 0 {
            return Err(Error::Api(io::Error::last_os_error()));
        }
        Ok(uffd)
    }
}

fn open_device(flags: libc::c_int) -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(UFFD_DEVICE_PATH)?;
    // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes the flags by
    // value and returns a new fd (or -1); it touches no memory of ours.
    let fd = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just gave us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_syscall(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just gave us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn range(start: *mut c_void, len: usize) -> UffdioRange {
    UffdioRange {
        start: start as u64,
        len: len as u64,
    }
}

impl Uffd {
    /// Report faults on missing pages of `start..start+len` (page-aligned,
    /// mapped). Returns the ioctls the kernel allows on the range (a bit
    /// per ioctl number).
    pub fn register(&self, start: *mut c_void, len: usize) -> Result<u64> {
        let mut reg = UffdioRegister {
            range: range(start, len),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register;
        // registering a range changes how faults on it are handled, not
        // its contents.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) };
        if rc < 0 {
            return Err(Error::System {
                op: "UFFDIO_REGISTER",
                source: io::Error::last_os_error(),
            });
        }
        Ok(reg.ioctls)
    }

    /// Stop reporting faults on `start..start+len`.
    pub fn unregister(&self, start: *mut c_void, len: usize) -> Result<()> {
        let mut r = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_UNREGISTER(), &mut r) };
        if rc < 0 {
            return Err(Error::System {
                op: "UFFDIO_UNREGISTER",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Wake the threads waiting on faults in `start..start+len`.
    pub fn wake(&self, start: *mut c_void, len: usize) -> Result<()> {
        let mut r = range(start, len);
        // SAFETY: UFFDIO_WAKE reads one uffdio_range.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WAKE(), &mut r) };
        if rc < 0 {
            return Err(Error::System {
                op: "UFFDIO_WAKE",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Fill the missing pages `dst..dst+len` of a registered range with
    /// `len` bytes from `src`, atomically per page, and wake the waiters
    /// when `wake`. Returns the bytes copied.
    ///
    /// # Safety
    /// `src` must be `len` readable bytes; `dst..dst+len` a registered
    /// range that nothing else expects to stay unmapped.
    pub unsafe fn copy(
        &self,
        src: *const c_void,
        dst: *mut c_void,
        len: usize,
        wake: bool,
    ) -> Result<usize> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy; the kernel
        // reads `src` and maps pages at `dst` (the caller's contract).
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut c) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Err(Error::PartiallyCopied(c.copy.max(0) as usize));
            }
            return Err(Error::CopyFailed(e));
        }
        if c.copy < 0 {
            return Err(Error::CopyFailed(io::Error::from_raw_os_error(
                (-c.copy) as i32,
            )));
        }
        Ok(c.copy as usize)
    }

    /// Map the zero page at the missing pages of `start..start+len` and
    /// wake the waiters when `wake`. Returns the bytes zeroed.
    ///
    /// # Safety
    /// `start..start+len` must be a registered range that nothing else
    /// expects to stay unmapped.
    pub unsafe fn zeropage(&self, start: *mut c_void, len: usize, wake: bool) -> Result<usize> {
        let mut z = UffdioZeropage {
            range: range(start, len),
            mode: if wake {
                0
            } else {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage and
        // maps zero pages only where nothing is mapped (caller's contract).
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut z) };
        if rc < 0 {
            return Err(Error::ZeropageFailed(io::Error::last_os_error()));
        }
        if z.zeropage < 0 {
            return Err(Error::ZeropageFailed(io::Error::from_raw_os_error(
                (-z.zeropage) as i32,
            )));
        }
        Ok(z.zeropage as usize)
    }

    /// The next event, or None when there is none (a non-blocking fd with
    /// nothing to read).
    pub fn read_event(&self) -> Result<Option<Event>> {
        let mut msg = UffdMsg::default();
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: reads at most `size` bytes into `msg`, a plain-old-data
        // struct of exactly that size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(Error::System {
                op: "read",
                source: e,
            });
        }
        if n as usize != size {
            return Err(Error::IncompleteMsg(n as usize));
        }
        Ok(Some(match msg.event {
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                addr: msg.arg[1] as *mut c_void,
                write: msg.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            },
            other => Event::Other(other),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const PAGE: usize = 4096;

    /// The ioctl numbers the kernel header gives (_IOWR/_IOR of 0xAA with
    /// the struct sizes), as the C preprocessor computes them on x86-64.
    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
    }

    struct Anon {
        ptr: *mut c_void,
        len: usize,
    }

    // SAFETY: a plain mapping; the tests synchronise access themselves.
    unsafe impl Send for Anon {}
    // SAFETY: as above.
    unsafe impl Sync for Anon {}

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * PAGE;
            // SAFETY: a fresh private anonymous mapping, no fixed address.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Anon { ptr, len }
        }

        fn page(&self, k: usize) -> *mut c_void {
            assert!(k * PAGE < self.len);
            // SAFETY: inside the mapping (checked above).
            unsafe { self.ptr.cast::<u8>().add(k * PAGE).cast() }
        }

        fn read(&self, k: usize, off: usize) -> u8 {
            // SAFETY: inside the mapping; a volatile read so the touch
            // (and its fault) really happens.
            unsafe { std::ptr::read_volatile(self.page(k).cast::<u8>().add(off)) }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }

    fn create(kernel_faults: bool) -> Option<Uffd> {
        match UffdBuilder::new().user_mode_only(!kernel_faults).create() {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("skipping: userfaultfd unavailable here: {e}");
                None
            }
        }
    }

    /// A thread touches missing pages; this thread reads the faults and
    /// answers one with UFFDIO_COPY and one with UFFDIO_ZEROPAGE.
    #[test]
    fn faults_are_reported_and_resolved_by_copy_and_zeropage() {
        let Some(uffd) = create(false) else { return };
        let mem = Arc::new(Anon::new(4));
        let ioctls = uffd.register(mem.ptr, mem.len).unwrap();
        for nr in [0x02, 0x03, 0x04] {
            assert!(
                ioctls & (1 << nr) != 0,
                "ioctl {nr:#x} allowed on the range"
            );
        }
        assert_eq!(uffd.read_event().unwrap(), None, "nothing touched yet");

        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || (mem.read(1, 7), mem.read(3, 100)))
        };
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut answered = Vec::new();
        while answered.len() < 2 {
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert!(n > 0, "no fault reported within 5 s");
            let Some(Event::Pagefault { addr, write }) = uffd.read_event().unwrap() else {
                continue;
            };
            assert!(!write, "the toucher only reads");
            let page = (addr as usize - mem.ptr as usize) / PAGE;
            if page == 1 {
                let data: Vec<u8> = (0..PAGE).map(|i| i as u8 ^ 0x5a).collect();
                // SAFETY: one page of our registered mapping, from a page
                // of readable bytes.
                let n = unsafe { uffd.copy(data.as_ptr().cast(), mem.page(1), PAGE, true) };
                assert_eq!(n.unwrap(), PAGE);
            } else {
                assert_eq!(page, 3);
                // SAFETY: one page of our registered mapping.
                let n = unsafe { uffd.zeropage(mem.page(3), PAGE, true) };
                assert_eq!(n.unwrap(), PAGE);
            }
            answered.push(page);
        }
        assert_eq!(answered, vec![1, 3]);
        assert_eq!(toucher.join().unwrap(), (7 ^ 0x5a, 0));

        // Installing over a present page: EEXIST, which callers treat as
        // "someone else was first", and the page keeps its first contents.
        let other = [0xffu8; PAGE];
        // SAFETY: as above.
        let e = unsafe { uffd.copy(other.as_ptr().cast(), mem.page(1), PAGE, true) }.unwrap_err();
        assert!(e.is_eexist(), "{e}");
        // SAFETY: as above.
        let e = unsafe { uffd.zeropage(mem.page(3), PAGE, true) }.unwrap_err();
        assert!(e.is_eexist(), "{e}");
        assert_eq!(mem.read(1, 7), 7 ^ 0x5a);
        uffd.wake(mem.page(1), PAGE).unwrap();

        // Disarmed: the untouched pages are plain zero memory.
        uffd.unregister(mem.ptr, mem.len).unwrap();
        assert_eq!(mem.read(0, 0), 0);
        assert_eq!(mem.read(2, 0), 0);
    }

    /// Faults the kernel takes on our behalf (write(2) from a registered
    /// buffer) are reported too when asked for.
    #[test]
    fn kernel_mode_faults_are_reported() {
        let Some(uffd) = create(true) else { return };
        let uffd = Arc::new(uffd);
        let mem = Arc::new(Anon::new(1));
        uffd.register(mem.ptr, mem.len).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (uffd, mem, stop) = (uffd.clone(), mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut faults = 0;
                while !stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                        continue;
                    }
                    if let Some(Event::Pagefault { .. }) = uffd.read_event().unwrap() {
                        faults += 1;
                        let data = [0x42u8; PAGE];
                        // SAFETY: the one page of our registered mapping.
                        unsafe { uffd.copy(data.as_ptr().cast(), mem.page(0), PAGE, true) }
                            .unwrap();
                    }
                }
                faults
            })
        };
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: 8 bytes of our mapping into our own pipe; the kernel
        // faults on the missing page and waits for the server thread.
        assert_eq!(unsafe { libc::write(fds[1], mem.ptr, 8) }, 8);
        let mut buf = [0u8; 8];
        // SAFETY: reading what we wrote into a local buffer.
        assert_eq!(unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 8) }, 8);
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        stop.store(true, Ordering::Release);
        assert_eq!(server.join().unwrap(), 1);
        assert_eq!(buf, [0x42; 8]);
    }

    #[test]
    fn registering_a_misaligned_range_is_an_error() {
        let Some(uffd) = create(false) else { return };
        let mem = Anon::new(2);
        // SAFETY: one byte into our own mapping.
        let odd = unsafe { mem.ptr.cast::<u8>().add(1) }.cast();
        let e = uffd.register(odd, PAGE).unwrap_err();
        assert!(e.to_string().contains("UFFDIO_REGISTER"), "{e}");
    }
}
