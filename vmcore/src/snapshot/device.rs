//! The device lifecycle seam: how every device of a machine — legacy,
//! PCI host, virtio transport, virtio device — holds still and saves its
//! state for a snapshot or a migration.
//!
//! A device implements two traits:
//! - [`Pausable`]: stop its own activity (a device thread) without losing
//!   anything, and carry on; a device with no thread keeps the defaults;
//! - [`Snapshottable`]: its state as a typed, versioned serde struct of
//!   its own ([`Snapshottable::State`], [`Snapshottable::STATE_VERSION`]),
//!   saved while paused and loaded into a freshly built device of the
//!   same kind.
//!
//! Both together make it [`Migratable`] (blanket implementations, nothing
//! to write): the object-safe face the machine keeps in its one ordered
//! [`DeviceList`]. Only that erased layer sees the encoded form
//! ([`SavedState`]); a device writes and reads its own struct.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use vireo_vmcore::snapshot::device::{DeviceList, Pausable, Snapshottable};
//! use std::sync::{Arc, Mutex};
//!
//! /// A scratch register: its one byte of state.
//! #[derive(Default)]
//! struct Scratch(u8);
//!
//! #[derive(Serialize, Deserialize)]
//! struct ScratchState {
//!     value: u8,
//! }
//!
//! impl Pausable for Scratch {}
//!
//! impl Snapshottable for Scratch {
//!     type State = ScratchState;
//!     type Error = std::convert::Infallible;
//!     const STATE_VERSION: u32 = 1;
//!     fn save(&self) -> Result<ScratchState, Self::Error> {
//!         Ok(ScratchState { value: self.0 })
//!     }
//!     fn restore(&mut self, state: ScratchState) -> Result<(), Self::Error> {
//!         self.0 = state.value;
//!         Ok(())
//!     }
//! }
//!
//! let mut a = DeviceList::default();
//! a.push("scratch", Arc::new(Mutex::new(Scratch(7))));
//! let saved = a.save().unwrap();
//! let b_dev = Arc::new(Mutex::new(Scratch::default()));
//! let mut b = DeviceList::default();
//! b.push("scratch", b_dev.clone());
//! b.restore(&saved).unwrap();
//! assert_eq!(b_dev.lock().unwrap().0, 7);
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Stopping a device's own activity around a snapshot.
pub trait Pausable {
    /// Quiesce: stop any device thread without losing anything and make
    /// what the device wrote durable (a disk flushes). Afterwards nothing
    /// touches guest memory or the device's queues until
    /// [`Pausable::resume`]. Pausing a paused device does nothing.
    fn pause(&mut self) {}
    /// Carry on after [`Pausable::pause`] (a failure to restart is the
    /// device's to log: the guest sees a device that stopped answering).
    fn resume(&mut self) {}
}

/// A device whose state a snapshot saves, as a typed struct.
pub trait Snapshottable {
    /// The device's own state (beyond what its options give and, for a
    /// virtio device, beyond its queues, which are the transport's).
    type State: Serialize + DeserializeOwned;
    /// Why a state does not fit this device.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Bumped whenever [`Snapshottable::State`] changes incompatibly; a
    /// state of another version is refused by number.
    const STATE_VERSION: u32;
    /// The state, taken while paused (or never started).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Load a saved state into a freshly built device of the same kind
    /// and options, before the VM runs.
    fn restore(&mut self, state: Self::State) -> Result<(), Self::Error>;
}

/// A device's state as stored: its version and its encoded struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub state: serde_json::Value,
}

/// Why a device's state cannot be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("saved state version {found}, this vireo reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("cannot encode the state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("saved state does not fit: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("{0}")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The object-safe face of [`Snapshottable`]: what a container of devices
/// of any kind (the machine, the virtio transport) calls. Implemented for
/// every [`Snapshottable`]; never implement it by hand.
pub trait DynSnapshottable {
    fn save_dyn(&self) -> Result<SavedState, DeviceStateError>;
    fn restore_dyn(&mut self, saved: SavedState) -> Result<(), DeviceStateError>;
}

impl<T: Snapshottable> DynSnapshottable for T {
    fn save_dyn(&self) -> Result<SavedState, DeviceStateError> {
        let state = self
            .save()
            .map_err(|e| DeviceStateError::Device(Box::new(e)))?;
        Ok(SavedState {
            version: T::STATE_VERSION,
            state: serde_json::to_value(state).map_err(DeviceStateError::Encode)?,
        })
    }

    fn restore_dyn(&mut self, saved: SavedState) -> Result<(), DeviceStateError> {
        if saved.version != T::STATE_VERSION {
            return Err(DeviceStateError::Version {
                found: saved.version,
                expected: T::STATE_VERSION,
            });
        }
        let state: T::State =
            serde_json::from_value(saved.state).map_err(DeviceStateError::Decode)?;
        self.restore(state)
            .map_err(|e| DeviceStateError::Device(Box::new(e)))
    }
}

/// A device that takes part in snapshots and migration: [`Pausable`] and
/// [`Snapshottable`]. Implemented for every such device.
pub trait Migratable: Pausable + DynSnapshottable + Send {}

impl<T: Pausable + DynSnapshottable + Send> Migratable for T {}

