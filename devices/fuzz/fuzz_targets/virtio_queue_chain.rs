//! A split virtqueue with fuzz-chosen size and ring addresses over guest
//! memory filled from the input: pop every chain and walk it the ways the
//! devices do, return it, run the notification logic. Any input must
//! return, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vireo_devices::virtio::block::fuzzing::virtio_queue_chain(data);
});
