//! `vireo_emulator::fuzzing::emulate`: the input (a mode byte, 16 register
//! bytes, code) decoded and executed as guest code for a bounded number of
//! instructions. Guest code must never panic the host.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_emulator::fuzzing::emulate(data);
});
