//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! and the capability that enables them. Messages go out through
//! [`MsiSender`] (the hypervisor's MSI injection).

use std::sync::Arc;

pub const CAPABILITY_ID: u8 = 0x11;
/// The capability is 12 bytes: id, next, message control, table, PBA.
pub const CAPABILITY_LEN: usize = 12;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;
/// Most vectors a table may have (the spec's limit is 2048).
pub const MAX_VECTORS: u16 = 2048;

/// Sends one MSI message (address, data) to the guest.
pub trait MsiSender: Send + Sync {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error(
        "saved MSI-X table has {vectors} vectors ({pending} pending bits), this device {here}"
    )]
    SavedSize {
        vectors: usize,
        pending: usize,
        here: usize,
    },
}

/// What [`Msix::save`] captures: each entry as (address, data, control).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<[u64; 3]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// The table, the pending bits and the enable/mask state from the
/// capability.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    sender: Arc<dyn MsiSender>,
}

impl Msix {
    /// A table of `vectors` entries, all masked, as after reset.
    pub fn new(vectors: u16, sender: Arc<dyn MsiSender>) -> Msix {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Entry::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            sender,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of the table in the BAR.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the pending-bit array (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability bytes for a table at `table_offset` and a PBA at
    /// `pba_offset` of BAR `bar`, and its write mask (message control's
    /// enable and function-mask bits).
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; CAPABILITY_LEN], [u8; CAPABILITY_LEN]) {
        let mut cap = [0u8; CAPABILITY_LEN];
        cap[0] = CAPABILITY_ID;
        cap[2..4].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut mask = [0u8; CAPABILITY_LEN];
        mask[3] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (cap, mask)
    }

    /// Take the message control word as the guest left it in
    /// configuration space; delivers messages an unmask released.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && self.entries[v].control & VECTOR_MASKED == 0 {
                self.pending[v] = false;
                self.send(v);
            }
        }
    }

    fn send(&self, v: usize) {
        let e = self.entries[v];
        if let Err(err) = self.sender.send_msi(e.address, e.data) {
            tracing::warn!("MSI-X vector {v}: cannot deliver: {err}");
        }
    }

    /// Raise `vector`: send it, or set its pending bit while masked.
    /// Vectors beyond the table are ignored (the driver chose them).
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            tracing::debug!("MSI-X vector {vector} does not exist; interrupt dropped");
            return;
        }
        if !self.enabled {
            return;
        }
        if self.function_masked || self.entries[v].control & VECTOR_MASKED != 0 {
            self.pending[v] = true;
        } else {
            self.send(v);
        }
    }

    /// A read of the table at `offset` (dword or qword accesses).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || offset % 4 != 0 {
            return;
        }
        let Some(e) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let fields = [
            e.address as u32,
            (e.address >> 32) as u32,
            e.data,
            e.control,
        ];
        let f = ((offset % ENTRY_SIZE) / 4) as usize;
        data[..4].copy_from_slice(&fields[f].to_le_bytes());
        if data.len() == 8 {
            if let Some(next) = fields.get(f + 1) {
                data[4..].copy_from_slice(&next.to_le_bytes());
            }
        }
    }

    /// A write of the table (dword or qword accesses).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % 4 != 0 {
            tracing::debug!(
                "MSI-X table: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let idx = (offset / ENTRY_SIZE) as usize;
        if idx >= self.entries.len() {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let f = ((offset % ENTRY_SIZE) / 4) as usize + k;
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[idx];
            match f {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                1 => e.address = (e.address & 0xffff_ffff) | u64::from(v) << 32,
                2 => e.data = v,
                3 => e.control = v & VECTOR_MASKED,
                _ => {}
            }
        }
        self.deliver_pending();
    }

    /// A read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let base = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(base + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// The table, pending bits and enable/mask flags, for a snapshot.
    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.address, u64::from(e.data), u64::from(e.control)])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Load a saved table of the same size; sends nothing (the guest sees
    /// pending messages once it unmasks, as before the snapshot).
    pub fn restore(&mut self, s: &MsixState) -> Result<(), MsixError> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(MsixError::SavedSize {
                vectors: s.entries.len(),
                pending: s.pending.len(),
                here: self.entries.len(),
            });
        }
        for (e, [address, data, control]) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                address: *address,
                data: *data as u32,
                control: *control as u32 & VECTOR_MASKED,
            };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(())
    }

    /// Mask every vector and clear pending bits (function reset).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Entry::default()
            };
        }
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl MsiSender for Recorder {
        fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let rec = Arc::new(Recorder::default());
        let mut m = Msix::new(3, rec.clone());
        m.trigger(0);
        assert!(rec.0.lock().unwrap().is_empty(), "disabled: nothing sent");
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 1, 0xfee0_0000, 0x41);
        m.trigger(1);
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
        m.trigger(1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        // Per-vector mask.
        m.write_table(16 + 12, &1u32.to_le_bytes());
        m.trigger(1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.0.lock().unwrap().len(), 3);
        // Out-of-range vectors and odd accesses are ignored.
        m.trigger(100);
        m.write_table(3 * 16, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        m.read_table(16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    }

    #[test]
    fn capability_encodes_size_and_offsets() {
        let m = Msix::new(5, Arc::new(Recorder::default()));
        let (cap, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(cap[0], CAPABILITY_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 4);
        assert_eq!(u32::from_le_bytes([cap[4], cap[5], cap[6], cap[7]]), 0x4000);
        assert_eq!(mask[3], 0xc0);
        assert_eq!(m.table_len(), 80);
        assert_eq!(m.pba_len(), 8);
    }
}
