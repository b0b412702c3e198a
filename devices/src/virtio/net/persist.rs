//! The net device's part of the device lifecycle.
//!
//! A frame read from the TAP but not yet delivered (waiting for receive
//! buffers) is not saved: a restored device drops it, like a lost packet.
//! Transmit chains are re-read from the avail ring, so a frame the guest
//! queued may be sent twice — both are normal on a network.

use serde::{Deserialize, Serialize};
use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};

use super::Net;
use crate::virtio::VirtioDevice;
use vireo_api::devices::mac::MacError;
use vireo_api::devices::net::Mac;

/// What a snapshot keeps of a net device: the MAC its driver read at
/// probe time (the TAP is reopened by name, the queues are the
/// transport's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPersistState {
    pub mac: [u8; 6],
}

/// Why a saved net state does not fit.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    #[error("saved MAC: {0}")]
    Mac(#[source] MacError),
}

impl Pausable for Net {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

impl Snapshottable for Net {
    type State = NetPersistState;
    type Error = NetStateError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<NetPersistState, NetStateError> {
        Ok(NetPersistState {
            mac: self.config.mac.bytes(),
        })
    }

    fn restore(&mut self, saved: NetPersistState) -> Result<(), NetStateError> {
        // Keep the MAC the guest driver read (a random MAC would otherwise
        // change across the restore).
        self.config.mac = Mac::new(saved.mac).map_err(NetStateError::Mac)?;
        Ok(())
    }
}
