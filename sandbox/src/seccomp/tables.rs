//! THE reviewed place: which syscalls each kind of thread of a `vireo run`
//! process may make, with the argument values that matter, and who needs
//! each one. Everything else kills the whole process (see
//! [`super::Policy`]).
//!
//! Reading guide. A thread's filter is [`COMMON`] plus its kind's table
//! ([`table`]). Threads are started by an unfiltered main thread before it
//! filters itself, or later (a virtio device the guest activates from a
//! vCPU, device threads restarted after a snapshot) by the launcher thread
//! ([`LAUNCHER_EXTRA`]); either way a new thread first runs under its
//! parent's filter (the kernel copies it into the child) until it installs
//! its own on top, so the launcher's filter is the union of the kinds it
//! starts ([`super::ThreadKind::launchable`]) plus thread creation.
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
// <linux/userfaultfd.h>, <linux/if_tun.h>) ----

const KVM_RUN: Ioctl = Ioctl(0xae80, "KVM_RUN");
const KVM_GET_REGS: Ioctl = Ioctl(0x8090_ae81, "KVM_GET_REGS");
const KVM_SET_REGS: Ioctl = Ioctl(0x4090_ae82, "KVM_SET_REGS");
const KVM_GET_SREGS: Ioctl = Ioctl(0x8138_ae83, "KVM_GET_SREGS");
const KVM_SET_SREGS: Ioctl = Ioctl(0x4138_ae84, "KVM_SET_SREGS");
const KVM_GET_MSRS: Ioctl = Ioctl(0xc008_ae88, "KVM_GET_MSRS");
const KVM_SET_MSRS: Ioctl = Ioctl(0x4008_ae89, "KVM_SET_MSRS");
const KVM_GET_FPU: Ioctl = Ioctl(0x81a0_ae8c, "KVM_GET_FPU");
const KVM_SET_FPU: Ioctl = Ioctl(0x41a0_ae8d, "KVM_SET_FPU");
const KVM_GET_LAPIC: Ioctl = Ioctl(0x8400_ae8e, "KVM_GET_LAPIC");
const KVM_SET_LAPIC: Ioctl = Ioctl(0x4400_ae8f, "KVM_SET_LAPIC");
const KVM_GET_MP_STATE: Ioctl = Ioctl(0x8004_ae98, "KVM_GET_MP_STATE");
const KVM_SET_MP_STATE: Ioctl = Ioctl(0x4004_ae99, "KVM_SET_MP_STATE");
const KVM_GET_VCPU_EVENTS: Ioctl = Ioctl(0x8040_ae9f, "KVM_GET_VCPU_EVENTS");
const KVM_SET_VCPU_EVENTS: Ioctl = Ioctl(0x4040_aea0, "KVM_SET_VCPU_EVENTS");
const KVM_GET_DEBUGREGS: Ioctl = Ioctl(0x8080_aea1, "KVM_GET_DEBUGREGS");
const KVM_SET_DEBUGREGS: Ioctl = Ioctl(0x4080_aea2, "KVM_SET_DEBUGREGS");
const KVM_GET_XSAVE: Ioctl = Ioctl(0x9000_aea4, "KVM_GET_XSAVE");
const KVM_SET_XSAVE: Ioctl = Ioctl(0x5000_aea5, "KVM_SET_XSAVE");
const KVM_GET_XCRS: Ioctl = Ioctl(0x8188_aea6, "KVM_GET_XCRS");
const KVM_SET_XCRS: Ioctl = Ioctl(0x4188_aea7, "KVM_SET_XCRS");
const KVM_KVMCLOCK_CTRL: Ioctl = Ioctl(0xaead, "KVM_KVMCLOCK_CTRL");
const KVM_GET_TSC_KHZ: Ioctl = Ioctl(0xaea3, "KVM_GET_TSC_KHZ");
const KVM_SET_TSC_KHZ: Ioctl = Ioctl(0xaea2, "KVM_SET_TSC_KHZ");
const KVM_IRQ_LINE: Ioctl = Ioctl(0x4008_ae61, "KVM_IRQ_LINE");
const KVM_IRQ_LINE_STATUS: Ioctl = Ioctl(0xc008_ae67, "KVM_IRQ_LINE_STATUS");
const KVM_SIGNAL_MSI: Ioctl = Ioctl(0x4020_aea5, "KVM_SIGNAL_MSI");
const KVM_IRQFD: Ioctl = Ioctl(0x4020_ae76, "KVM_IRQFD");
const KVM_IOEVENTFD: Ioctl = Ioctl(0x4040_ae79, "KVM_IOEVENTFD");
const KVM_SET_GSI_ROUTING: Ioctl = Ioctl(0x4008_ae6a, "KVM_SET_GSI_ROUTING");
const KVM_GET_DIRTY_LOG: Ioctl = Ioctl(0x4010_ae42, "KVM_GET_DIRTY_LOG");
const KVM_SET_USER_MEMORY_REGION: Ioctl = Ioctl(0x4020_ae46, "KVM_SET_USER_MEMORY_REGION");
const KVM_GET_IRQCHIP: Ioctl = Ioctl(0xc208_ae62, "KVM_GET_IRQCHIP");
const KVM_SET_IRQCHIP: Ioctl = Ioctl(0x8208_ae63, "KVM_SET_IRQCHIP");
const KVM_GET_PIT2: Ioctl = Ioctl(0x8070_ae9f, "KVM_GET_PIT2");
const KVM_SET_PIT2: Ioctl = Ioctl(0x4070_aea0, "KVM_SET_PIT2");
const KVM_GET_CLOCK: Ioctl = Ioctl(0x8030_ae7c, "KVM_GET_CLOCK");
const KVM_SET_CLOCK: Ioctl = Ioctl(0x4030_ae7b, "KVM_SET_CLOCK");
const KVM_CHECK_EXTENSION: Ioctl = Ioctl(0xae03, "KVM_CHECK_EXTENSION");

