//! THE reviewed place: which syscalls each kind of thread of a `vireo run`
//! process may make, with the argument values that matter, and who needs
//! each one. Everything else kills the whole process (see
//! [`super::Policy`]).
//!
//! Reading guide. A thread's filter is [`COMMON`] plus its kind's table
//! ([`super::ThreadKind::allowed`]). Threads are started by an unfiltered
//! main thread before it filters itself, or later (a virtio device the
//! guest activates from a vCPU, device threads restarted after a snapshot)
//! by the launcher thread ([`LAUNCHER_EXTRA`]); either way a new thread
//! first runs under its parent's filter (the kernel copies it into the
//! child) until it installs its own on top, so the launcher's filter is
//! the union of the kinds it starts ([`super::ThreadKind::launchable`])
//! plus thread creation.
//!
//! Found by running the integration tests under `strace -f -Y` (which names
//! the thread of each call) and with `VIREO_SECCOMP_LOG=1` (violations are
//! logged, not fatal: `dmesg | grep type=1326`), then cut to what each call
//! site needs. x86-64 only (the VMM is x86-64 only).

use libc::c_long;

/// What an allowed syscall's arguments must be.
#[derive(Debug, Clone, Copy)]
pub enum Args {
    /// Any arguments.
    Any,
    /// `ioctl`: the request (argument 1) is one of these.
    Ioctl(&'static [Ioctl]),
    /// Argument `arg` equals one of `values` (32-bit compare).
    OneOf { arg: u8, values: &'static [u64] },
    /// `mmap`/`mprotect`: the protection (argument 2) lacks `PROT_EXEC`.
    NoExec,
    /// `clone`: the flags (argument 0) include `CLONE_THREAD` (a thread of
    /// this process, never a new process).
    ThreadOnly,
}

/// One allowed syscall.
#[derive(Debug, Clone, Copy)]
pub struct Allow {
    pub nr: c_long,
    pub name: &'static str,
    pub args: Args,
    /// Who makes this call, and why.
    pub why: &'static str,
}

/// An ioctl request number with its name (for the report and the tests).
#[derive(Debug, Clone, Copy)]
pub struct Ioctl(pub u64, pub &'static str);

const fn any(nr: c_long, name: &'static str, why: &'static str) -> Allow {
    Allow {
        nr,
        name,
        args: Args::Any,
        why,
    }
}

const fn with(nr: c_long, name: &'static str, args: Args, why: &'static str) -> Allow {
    Allow {
        nr,
        name,
        args,
        why,
    }
}

use libc::*;

// ---- ioctl request numbers (x86-64, <linux/kvm.h>, <asm-generic/ioctls.h>,
// <linux/userfaultfd.h>, <linux/if_tun.h>, <linux/fs.h>) ----

const KVM_RUN: Ioctl = Ioctl(0xae80, "KVM_RUN");
const KVM_GET_REGS: Ioctl = Ioctl(0x8090_ae81, "KVM_GET_REGS");
const KVM_GET_SREGS: Ioctl = Ioctl(0x8138_ae83, "KVM_GET_SREGS");
const KVM_GET_MSRS: Ioctl = Ioctl(0xc008_ae88, "KVM_GET_MSRS");
const KVM_GET_FPU: Ioctl = Ioctl(0x81a0_ae8c, "KVM_GET_FPU");
const KVM_GET_LAPIC: Ioctl = Ioctl(0x8400_ae8e, "KVM_GET_LAPIC");
const KVM_GET_MP_STATE: Ioctl = Ioctl(0x8004_ae98, "KVM_GET_MP_STATE");
const KVM_GET_VCPU_EVENTS: Ioctl = Ioctl(0x8040_ae9f, "KVM_GET_VCPU_EVENTS");
const KVM_GET_DEBUGREGS: Ioctl = Ioctl(0x8080_aea1, "KVM_GET_DEBUGREGS");
const KVM_GET_XSAVE: Ioctl = Ioctl(0x9000_aea4, "KVM_GET_XSAVE");
const KVM_GET_XCRS: Ioctl = Ioctl(0x8188_aea6, "KVM_GET_XCRS");
const KVM_GET_TSC_KHZ: Ioctl = Ioctl(0xaea3, "KVM_GET_TSC_KHZ");
const KVM_IRQ_LINE: Ioctl = Ioctl(0x4008_ae61, "KVM_IRQ_LINE");
const KVM_SIGNAL_MSI: Ioctl = Ioctl(0x4020_aea5, "KVM_SIGNAL_MSI");
const KVM_IRQFD: Ioctl = Ioctl(0x4020_ae76, "KVM_IRQFD");
const KVM_IOEVENTFD: Ioctl = Ioctl(0x4040_ae79, "KVM_IOEVENTFD");
const KVM_GET_DIRTY_LOG: Ioctl = Ioctl(0x4010_ae42, "KVM_GET_DIRTY_LOG");
const KVM_SET_USER_MEMORY_REGION: Ioctl = Ioctl(0x4020_ae46, "KVM_SET_USER_MEMORY_REGION");
const KVM_GET_IRQCHIP: Ioctl = Ioctl(0xc208_ae62, "KVM_GET_IRQCHIP");
const KVM_GET_PIT2: Ioctl = Ioctl(0x8070_ae9f, "KVM_GET_PIT2");
const KVM_GET_CLOCK: Ioctl = Ioctl(0x8030_ae7c, "KVM_GET_CLOCK");
const KVM_CHECK_EXTENSION: Ioctl = Ioctl(0xae03, "KVM_CHECK_EXTENSION");

const TCGETS: Ioctl = Ioctl(0x5401, "TCGETS");
const TCSETS: Ioctl = Ioctl(0x5402, "TCSETS");
const TCSETSW: Ioctl = Ioctl(0x5403, "TCSETSW");
const TCSETSF: Ioctl = Ioctl(0x5404, "TCSETSF");
const FIONBIO: Ioctl = Ioctl(0x5421, "FIONBIO");
const FICLONE: Ioctl = Ioctl(0x4004_9409, "FICLONE");

const UFFDIO_API: Ioctl = Ioctl(0xc018_aa3f, "UFFDIO_API");
const UFFDIO_REGISTER: Ioctl = Ioctl(0xc020_aa00, "UFFDIO_REGISTER");
const UFFDIO_UNREGISTER: Ioctl = Ioctl(0x8010_aa01, "UFFDIO_UNREGISTER");
const UFFDIO_WAKE: Ioctl = Ioctl(0x8010_aa02, "UFFDIO_WAKE");
const UFFDIO_COPY: Ioctl = Ioctl(0xc028_aa03, "UFFDIO_COPY");
const UFFDIO_ZEROPAGE: Ioctl = Ioctl(0xc020_aa04, "UFFDIO_ZEROPAGE");

const TUNSETOFFLOAD: Ioctl = Ioctl(0x4004_54d0, "TUNSETOFFLOAD");

/// A vCPU: KVM_RUN, and a triple fault's RIP and mode. What it does for
/// devices: virtio activation registers ioeventfds/irqfds and sets a TAP's
/// offloads; legacy devices (serial, i8042, RTC, ACPI) raise lines; MSI-X
/// writes signal MSIs. (The emulator's vCPU makes none of these.)
#[rustfmt::skip]
const VCPU_IOCTLS: &[Ioctl] = &[
    KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_IRQ_LINE, KVM_SIGNAL_MSI, KVM_IRQFD, KVM_IOEVENTFD,
    TUNSETOFFLOAD,
];

/// Device threads raise interrupts: an irqfd write mostly, but level lines
/// and MSIs without an irqfd go through the VM fd.
const DEVICE_IOCTLS: &[Ioctl] = &[KVM_IRQ_LINE, KVM_SIGNAL_MSI];

/// The main thread after set-up: pause and capture for snapshots and
/// migration (it reads every vCPU and VM state; loading one happens before
/// the filter), dirty logs (switched on per memory slot), the power
/// button's interrupt, disk copies by reflink, and the terminal (restored
/// at exit).
#[rustfmt::skip]
const MAIN_IOCTLS: &[Ioctl] = &[
    KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_MSRS, KVM_GET_FPU, KVM_GET_LAPIC, KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS, KVM_GET_DEBUGREGS, KVM_GET_XSAVE, KVM_GET_XCRS, KVM_GET_TSC_KHZ,
    KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK, KVM_CHECK_EXTENSION,
    KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION,
    KVM_IRQ_LINE, KVM_SIGNAL_MSI, KVM_IOEVENTFD,
    FICLONE, TCGETS, TCSETS, TCSETSW, TCSETSF, FIONBIO,
];

/// Post-copy's fault and link threads: read faults, fill pages, disarm.
#[rustfmt::skip]
const MIGRATION_IOCTLS: &[Ioctl] = &[
    UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_COPY, UFFDIO_ZEROPAGE,
    FIONBIO,
];

/// Every thread: the Rust runtime, the allocator, logging, thread exit.
#[rustfmt::skip]
pub const COMMON: &[Allow] = &[
    any(SYS_futex, "futex", "mutexes, condition variables, channels, thread joins"),
    with(SYS_mmap, "mmap", Args::NoExec, "the allocator (never executable memory)"),
    with(SYS_mprotect, "mprotect", Args::NoExec, "the allocator, stack guard pages (never executable)"),
    any(SYS_munmap, "munmap", "the allocator; a thread's signal stack at its exit"),
    any(SYS_mremap, "mremap", "the allocator growing a big buffer"),
    any(SYS_madvise, "madvise", "the allocator; glibc frees an exiting thread's stack (MADV_DONTNEED); the balloon"),
    any(SYS_brk, "brk", "the allocator"),
    any(SYS_write, "write", "logging to stderr; eventfd kicks (irqfd, ioeventfd emulation, worker stops)"),
    any(SYS_close, "close", "dropping descriptors (eventfds, epoll sets, connections)"),
    with(SYS_fcntl, "fcntl", Args::OneOf { arg: 1, values: &[F_GETFD as u64, F_GETFL as u64] }, "std checks a descriptor is open before closing it (debug builds)"),
    any(SYS_sigaltstack, "sigaltstack", "Rust's stack-overflow handler at thread start and exit"),
    any(SYS_rt_sigprocmask, "rt_sigprocmask", "glibc at thread exit and in signal handling"),
    any(SYS_rt_sigreturn, "rt_sigreturn", "return from the vCPU kick and stop-signal handlers"),
    any(SYS_sched_getaffinity, "sched_getaffinity", "glibc's pthread_getattr_np at thread start"),
    any(SYS_sched_yield, "sched_yield", "spin loops in locks"),
    any(SYS_gettid, "gettid", "std's thread ids, tracing"),
    any(SYS_getpid, "getpid", "glibc (raise, thread signalling)"),
    any(SYS_clock_gettime, "clock_gettime", "time (the vDSO handles most; a fallback)"),
    any(SYS_clock_nanosleep, "clock_nanosleep", "std::thread::sleep"),
    any(SYS_nanosleep, "nanosleep", "std::thread::sleep"),
    any(SYS_getrandom, "getrandom", "HashMap keys (per thread), rustls, ring"),
    any(SYS_exit, "exit", "a thread ends"),
    any(SYS_restart_syscall, "restart_syscall", "a sleep or wait resumed after SIGSTOP/SIGCONT or a ptrace stop"),
];

/// The jail's supervisor: wait for signals, forward them to the VMM, reap
/// it and end as it ended.
#[rustfmt::skip]
pub const SUPERVISOR: &[Allow] = &[
    any(SYS_rt_sigtimedwait, "rt_sigtimedwait", "sigwaitinfo: the signals to forward, SIGCHLD"),
    // kill: only of the VMM, its one child (added with its pid by
    // `compile_supervisor`).
    any(SYS_wait4, "wait4", "reaping the VMM"),
    any(SYS_rt_sigaction, "rt_sigaction", "ending by the VMM's signal (SIG_DFL first)"),
    any(SYS_tgkill, "tgkill", "raise(): ending by the VMM's signal"),
    any(SYS_exit_group, "exit_group", "ending with the VMM's exit status"),
];

/// A vCPU (KVM or emulator): run the guest, dispatch its exits to the
/// device models, and activate/reset virtio devices the driver sets up
/// (which builds the device thread's epoll set and eventfds on this
/// thread, then asks the launcher to start the thread).
#[rustfmt::skip]
pub const VCPU: &[Allow] = &[
    with(SYS_ioctl, "ioctl", Args::Ioctl(VCPU_IOCTLS), "KVM_RUN and what exits and device activation need (VCPU_IOCTLS)"),
    any(SYS_read, "read", "eventfds (a worker's stop event before a restart)"),
    any(SYS_eventfd2, "eventfd2", "a virtio device activated: its stop and notify events"),
    any(SYS_epoll_create1, "epoll_create1", "a virtio device activated: its worker's epoll set"),
    any(SYS_epoll_ctl, "epoll_ctl", "a virtio device activated: its fds into the epoll set"),
    any(SYS_timerfd_create, "timerfd_create", "a virtio device activated: its rate limiter's timer (bw=, ops=)"),
    with(SYS_fcntl, "fcntl", Args::OneOf { arg: 1, values: &[F_DUPFD_CLOEXEC as u64] }, "a virtio device activated: EventFd::try_clone of its events"),
    any(SYS_tgkill, "tgkill", "kicking another vCPU (INIT/SIPI; an interrupt for an emulator vCPU)"),
];

/// The emulator's vCPU, on top of [`VCPU`]: its translator keeps code in
/// a memfd mapped twice (read-write for the translator, read-execute for
/// the vCPU); made lazily on the first translated block.
#[rustfmt::skip]
pub const EMULATOR_VCPU_EXTRA: &[Allow] = &[
    any(SYS_memfd_create, "memfd_create", "the JIT's code arena"),
    any(SYS_ftruncate, "ftruncate", "sizing the JIT's code arena"),
    any(SYS_mmap, "mmap", "the JIT's read-execute view of its code arena (PROT_EXEC)"),
];

/// Every virtio device thread: its epoll loop over queue notifications,
/// the stop event and its host fds.
#[rustfmt::skip]
pub const DEVICE_COMMON: &[Allow] = &[
    any(SYS_epoll_wait, "epoll_wait", "the worker loop"),
    any(SYS_epoll_pwait, "epoll_pwait", "the worker loop (glibc's epoll_wait)"),
    any(SYS_epoll_ctl, "epoll_ctl", "watching/unwatching fds (vsock connections, TAP back-pressure)"),
    any(SYS_read, "read", "queue-notify and stop eventfds; TAP frames; vsock connection data"),
    with(SYS_ioctl, "ioctl", Args::Ioctl(DEVICE_IOCTLS), "interrupts through the VM fd"),
    any(SYS_tgkill, "tgkill", "kicking an emulator vCPU for an interrupt"),
    any(SYS_timerfd_settime, "timerfd_settime", "rate limits (bw=, ops=): arming and clearing the wake-up timer"),
];

/// virtio-blk: raw and qcow2 images (reads and writes at offsets; qcow2
/// grows its file by writing past the end).
#[rustfmt::skip]
pub const BLOCK: &[Allow] = &[
    any(SYS_pread64, "pread64", "reads, qcow2 metadata"),
    any(SYS_pwrite64, "pwrite64", "writes, qcow2 metadata"),
    any(SYS_fdatasync, "fdatasync", "FLUSH"),
    any(SYS_fallocate, "fallocate", "DISCARD and WRITE_ZEROES (punch hole)"),
    any(SYS_statx, "statx", "the image's size (std's metadata)"),
    any(SYS_fstat, "fstat", "the image's size (std's metadata on kernels without statx)"),
];

/// virtio-net: frames to and from the TAP.
#[rustfmt::skip]
pub const NET: &[Allow] = &[
    any(SYS_readv, "readv", "RX frames from the TAP into guest buffers"),
    any(SYS_writev, "writev", "TX frames from guest buffers to the TAP"),
];

/// virtio-vsock: guest connections to host Unix sockets, host connections
/// in through the listening socket.
#[rustfmt::skip]
pub const VSOCK: &[Allow] = &[
    with(SYS_socket, "socket", Args::OneOf { arg: 0, values: &[AF_UNIX as u64] }, "a guest connection to the host's Unix socket"),
    any(SYS_connect, "connect", "a guest connection to the host's Unix socket"),
    any(SYS_accept4, "accept4", "host connections to the VM's socket"),
    any(SYS_recvfrom, "recvfrom", "connection data"),
    any(SYS_sendto, "sendto", "connection data"),
    any(SYS_shutdown, "shutdown", "the guest shut its sending side"),
    any(SYS_fcntl, "fcntl", "non-blocking connections"),
    with(SYS_ioctl, "ioctl", Args::Ioctl(&[FIONBIO]), "non-blocking connections"),
    any(SYS_getsockopt, "getsockopt", "a non-blocking connect's result (SO_ERROR)"),
];

/// virtio-balloon: nothing beyond [`COMMON`] (madvise: MADV_DONTNEED on
/// private guest memory, MADV_REMOVE on shared).
pub const BALLOON: &[Allow] = &[];

/// virtio-rng: nothing beyond [`COMMON`] (getrandom for the guest's bytes).
pub const RNG: &[Allow] = &[];

/// virtio-console: nothing beyond [`COMMON`] (output is a write to stdout;
/// input comes from the stdin thread through memory).
pub const VIRTIO_CONSOLE: &[Allow] = &[];

/// The control socket's thread: accept a connection, read one line, hand
/// it to the main thread, write the reply.
#[rustfmt::skip]
pub const CONTROL: &[Allow] = &[
    any(SYS_accept4, "accept4", "a client connects"),
    any(SYS_read, "read", "the command line"),
    any(SYS_recvfrom, "recvfrom", "the command line"),
    any(SYS_sendto, "sendto", "the reply"),
    with(SYS_fcntl, "fcntl", Args::OneOf { arg: 1, values: &[F_DUPFD_CLOEXEC as u64] }, "try_clone of the connection"),
    any(SYS_setsockopt, "setsockopt", "the connection's read timeout"),
    // `snapshot DIR` is checked here, before the VM pauses (looking only,
    // never opening: the main thread writes the snapshot).
    any(SYS_statx, "statx", "snapshot DIR: must be new, its parent a real directory"),
    any(SYS_newfstatat, "newfstatat", "snapshot DIR: the same check (older glibc)"),
    any(SYS_readlink, "readlink", "snapshot DIR: realpath of its parent"),
    any(SYS_readlinkat, "readlinkat", "snapshot DIR: realpath of its parent"),
    any(SYS_getcwd, "getcwd", "snapshot DIR: a relative DIR made absolute"),
];

/// Post-copy migration target threads: the fault reader (userfaultfd) and
/// the link to the source (TCP or Unix, maybe TLS).
#[rustfmt::skip]
pub const MIGRATION: &[Allow] = &[
    with(SYS_ioctl, "ioctl", Args::Ioctl(MIGRATION_IOCTLS), "userfaultfd: fill pages, wake faulting threads, disarm"),
    any(SYS_read, "read", "fault messages, the stream, eventfds"),
    any(SYS_poll, "poll", "waiting for a fault or the stream with a timeout"),
    any(SYS_recvfrom, "recvfrom", "the stream"),
    any(SYS_sendto, "sendto", "page requests"),
    any(SYS_writev, "writev", "page requests"),
    any(SYS_setsockopt, "setsockopt", "read timeouts"),
    any(SYS_fcntl, "fcntl", "non-blocking mode"),
];

/// stdin pump and stop-signal watcher.
#[rustfmt::skip]
pub const CONSOLE: &[Allow] = &[any(SYS_read, "read", "stdin; the stop-signal eventfd")];

/// The main thread once the VM runs: wait, carry out control-socket
/// commands (pause; snapshot: write files; migrate-to: connect and send),
/// stop the VM and exit. Restoring happens before this filter.
#[rustfmt::skip]
pub const MAIN: &[Allow] = &[
    with(SYS_ioctl, "ioctl", Args::Ioctl(MAIN_IOCTLS), "vCPU/VM state for snapshots and migration, dirty logs, the terminal (MAIN_IOCTLS)"),
    any(SYS_tgkill, "tgkill", "kicking vCPUs out of the guest to pause"),
    any(SYS_read, "read", "eventfds, migration replies, snapshot parents"),
    any(SYS_pread64, "pread64", "a diff snapshot's parent; disk copies"),
    any(SYS_pwrite64, "pwrite64", "the snapshot's memory file; disk copies"),
    any(SYS_writev, "writev", "snapshot files; the migration stream"),
    any(SYS_openat, "openat", "snapshot files (state, memory, disk copies); the migration CA"),
    any(SYS_mkdir, "mkdir", "the snapshot directory"),
    any(SYS_rename, "rename", "snapshot files written whole, then renamed"),
    any(SYS_unlink, "unlink", "the control socket's file at exit; a disk copy's temporary file"),
    any(SYS_readlink, "readlink", "canonicalizing a snapshot's directory (realpath)"),
    any(SYS_newfstatat, "newfstatat", "std's metadata (snapshot paths)"),
    any(SYS_statx, "statx", "std's metadata"),
    any(SYS_fstat, "fstat", "std's metadata on kernels without statx"),
    any(SYS_lseek, "lseek", "disk copies (SEEK_DATA/SEEK_HOLE)"),
    any(SYS_ftruncate, "ftruncate", "the memory file's and disk copies' sizes"),
    any(SYS_fsync, "fsync", "snapshot files on disk before the reply"),
    any(SYS_fdatasync, "fdatasync", "snapshot files on disk before the reply"),
    any(SYS_uname, "uname", "glibc asking for the kernel version"),
    with(SYS_fcntl, "fcntl", Args::OneOf { arg: 1, values: &[F_DUPFD_CLOEXEC as u64, F_SETFL as u64] }, "migrate-to: cloning and non-blocking sockets"),
    with(SYS_socket, "socket", Args::OneOf { arg: 0, values: &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64] }, "migrate-to: the connection to the target"),
    any(SYS_connect, "connect", "migrate-to"),
    any(SYS_setsockopt, "setsockopt", "migrate-to: TCP_NODELAY, timeouts"),
    any(SYS_getsockopt, "getsockopt", "migrate-to: a connect's result (SO_ERROR)"),
    any(SYS_getsockname, "getsockname", "migrate-to"),
    any(SYS_recvfrom, "recvfrom", "migrate-to: the target's replies"),
    any(SYS_sendto, "sendto", "migrate-to: the stream"),
    any(SYS_poll, "poll", "migrate-to: connect with a timeout"),
    any(SYS_eventfd2, "eventfd2", "device threads restarted after a snapshot"),
    any(SYS_epoll_ctl, "epoll_ctl", "device threads restarted after a snapshot"),
    any(SYS_exit_group, "exit_group", "the process ends"),
];

/// The launcher (on top of the union of the kinds it starts): create a
/// thread of this process and set it up as std does, until the thread's
/// own code installs its filter.
#[rustfmt::skip]
pub const LAUNCHER_EXTRA: &[Allow] = &[
    with(SYS_clone, "clone", Args::ThreadOnly, "pthread_create (older glibc): threads only, never a process"),
    any(SYS_clone3, "clone3", "pthread_create (glibc 2.34+); its flags are in memory a filter cannot read, so this thread runs nothing else"),
    any(SYS_set_robust_list, "set_robust_list", "a new thread's start (glibc)"),
    any(SYS_rseq, "rseq", "a new thread's start (glibc)"),
    with(SYS_prctl, "prctl", Args::OneOf { arg: 0, values: &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64] }, "naming a new thread; no_new_privs before its filter"),
    with(SYS_seccomp, "seccomp", Args::OneOf { arg: 0, values: &[SECCOMP_SET_MODE_FILTER as u64] }, "a new thread installs its own filter (filters only ever narrow)"),
];
