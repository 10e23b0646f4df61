//! A new connection to the destination service: preamble, first frame, the Hello checks; see phaul_core::fuzzing::hello.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phaul_core::fuzzing::hello(data));