const TCGETS: Ioctl = Ioctl(0x5401, "TCGETS");
const TCSETS: Ioctl = Ioctl(0x5402, "TCSETS");
const TCSETSW: Ioctl = Ioctl(0x5403, "TCSETSW");
const TCSETSF: Ioctl = Ioctl(0x5404, "TCSETSF");
const FIONBIO: Ioctl = Ioctl(0x5421, "FIONBIO");
const FIOCLEX: Ioctl = Ioctl(0x5451, "FIOCLEX");
const FICLONE: Ioctl = Ioctl(0x4004_9409, "FICLONE");

const UFFDIO_API: Ioctl = Ioctl(0xc018_aa3f, "UFFDIO_API");
const UFFDIO_REGISTER: Ioctl = Ioctl(0xc020_aa00, "UFFDIO_REGISTER");
const UFFDIO_UNREGISTER: Ioctl = Ioctl(0x8010_aa01, "UFFDIO_UNREGISTER");
const UFFDIO_WAKE: Ioctl = Ioctl(0x8010_aa02, "UFFDIO_WAKE");
const UFFDIO_COPY: Ioctl = Ioctl(0xc028_aa03, "UFFDIO_COPY");
const UFFDIO_ZEROPAGE: Ioctl = Ioctl(0xc020_aa04, "UFFDIO_ZEROPAGE");

const TUNSETOFFLOAD: Ioctl = Ioctl(0x4004_54d0, "TUNSETOFFLOAD");
const TUNSETVNETHDRSZ: Ioctl = Ioctl(0x4004_54d8, "TUNSETVNETHDRSZ");

/// What a vCPU thread asks KVM for: run, and the state reads/writes an
/// exit needs (a triple fault's RIP, KVM_SET_* while a device restores).
/// Also what it does for devices: virtio activation on a vCPU registers
/// ioeventfds/irqfds; legacy devices (serial, i8042, RTC, ACPI) raise
/// lines; MSI-X writes signal MSIs.
const VCPU_KVM_IOCTLS: &[Ioctl] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_SIGNAL_MSI,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SET_GSI_ROUTING,
    KVM_CHECK_EXTENSION,
];

/// Device threads raise interrupts: an irqfd write mostly, but level lines
/// and MSIs go through the VM fd.
const DEVICE_KVM_IOCTLS: &[Ioctl] = &[
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_SIGNAL_MSI,
    KVM_SET_GSI_ROUTING,
];

