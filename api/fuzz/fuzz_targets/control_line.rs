//! `vireo_api::fuzzing::control_line`: a control-socket line as a command
//! and as a reply. Any input must return, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vireo_api::fuzzing::control_line(data);
});
