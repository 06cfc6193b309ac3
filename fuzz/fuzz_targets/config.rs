//! Arbitrary text as a config file: loading it (TOML, environment overrides, validation,
//! secrets) and compiling its pipelines must answer with an error naming a key, never panic.
#![no_main]

use cdcflow::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = vec![(
        "CDCFLOW__STATE__CACHE_ENTRIES".to_owned(),
        "1000".to_owned(),
    )];
    if let Ok(config) = Config::parse(text, "fuzz", env) {
        let _ = config.build_pipelines();
    }
});
