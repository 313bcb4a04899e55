//! Fuzzes the MySQL health check's parsers: the server greeting (Initial Handshake or error
//! packet), the answer to the login, and the password scramble over the seed the server sends
//! in an auth switch, all of which any process listening on a backend's port controls.
//! Arbitrary bytes are accepted or refused, never a panic.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run mysql /tmp/mysql-corpus fuzz/seeds/mysql -- -max_total_time=60
//! ```

#![no_main]

use lb::check::{login_answer, native_password, parse_greeting};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_greeting(data);
    let _ = login_answer(data, "portico");
    let _ = native_password("secret", data);
});