pub type SharedMigratable = Arc<Mutex<dyn Migratable>>;

/// Why a machine's devices cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceListError {
    #[error("device {id}: {source}")]
    Device {
        id: String,
        #[source]
        source: DeviceStateError,
    },
    #[error("the snapshot holds devices {saved:?}, this machine has {built:?}")]
    Mismatch {
        saved: Vec<String>,
        built: Vec<String>,
    },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A machine's devices, each under a stable id, in machine order: what a
/// snapshot pauses, saves and restores, in that order.
#[derive(Clone, Default)]
pub struct DeviceList(Vec<(String, SharedMigratable)>);

impl DeviceList {
    /// Add a device, saved under `id` (unique in the machine).
    pub fn push(&mut self, id: impl Into<String>, device: SharedMigratable) {
        self.0.push((id.into(), device));
    }

    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Pause every device, in machine order, until the guard is dropped
    /// (then each resumes, in reverse order): while it lives no device
    /// touches guest memory, its queues or its disk.
    pub fn quiesce(&self) -> Quiesced<'_> {
        for (_, d) in &self.0 {
            lock(d).pause();
        }
        Quiesced(self)
    }

    /// Every device's state, by id, in machine order. The devices must be
    /// paused ([`DeviceList::quiesce`]).
    pub fn save(&self) -> Result<Vec<(String, SavedState)>, DeviceListError> {
        self.0
            .iter()
            .map(|(id, d)| {
                lock(d)
                    .save_dyn()
                    .map(|s| (id.clone(), s))
                    .map_err(|source| DeviceListError::Device {
                        id: id.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Load each saved state into the device of the same id; the machine
    /// must have exactly the saved devices, in the same order.
    pub fn restore(&self, saved: &[(String, SavedState)]) -> Result<(), DeviceListError> {
        let built = self.ids();
        if built.len() != saved.len() || built.iter().zip(saved).any(|(a, (b, _))| a != b) {
            return Err(DeviceListError::Mismatch {
                saved: saved.iter().map(|(id, _)| id.clone()).collect(),
                built,
            });
        }
        for ((id, d), (_, state)) in self.0.iter().zip(saved) {
            lock(d)
                .restore_dyn(state.clone())
                .map_err(|source| DeviceListError::Device {
                    id: id.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// Devices held still by [`DeviceList::quiesce`]; they carry on when this
/// is dropped.
pub struct Quiesced<'a>(&'a DeviceList);

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for (_, d) in self.0 .0.iter().rev() {
            lock(d).resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts pauses and resumes; its state is one number.
    #[derive(Default)]
    struct Probe {
        value: u32,
        paused: bool,
        events: Arc<Mutex<Vec<String>>>,
        name: &'static str,
    }

    impl Pausable for Probe {
        fn pause(&mut self) {
            self.paused = true;
            lock(&self.events).push(format!("pause {}", self.name));
        }
        fn resume(&mut self) {
            self.paused = false;
            lock(&self.events).push(format!("resume {}", self.name));
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("value {0} is too large")]
    struct TooLarge(u32);

    impl Snapshottable for Probe {
        type State = u32;
        type Error = TooLarge;
        const STATE_VERSION: u32 = 3;
        fn save(&self) -> Result<u32, TooLarge> {
            Ok(self.value)
        }
        fn restore(&mut self, state: u32) -> Result<(), TooLarge> {
            if state > 100 {
                return Err(TooLarge(state));
            }
            self.value = state;
            Ok(())
        }
    }

    fn list(names: &[&'static str], events: &Arc<Mutex<Vec<String>>>) -> DeviceList {
        let mut l = DeviceList::default();
        for (i, name) in names.iter().enumerate() {
            l.push(
                *name,
                Arc::new(Mutex::new(Probe {
                    value: i as u32 + 1,
                    name,
                    events: events.clone(),
                    ..Probe::default()
                })),
            );
        }
        l
    }

    #[test]
    fn quiesce_pauses_in_order_and_resumes_in_reverse() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let l = list(&["a", "b"], &events);
        drop(l.quiesce());
        assert_eq!(
            *lock(&events),
            ["pause a", "pause b", "resume b", "resume a"]
        );
    }

    #[test]
    fn states_round_trip_by_id_and_mismatches_are_refused_by_name() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let saved = list(&["a", "b"], &events).save().unwrap();
        assert_eq!(saved[1].1.version, 3);
        assert_eq!(saved[1].1.state, serde_json::json!(2));
        list(&["a", "b"], &events).restore(&saved).unwrap();

        let e = list(&["a", "c"], &events).restore(&saved).unwrap_err();
        assert!(matches!(e, DeviceListError::Mismatch { .. }), "{e}");

        let mut old = saved.clone();
        old[0].1.version = 2;
        let e = list(&["a", "b"], &events).restore(&old).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device a: saved state version 2, this vireo reads version 3"
        );

        let mut bad = saved.clone();
        bad[1].1.state = serde_json::json!("x");
        let e = list(&["a", "b"], &events).restore(&bad).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("device b: saved state does not fit"));

        let mut big = saved;
        big[0].1.state = serde_json::json!(1000);
        let e = list(&["a", "b"], &events).restore(&big).unwrap_err();
        assert_eq!(e.to_string(), "device a: value 1000 is too large");
    }
}
