//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and the checks every
//! packet the guest sends must pass before the device acts on it.

/// The host's well-known CID; the guest reaches us there.
pub const HOST_CID: u64 = 2;
/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_LEN: usize = 44;
/// The largest payload the device accepts in, or puts in, one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// `type`: the only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// A decoded packet header. All fields are little endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le_u32(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u16(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a packet from the guest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the chain holds {0} readable bytes, less than the {HDR_LEN}-byte header")]
    ShortHeader(usize),
    #[error("src_cid {got} is not the guest's cid {want}")]
    WrongSrcCid { got: u64, want: u64 },
    #[error("dst_cid {0} is not the host (2)")]
    WrongDstCid(u64),
    #[error("len {len} exceeds the {avail} payload bytes in the chain")]
    LenBeyondChain { len: u32, avail: usize },
    #[error("len {0} exceeds the largest packet payload ({MAX_PKT_PAYLOAD})")]
    TooLong(u32),
    #[error("socket type {0} is not STREAM (1)")]
    WrongType(u16),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("op {op} carries {len} payload bytes; only RW may")]
    PayloadOnControl { op: u16, len: u32 },
}

impl PacketError {
    /// Whether the sender's addressing can be trusted enough to answer the
    /// packet with an RST; otherwise the packet is just dropped.
    pub fn answer_with_rst(&self) -> bool {
        !matches!(
            self,
            PacketError::ShortHeader(_)
                | PacketError::WrongSrcCid { .. }
                | PacketError::WrongDstCid(_)
        )
    }
}

/// Check a header the guest put on the tx queue. `payload_avail` is how
/// many readable bytes follow the header in the chain.
pub fn validate_tx(h: &Header, guest_cid: u64, payload_avail: usize) -> Result<(), PacketError> {
    if h.src_cid != guest_cid {
        return Err(PacketError::WrongSrcCid {
            got: h.src_cid,
            want: guest_cid,
        });
    }
    if h.dst_cid != HOST_CID {
        return Err(PacketError::WrongDstCid(h.dst_cid));
    }
    if h.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::TooLong(h.len));
    }
    if h.len as usize > payload_avail {
        return Err(PacketError::LenBeyondChain {
            len: h.len,
            avail: payload_avail,
        });
    }
    if h.type_ != TYPE_STREAM {
        return Err(PacketError::WrongType(h.type_));
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
        return Err(PacketError::UnknownOp(h.op));
    }
    if h.op != op::RW && h.len != 0 {
        return Err(PacketError::PayloadOnControl {
            op: h.op,
            len: h.len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 22,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 7,
            flags: 3,
            buf_alloc: 0x1122_3344,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[16], 0xdd);
        assert_eq!(b[30], 7);
        assert_eq!(b[36], 0x44);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn validation_names_each_fault() {
        assert_eq!(validate_tx(&good(), 3, 10), Ok(()));
        let e = validate_tx(&good(), 4, 10).unwrap_err();
        assert!(matches!(e, PacketError::WrongSrcCid { got: 3, want: 4 }));
        assert!(!e.answer_with_rst());
        let h = Header {
            dst_cid: 7,
            ..good()
        };
        assert_eq!(validate_tx(&h, 3, 10), Err(PacketError::WrongDstCid(7)));
        assert_eq!(
            validate_tx(&good(), 3, 9),
            Err(PacketError::LenBeyondChain { len: 10, avail: 9 })
        );
        let h = Header {
            len: MAX_PKT_PAYLOAD as u32 + 1,
            ..good()
        };
        assert!(matches!(
            validate_tx(&h, 3, usize::MAX),
            Err(PacketError::TooLong(_))
        ));
        let h = Header { type_: 2, ..good() };
        let e = validate_tx(&h, 3, 10).unwrap_err();
        assert_eq!(e, PacketError::WrongType(2));
        assert!(e.answer_with_rst());
        for bad in [0u16, 8, 0xffff] {
            let h = Header {
                op: bad,
                len: 0,
                ..good()
            };
            assert_eq!(validate_tx(&h, 3, 0), Err(PacketError::UnknownOp(bad)));
        }
        let h = Header {
            op: op::REQUEST,
            ..good()
        };
        assert!(matches!(
            validate_tx(&h, 3, 10),
            Err(PacketError::PayloadOnControl { .. })
        ));
    }
}
