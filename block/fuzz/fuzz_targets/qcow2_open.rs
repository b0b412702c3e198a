//! Feeds arbitrary bytes to the qcow2 metadata parser: header, header
//! extensions, L1, refcount table, L2 tables and compressed clusters. Any
//! input must give `Ok` or `Err`, never a panic, a hang or a huge
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_block::qcow2::check_image_bytes(data);
});
