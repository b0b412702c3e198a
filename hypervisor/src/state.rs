//! Saved state of a vCPU and of the VM's platform (interrupt controllers,
//! timer, clock), for snapshots and migration.
//!
//! The structures are backend-neutral: KVM and the emulator both convert
//! their own state to and from them, so the snapshot format above this
//! crate never sees a KVM structure. Their shapes follow the x86
//! architecture (XSAVE layout, LAPIC register page) and the classic PC
//! chips (8259 PIC, IOAPIC, 8254 PIT), which both backends model.

use serde::{Deserialize, Serialize};

use crate::{LapicState, MsrEntry, Regs, SpecialRegs};

/// The x87/SSE state in FXSAVE form (what every x86-64 CPU has).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuFull {
    /// ST0-ST7 / MM0-MM7, 80 bits each in 16 bytes.
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// Exceptions, interrupts and NMIs a vCPU has pending or half-delivered,
/// and its interrupt shadow (KVM's `kvm_vcpu_events`, field for field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    pub exception_injected: bool,
    pub exception_nr: u8,
    pub exception_has_error_code: bool,
    pub exception_pending: bool,
    pub exception_error_code: u32,
    pub exception_has_payload: bool,
    pub exception_payload: u64,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub interrupt_soft: bool,
    /// STI / MOV SS shadow bits.
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    pub nmi_masked: bool,
    pub sipi_vector: u32,
    /// KVM_VCPUEVENT_VALID_* bits saying which of the above are meaningful.
    pub flags: u32,
    pub smi_smm: bool,
    pub smi_pending: bool,
    pub smi_inside_nmi: bool,
    pub smi_latched_init: u8,
    pub triple_fault_pending: bool,
}

/// The debug registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// Multiprocessor state (the values of KVM_MP_STATE_*).
pub mod mp_state {
    pub const RUNNABLE: u32 = 0;
    pub const UNINITIALIZED: u32 = 1;
    pub const INIT_RECEIVED: u32 = 2;
    pub const HALTED: u32 = 3;
    pub const SIPI_RECEIVED: u32 = 4;
}

/// Everything a vCPU needs to continue where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub regs: Regs,
    pub sregs: SpecialRegs,
    /// Pending external interrupts not yet injected (256 bits).
    pub interrupt_bitmap: [u64; 4],
    pub fpu: FpuFull,
    /// The XSAVE area (KVM_GET_XSAVE, 4 KiB) when the backend has one; it
    /// supersedes `fpu` on restore.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (XCR0...): (index, value).
    pub xcrs: Vec<(u32, u64)>,
    pub debug_regs: DebugRegs,
    /// Every MSR the backend could read, TSC included.
    pub msrs: Vec<MsrEntry>,
    pub lapic: LapicState,
    pub events: VcpuEvents,
    /// One of [`mp_state`].
    pub mp_state: u32,
    /// The guest TSC frequency, when the backend reports it.
    pub tsc_khz: Option<u32>,
}

/// One 8259A (the PIC pair is master, slave), as KVM's `kvm_pic_state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
    /// ICW1 SNGL (no cascade); KVM does not keep it.
    #[serde(default)]
    pub single: u8,
}

/// The IOAPIC: its registers and 24 redirection entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    pub redirtbl: Vec<u64>,
}

/// One 8254 channel, as KVM's `kvm_pit_channel_state` (the load time is
/// not kept: a restored counter starts counting at restore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    pub flags: u32,
}

/// The VM-wide state below the vCPUs: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformState {
    pub pic: [PicState; 2],
    pub ioapic: IoapicState,
    pub pit: PitState,
    /// The paravirtual clock (kvmclock) in nanoseconds, when there is one.
    pub clock_ns: Option<u64>,
}

/// Serde for fixed byte arrays longer than serde's built-in 32.
pub(crate) mod byte_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let v: Vec<u8> = Vec::deserialize(d)?;
        let len = v.len();
        v.try_into()
            .map_err(|_| serde::de::Error::invalid_length(len, &"a fixed-size byte array"))
    }
}