/// The main thread after set-up: pause/capture/resume for snapshots and
/// migration (every vCPU and VM state ioctl), dirty logs, interrupts from
/// the power button, and the terminal (restored at exit).
const MAIN_IOCTLS: &[Ioctl] = &[
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
    KVM_KVMCLOCK_CTRL,
    KVM_GET_TSC_KHZ,
    KVM_SET_TSC_KHZ,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_SIGNAL_MSI,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SET_GSI_ROUTING,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_GET_CLOCK,
    KVM_SET_CLOCK,
    KVM_CHECK_EXTENSION,
    TCGETS,
    TCSETS,
    TCSETSW,
    TCSETSF,
    FIONBIO,
    FIOCLEX,
    FICLONE,
];

/// Post-copy's fault and link threads: read faults, fill pages, disarm.
const MIGRATION_IOCTLS: &[Ioctl] = &[
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_COPY,
    UFFDIO_ZEROPAGE,
    FIONBIO,
];

/// virtio-net: the offloads the driver negotiated, set on the TAP when the
/// device is activated or restored.
const NET_IOCTLS: &[Ioctl] = &[TUNSETOFFLOAD, TUNSETVNETHDRSZ, FIONBIO];

/// Every thread: the Rust runtime, the allocator, logging, thread exit.
pub const COMMON: &[Allow] = &[
    any(
        SYS_futex,
        "futex",
        "mutexes, condition variables, channels, thread joins",
    ),
    with(
        SYS_mmap,
        "mmap",
        Args::NoExec,
        "the allocator (never executable memory)",
    ),
    with(
        SYS_mprotect,
        "mprotect",
        Args::NoExec,
        "the allocator, stack guard pages (never executable)",
    ),
    any(
        SYS_munmap,
        "munmap",
        "the allocator; a thread's signal stack at its exit",
    ),
    any(SYS_mremap, "mremap", "the allocator growing a big buffer"),
    any(
        SYS_madvise,
        "madvise",
        "the allocator; glibc frees an exiting thread's stack with MADV_DONTNEED",
    ),
    any(SYS_brk, "brk", "the allocator"),
    any(
        SYS_write,
        "write",
        "logging to stderr; eventfd kicks (irqfd, ioeventfd emulation, worker stops)",
    ),
    any(
        SYS_close,
        "close",
        "dropping descriptors (eventfds, epoll sets, connections)",
    ),
    any(
        SYS_sigaltstack,
        "sigaltstack",
        "Rust's stack-overflow handler at thread start and exit",
    ),
    any(
        SYS_rt_sigprocmask,
        "rt_sigprocmask",
        "glibc at thread exit and in signal handling",
    ),
    any(
        SYS_rt_sigreturn,
        "rt_sigreturn",
        "return from the vCPU kick and stop-signal handlers",
    ),
    any(
        SYS_sched_getaffinity,
        "sched_getaffinity",
        "glibc's pthread_getattr_np at thread start",
    ),
    any(SYS_sched_yield, "sched_yield", "spin loops in locks"),
    any(SYS_gettid, "gettid", "std's thread ids, tracing"),
    any(SYS_getpid, "getpid", "glibc (raise, thread signalling)"),
    any(
        SYS_clock_gettime,
        "clock_gettime",
        "time (the vDSO handles most; a fallback)",
    ),
    any(SYS_clock_nanosleep, "clock_nanosleep", "std::thread::sleep"),
    any(SYS_nanosleep, "nanosleep", "std::thread::sleep"),
    any(
        SYS_getrandom,
        "getrandom",
        "HashMap keys (per thread), rustls, ring",
    ),
    any(SYS_exit, "exit", "a thread ends"),
    with(
        SYS_fcntl,
        "fcntl",
        Args::OneOf {
            arg: 1,
            values: &[F_GETFD as u64, F_GETFL as u64],
        },
        "std checks a descriptor is open before closing it (debug builds); flags",
    ),
];

/// A vCPU (KVM or emulator): run the guest, dispatch its exits to the
/// device models, and activate/reset virtio devices the driver sets up
/// (which builds the device thread's epoll set and eventfds on this
/// thread, then asks the launcher to start the thread).
pub const VCPU: &[Allow] = &[
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(VCPU_KVM_IOCTLS),
        "KVM_RUN and the exits' needs (see VCPU_KVM_IOCTLS)",
    ),
    any(
        SYS_read,
        "read",
        "eventfds (a worker's stop event before a restart)",
    ),
    any(
        SYS_eventfd2,
        "eventfd2",
        "a virtio device activated: its stop and notify events",
    ),
    any(
        SYS_epoll_create1,
        "epoll_create1",
        "a virtio device activated: its worker's epoll set",
    ),
    any(
        SYS_epoll_ctl,
        "epoll_ctl",
        "a virtio device activated: its fds into the epoll set",
    ),
    any(
        SYS_tgkill,
        "tgkill",
        "kicking another vCPU (INIT/SIPI, a device interrupt for the emulator)",
    ),
    with(
        SYS_fcntl,
        "fcntl",
        Args::OneOf {
            arg: 1,
            values: &[F_DUPFD_CLOEXEC as u64],
        },
        "a virtio device activated: EventFd::try_clone of its notify events",
    ),
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(NET_IOCTLS),
        "virtio-net activated: the negotiated offloads onto the TAP",
    ),
];

