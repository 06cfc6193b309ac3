//! Arbitrary bytes as one line of `kcat -C -J` output, the input of `cdcflow replay`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cdcflow::runtime::parse_kcat_line(data, 1);
});
