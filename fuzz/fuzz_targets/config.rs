//! Fuzzes the standalone config reader: arbitrary text must yield a config or positioned
//! errors, never a panic; an accepted config's effective form must read back the same.
//!
//! ```text
//! cargo +nightly fuzz run config /tmp/config-fuzz-corpus fuzz/seeds/config -- -max_total_time=60
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;
use model::config::{self, Environment};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = Environment {
        hostname: "fuzz".into(),
        read_file: |p| Err(std::io::Error::new(std::io::ErrorKind::NotFound, p.to_string())),
    };
    match config::parse(text, &env) {
        Ok(cfg) if cfg.cluster.keys.is_empty() => {
            let printed = config::to_yaml(&cfg);
            let again = config::parse(&printed, &env).expect("the effective config reads back");
            assert_eq!(cfg, again, "the effective config means the same");
        }
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(e.pos.line >= 1 && e.pos.column >= 1, "{e}");
            }
        }
    }
});