/// The emulator's vCPU, on top of [`VCPU`]: its translator keeps code in
/// a memfd mapped twice (read-write for the translator, read-execute for
/// the vCPU); made lazily on the first translated block.
pub const EMULATOR_VCPU_EXTRA: &[Allow] = &[
    any(SYS_memfd_create, "memfd_create", "the JIT's code arena"),
    any(SYS_ftruncate, "ftruncate", "sizing the JIT's code arena"),
    any(
        SYS_mmap,
        "mmap",
        "the JIT's read-execute view of its code arena (PROT_EXEC)",
    ),
];

/// Every virtio device thread: its epoll loop over queue notifications,
/// the stop event and its host fds.
pub const DEVICE_COMMON: &[Allow] = &[
    any(SYS_epoll_wait, "epoll_wait", "the worker loop"),
    any(
        SYS_epoll_pwait,
        "epoll_pwait",
        "the worker loop (glibc's epoll_wait)",
    ),
    any(
        SYS_epoll_ctl,
        "epoll_ctl",
        "watching/unwatching fds (vsock connections, TAP back-pressure)",
    ),
    any(SYS_read, "read", "queue-notify and stop eventfds"),
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(DEVICE_KVM_IOCTLS),
        "interrupts through the VM fd",
    ),
    any(
        SYS_tgkill,
        "tgkill",
        "kicking an emulator vCPU for an interrupt",
    ),
];

/// virtio-blk: raw and qcow2 images.
pub const BLOCK: &[Allow] = &[
    any(SYS_pread64, "pread64", "reads, qcow2 metadata"),
    any(SYS_pwrite64, "pwrite64", "writes, qcow2 metadata"),
    any(SYS_preadv, "preadv", "vectored reads"),
    any(SYS_pwritev, "pwritev", "vectored writes"),
    any(SYS_preadv2, "preadv2", "vectored reads"),
    any(SYS_pwritev2, "pwritev2", "vectored writes"),
    any(SYS_fdatasync, "fdatasync", "FLUSH"),
    any(SYS_fsync, "fsync", "FLUSH"),
    any(
        SYS_fallocate,
        "fallocate",
        "DISCARD (punch hole), WRITE_ZEROES, qcow2 cluster growth",
    ),
    any(SYS_ftruncate, "ftruncate", "qcow2 image growth"),
    any(SYS_lseek, "lseek", "image size"),
    any(SYS_fstat, "fstat", "image size"),
    any(SYS_newfstatat, "newfstatat", "image size (std's metadata)"),
    any(SYS_statx, "statx", "image size (std's metadata)"),
    any(SYS_clock_gettime, "clock_gettime", "bandwidth/IOPS limits"),
];

/// virtio-net: frames to and from the TAP.
pub const NET: &[Allow] = &[
    any(
        SYS_readv,
        "readv",
        "RX frames from the TAP into guest buffers",
    ),
    any(
        SYS_writev,
        "writev",
        "TX frames from guest buffers to the TAP",
    ),
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(NET_IOCTLS),
        "offloads on the TAP",
    ),
];

/// virtio-vsock: guest connections to host Unix sockets, host connections
/// in through the listening socket.
pub const VSOCK: &[Allow] = &[
    with(
        SYS_socket,
        "socket",
        Args::OneOf {
            arg: 0,
            values: &[AF_UNIX as u64],
        },
        "connecting to the host's Unix socket for a guest connection",
    ),
    any(
        SYS_connect,
        "connect",
        "a guest connection to the host's Unix socket",
    ),
    any(
        SYS_accept4,
        "accept4",
        "host connections to the VM's socket",
    ),
    any(SYS_recvfrom, "recvfrom", "connection data"),
    any(SYS_sendto, "sendto", "connection data"),
    any(SYS_recvmsg, "recvmsg", "connection data"),
    any(SYS_sendmsg, "sendmsg", "connection data"),
    any(SYS_readv, "readv", "connection data"),
    any(SYS_writev, "writev", "connection data"),
    any(SYS_shutdown, "shutdown", "a side of a connection closed"),
    any(SYS_fcntl, "fcntl", "non-blocking connections"),
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(&[FIONBIO]),
        "non-blocking connections",
    ),
    any(
        SYS_getsockopt,
        "getsockopt",
        "a connect's result (SO_ERROR)",
    ),
    any(SYS_setsockopt, "setsockopt", "socket buffers"),
];

