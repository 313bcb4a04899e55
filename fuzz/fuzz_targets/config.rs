//! Fuzzes the standalone config reader: arbitrary bytes must yield a config or positioned
//! errors, never a panic; an accepted config's effective form must read back the same.
//!
//! Each input is used twice: as the file's bytes, and as a list of numbers with units that
//! become a duration field (`cluster: {hold_down: <n1><unit1><n2><unit2>…}`). Byte mutations of
//! YAML text rarely grow a number past 15 digits, which is where the duration parser used to
//! overflow and panic (`99999999999999999999999h`); the second reading reaches any magnitude
//! at once.
//!
//! ```text
//! cargo +nightly fuzz run config /tmp/config-fuzz-corpus fuzz/seeds/config -- -max_total_time=60
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;
use model::config::{self, Environment};

fuzz_target!(|data: &[u8]| {
    check(data);
    check(durations(data).as_bytes());
});

/// `cluster: {hold_down: …}` with up to four `<number><unit>` parts, each from 9 input bytes:
/// a little-endian u64 and a byte choosing the unit (or none, or an unknown one) and whether a
/// fraction follows.
fn durations(data: &[u8]) -> String {
    let mut text = String::new();
    for part in data.chunks_exact(9).take(4) {
        let n = u64::from_le_bytes(part[..8].try_into().expect("8 bytes"));
        let unit = ["ns", "us", "ms", "s", "m", "h", "", "d"][usize::from(part[8] & 7)];
        if part[8] & 8 != 0 {
            text.push_str(&format!("{}.{n}{unit}", part[8] >> 4));
        } else {
            text.push_str(&format!("{n}{unit}"));
        }
    }
    format!("cluster: {{hold_down: {text}}}\n")
}

fn check(data: &[u8]) {
    let env = Environment {
        hostname: "fuzz".into(),
        read_file: |p| Err(std::io::Error::new(std::io::ErrorKind::NotFound, p.to_string())),
    };
    // bytes, as a file is read: text that is not UTF-8 must be a positioned error too
    match config::read(data, &env).map(|l| l.config) {
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
}
