//! Length-prefixed postcard frames decoded as control (Msg) and fs-sync (FsMsg) messages; see phaul_core::fuzzing::frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phaul_core::fuzzing::frame(data));