/// virtio-balloon: give inflated pages back to the host.
pub const BALLOON: &[Allow] = &[any(
    SYS_fallocate,
    "fallocate",
    "punch holes in file-backed guest memory",
)];

/// virtio-rng: entropy from the host.
pub const RNG: &[Allow] = &[any(SYS_getrandom, "getrandom", "the guest's random bytes")];

/// virtio-console: output to stdout (write is common), input from the
/// stdin thread through memory.
pub const VIRTIO_CONSOLE: &[Allow] = &[any(SYS_writev, "writev", "hvc output")];

/// The control socket's thread: accept a connection, read one line, hand
/// it to the main thread, write the reply.
pub const CONTROL: &[Allow] = &[
    any(SYS_accept4, "accept4", "a client connects"),
    any(SYS_read, "read", "the command line"),
    any(SYS_recvfrom, "recvfrom", "the command line"),
    any(SYS_sendto, "sendto", "the reply"),
    any(
        SYS_fcntl,
        "fcntl",
        "try_clone (F_DUPFD_CLOEXEC) of the connection",
    ),
    any(
        SYS_setsockopt,
        "setsockopt",
        "the connection's read timeout",
    ),
];

/// Post-copy migration target threads: the fault reader (userfaultfd) and
/// the link to the source (TCP or Unix, maybe TLS).
pub const MIGRATION: &[Allow] = &[
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(MIGRATION_IOCTLS),
        "userfaultfd: fill pages, wake faulting threads, disarm",
    ),
    any(SYS_read, "read", "fault messages, the stream, eventfds"),
    any(
        SYS_poll,
        "poll",
        "waiting for a fault or the stream with a timeout",
    ),
    any(
        SYS_ppoll,
        "ppoll",
        "waiting for a fault or the stream with a timeout",
    ),
    any(SYS_recvfrom, "recvfrom", "the stream"),
    any(SYS_sendto, "sendto", "page requests"),
    any(SYS_readv, "readv", "the stream"),
    any(SYS_writev, "writev", "page requests"),
    any(SYS_setsockopt, "setsockopt", "read timeouts"),
    any(SYS_fcntl, "fcntl", "non-blocking mode"),
    any(SYS_shutdown, "shutdown", "ending the link"),
    any(SYS_madvise, "madvise", "pages already present"),
];

/// stdin pump and stop-signal watcher.
pub const CONSOLE: &[Allow] = &[any(SYS_read, "read", "stdin, the stop-signal eventfd")];

