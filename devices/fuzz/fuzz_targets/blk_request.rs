//! The virtio-blk request path (parse, carry out against an in-memory
//! disk, write the status, return the chain) over fuzz-chosen descriptor
//! chains. Any input must be answered, never panic, never change a
//! read-only disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_devices::virtio::block::fuzzing::blk_request(data);
});
