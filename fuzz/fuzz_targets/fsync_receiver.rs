//! A fs-sync receiver fed a hostile frame stream must not touch anything outside its root; see phaul_core::fuzzing::fsync_receiver.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phaul_core::fuzzing::fsync_receiver(data));
