//! One packet from a CRIU worker (and a stats image); see phaul_core::fuzzing::criu_rpc.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phaul_core::fuzzing::criu_rpc(data));
