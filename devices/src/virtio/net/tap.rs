//! A Linux TAP interface opened through /dev/net/tun, in the mode virtio-net
//! wants: Ethernet frames (IFF_TAP), no packet-info prefix (IFF_NO_PI), and
//! a 12-byte virtio_net_hdr_v1 in front of each frame (IFF_VNET_HDR), so
//! checksum and segmentation offloads pass between the guest and the host
//! stack untouched.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use vireo_api::devices::net::valid_tap_name;

/// Size of the header in front of every frame read or written
/// (virtio_net_hdr_v1: the legacy header plus num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// The offloads the TAP may use for frames it hands us (TUNSETOFFLOAD).
pub mod offload {
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    pub const UFO: u32 = libc::TUN_F_UFO;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is not valid: use 1 to 15 characters without '/', ':' or whitespace")]
    BadName(String),
    #[error("cannot open /dev/net/tun for TAP {name}: {source}; {hint}")]
    OpenTun {
        name: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot attach to TAP {name}: {source}; {hint}")]
    Attach {
        name: String,
        source: io::Error,
        hint: String,
    },
    #[error("TAP {name}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// The `struct ifreq` fields TUNSETIFF and SIOC[GS]IFFLAGS use: the name
/// and the flags in the union (40 bytes in all on 64-bit Linux).
#[repr(C)]
#[derive(Default)]
pub(crate) struct IfReqFlags {
    pub name: [u8; libc::IFNAMSIZ],
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    pub(crate) fn new(name: &str) -> IfReqFlags {
        let mut r = IfReqFlags::default();
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
}

/// An open TAP queue, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// A stand-in over a socket ([`Tap::stand_in`]): no TAP ioctls.
    stand_in: bool,
}

impl Tap {
    /// Attach to TAP `name`, creating it if it does not exist (creating
    /// needs CAP_NET_ADMIN; attaching to a TAP created with `user $USER`
    /// does not).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_tap_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        // SAFETY: a NUL-terminated path; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    "load the tun module (`modprobe tun`)"
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    "make /dev/net/tun readable and writable for your user (mode 0666 is the usual setting)"
                }
                _ => "check that /dev/net/tun is the TUN/TAP character device",
            };
            return Err(TapError::OpenTun {
                name: name.to_string(),
                source,
                hint,
            });
        }
        // SAFETY: fd is a freshly opened descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut ifr = IfReqFlags::new(name);
        ifr.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which ifr is (with
        // room for the whole union).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if r < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "needs CAP_NET_ADMIN or a TAP owned by your user \
                     (`sudo ip tuntap add {name} mode tap user $USER`)"
                ),
                Some(libc::EBUSY) => {
                    format!("{name} is in use by another process (one reader per TAP queue)")
                }
                Some(libc::EINVAL) => format!(
                    "{name} exists but is not a plain TAP (a TUN, or created with multi_queue); \
                     delete it (`sudo ip link del {name}`) or choose another name"
                ),
                _ => "check `ip link show` for the interface".to_string(),
            };
            return Err(TapError::Attach {
                name: name.to_string(),
                source,
                hint,
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            stand_in: false,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if r < 0 {
            return Err(tap.ioctl_error("setting the virtio header size (TUNSETVNETHDRSZ)"));
        }
        // Nothing offloaded until the driver says what it accepts.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A TAP stand-in over one end of a datagram socketpair (frames keep
    /// their boundaries, header first, as on a TAP), for the fuzz targets:
    /// the device's receive and transmit paths run unchanged without
    /// CAP_NET_ADMIN; setting offloads does nothing.
    #[doc(hidden)]
    pub fn stand_in(fd: std::os::fd::OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
            name: "stand-in".to_string(),
            stand_in: true,
        }
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Which offloads ([`offload`]) frames from the TAP may carry.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        if self.stand_in {
            return Ok(());
        }
        // TUNSETOFFLOAD takes the flags as the ioctl argument itself.
        // SAFETY: an integer argument; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(self.ioctl_error("setting offloads (TUNSETOFFLOAD)"));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame (header first) into `iov`; returns the frame's full
    /// length, which is larger than `iov` holds when the frame was cut.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller's iovecs point at memory it may write (guest
        // RAM mapped for the device's lifetime, or a local buffer).
        let r = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Write one frame (header first) gathered from `iov`.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller's iovecs point at readable memory.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a/b", "tap 0", "0123456789abcdef", "..", "a:b"] {
            let e = Tap::open(bad).unwrap_err();
            assert!(matches!(e, TapError::BadName(_)), "{bad}: {e}");
        }
    }
}
