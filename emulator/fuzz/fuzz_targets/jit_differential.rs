//! `vireo_emulator::fuzzing::jit_differential`: the same guest code run by
//! the interpreter and by the translator of hot blocks; exits, registers
//! and memory must agree (it panics, with both states, when they do not).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vireo_emulator::fuzzing::jit_differential(data);
});
