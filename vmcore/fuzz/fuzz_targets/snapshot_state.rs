//! `vireo_vmcore::fuzzing::snapshot_state`: see its documentation for what the input
//! means. Any input must give a value or an error, never a panic, a hang
//! or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_vmcore::fuzzing::snapshot_state(data);
});
