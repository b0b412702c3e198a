//! `vireo_devices::fuzzing::virtio::console`: see its documentation for what the
//! input means. Any input must return, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_devices::fuzzing::virtio::console(data);
});