/// The main thread once the VM runs: wait, carry out control-socket
/// commands (pause, snapshot: write files; migrate-to: connect and send),
/// stop the VM and exit. Restoring happens before this filter.
pub const MAIN: &[Allow] = &[
    with(
        SYS_ioctl,
        "ioctl",
        Args::Ioctl(MAIN_IOCTLS),
        "vCPU/VM state for snapshots and migration, dirty logs, the terminal",
    ),
    any(
        SYS_tgkill,
        "tgkill",
        "kicking vCPUs out of the guest to pause",
    ),
    any(
        SYS_read,
        "read",
        "eventfds, migration replies, snapshot parents",
    ),
    any(
        SYS_pread64,
        "pread64",
        "a diff snapshot's parent, disk copies",
    ),
    any(SYS_pwrite64, "pwrite64", "the snapshot's memory file"),
    any(SYS_writev, "writev", "snapshot files, the migration stream"),
    any(SYS_pwritev, "pwritev", "the snapshot's memory file"),
    with(
        SYS_openat,
        "openat",
        Args::Any,
        "snapshot files (state, memory, disk copies), the migration CA",
    ),
    any(SYS_mkdir, "mkdir", "the snapshot directory"),
    any(SYS_mkdirat, "mkdirat", "the snapshot directory"),
    any(
        SYS_rename,
        "rename",
        "snapshot files written whole, then renamed",
    ),
    any(
        SYS_renameat,
        "renameat",
        "snapshot files written whole, then renamed",
    ),
    any(
        SYS_renameat2,
        "renameat2",
        "snapshot files written whole, then renamed",
    ),
    any(
        SYS_unlink,
        "unlink",
        "the control socket's file at exit, a failed snapshot's files",
    ),
    any(SYS_unlinkat, "unlinkat", "a failed snapshot's files"),
    any(
        SYS_newfstatat,
        "newfstatat",
        "std's metadata (snapshot paths, disk copies)",
    ),
    any(
        SYS_readlink,
        "readlink",
        "canonicalizing a snapshot's directory (realpath)",
    ),
    any(SYS_uname, "uname", "glibc asking for the kernel version"),
    any(SYS_statx, "statx", "std's metadata"),
    any(SYS_fstat, "fstat", "std's metadata"),
    any(SYS_lseek, "lseek", "disk copies"),
    any(SYS_ftruncate, "ftruncate", "the memory file's size"),
    any(SYS_fallocate, "fallocate", "sparse disk copies"),
    any(
        SYS_fsync,
        "fsync",
        "snapshot files on disk before the reply",
    ),
    any(
        SYS_fdatasync,
        "fdatasync",
        "snapshot files on disk before the reply",
    ),
    any(
        SYS_copy_file_range,
        "copy_file_range",
        "disk copies (std::fs::copy)",
    ),
    any(
        SYS_sendfile,
        "sendfile",
        "disk copies (std::fs::copy's fallback)",
    ),
    any(
        SYS_getdents64,
        "getdents64",
        "listing the snapshot directory",
    ),
    any(SYS_fcntl, "fcntl", "descriptor flags"),
    with(
        SYS_socket,
        "socket",
        Args::OneOf {
            arg: 0,
            values: &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64],
        },
        "migrate-to: the connection to the target",
    ),
    any(SYS_connect, "connect", "migrate-to"),
    any(
        SYS_setsockopt,
        "setsockopt",
        "migrate-to: TCP_NODELAY, timeouts",
    ),
    any(
        SYS_getsockopt,
        "getsockopt",
        "migrate-to: a connect's result",
    ),
    any(SYS_getsockname, "getsockname", "migrate-to"),
    any(SYS_getpeername, "getpeername", "migrate-to"),
    any(SYS_recvfrom, "recvfrom", "migrate-to: the target's replies"),
    any(SYS_sendto, "sendto", "migrate-to: the stream"),
    any(SYS_recvmsg, "recvmsg", "migrate-to"),
    any(SYS_sendmsg, "sendmsg", "migrate-to"),
    any(
        SYS_shutdown,
        "shutdown",
        "migrate-to: the end of the stream",
    ),
    any(SYS_poll, "poll", "migrate-to: connect with a timeout"),
    any(SYS_ppoll, "ppoll", "migrate-to"),
    any(
        SYS_eventfd2,
        "eventfd2",
        "device threads restarted after a snapshot",
    ),
    any(
        SYS_epoll_ctl,
        "epoll_ctl",
        "device threads restarted after a snapshot",
    ),
    any(SYS_exit_group, "exit_group", "the process ends"),
    any(SYS_sigaltstack, "sigaltstack", "process exit"),
];

/// The launcher (on top of the union of the kinds it starts): create a
/// thread of this process and set it up as std does before the thread's
/// own code installs its filter.
pub const LAUNCHER_EXTRA: &[Allow] = &[
    with(SYS_clone, "clone", Args::ThreadOnly, "pthread_create (older glibc): threads only, never a process"),
    any(SYS_clone3, "clone3", "pthread_create (glibc 2.34+); its flags are in memory a filter cannot read, so this thread runs nothing else"),
    any(SYS_set_robust_list, "set_robust_list", "a new thread's start (glibc)"),
    any(SYS_rseq, "rseq", "a new thread's start (glibc)"),
    with(SYS_prctl, "prctl", Args::OneOf { arg: 0, values: &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64] }, "naming a new thread; no_new_privs before its filter"),
    with(SYS_seccomp, "seccomp", Args::OneOf { arg: 0, values: &[SECCOMP_SET_MODE_FILTER as u64] }, "a new thread installs its own filter (filters only ever narrow)"),
];
