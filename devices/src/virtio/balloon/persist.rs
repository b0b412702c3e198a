//! The balloon's part of the device lifecycle: its host-side state
//! ([`BalloonState`]: target, counters, last statistics) is what a
//! snapshot saves; the queues are the transport's.

use vireo_vmcore::snapshot::device::{Pausable, Snapshottable};

use super::{Balloon, BalloonState};
use crate::virtio::VirtioDevice;

impl Pausable for Balloon {
    fn pause(&mut self) {
        crate::virtio::worker::pause(&mut self.worker);
    }

    fn resume(&mut self) {
        let name = self.name();
        crate::virtio::worker::resume(&mut self.worker, &name);
    }
}

impl Snapshottable for Balloon {
    type State = BalloonState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> Result<BalloonState, Self::Error> {
        Ok(self.shared.state().clone())
    }

    fn restore(&mut self, saved: BalloonState) -> Result<(), Self::Error> {
        *self.shared.state() = saved;
        Ok(())
    }
}
