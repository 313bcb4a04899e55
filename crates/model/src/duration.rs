//! Human durations (`"1s"`, `"250ms"`, `"1m30s"`): parsing, formatting and serde helpers.

use std::time::Duration;

/// The longest representable duration; every field accepts far less (see `config`), this
/// only bounds the arithmetic.
const MAX_NANOS: u128 = Duration::MAX.as_nanos();

/// Parses `"1500ms"`, `"2s"`, `"1m30s"`, `"1h"`, `"100us"`, `"0"`. Decimal values (`"0.5s"`)
/// too, exact to the nanosecond (digits beyond it are dropped).
///
/// Total: every input yields a duration or a message, never a panic. The arithmetic is
/// integer and checked, so a value too long to represent (`99999999999999999999999h`,
/// `10000000000000000000s10000000000000000000s`) is an error, not an overflow.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration; write e.g. 500ms, 2s or 1m".into());
    }
    let too_long = || format!("`{s}` is too long a duration; write e.g. 30s, 5m or 1h");
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}` has no unit; write e.g. {s}s or {s}ms"))?;
        if num_len == 0 {
            return Err(format!(
                "`{s}` is not a duration; write e.g. 500ms, 2s or 1m"
            ));
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`; use ns, us, ms, s, m or h"
                ));
            }
        };
        let not_a_number = || format!("`{num}` in `{s}` is not a number");
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(not_a_number());
        }
        let mut value: u128 = 0;
        for d in whole.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(d - b'0')))
                .filter(|v| *v <= MAX_NANOS)
                .ok_or_else(too_long)?;
        }
        let mut ns = value.checked_mul(unit_ns).ok_or_else(too_long)?;
        // At most 18 fractional digits count: beyond them the largest unit (1h = 3.6e12 ns)
        // moves by less than a nanosecond, and 10^18 × 3.6e12 still fits in u128.
        let (mut frac_value, mut scale) = (0u128, 1u128);
        for d in frac.bytes().take(18) {
            frac_value = frac_value * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        ns = ns
            .checked_add(frac_value * unit_ns / scale)
            .ok_or_else(too_long)?;
        total = total
            .checked_add(ns)
            .filter(|t| *t <= MAX_NANOS)
            .ok_or_else(too_long)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way [`parse`] reads it, choosing the largest exact unit.
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    for (unit, size) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if ns.is_multiple_of(size) {
            return format!("{}{unit}", ns / size);
        }
    }
    format!("{ns}ns")
}

/// `#[serde(with = "human")]` for `Duration` fields.
pub mod human {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises as a human string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Deserialises from a human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// `#[serde(with = "human::option")]` for `Option<Duration>`.
    pub mod option {
        use super::*;

        /// Serialises `Some` as a human string.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&format(*d)),
                None => s.serialize_none(),
            }
        }

        /// Deserialises an optional human string.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| parse(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_missing_or_unknown_units_with_a_hint() {
        assert!(parse("5").unwrap_err().contains("no unit"));
        assert!(parse("5d").unwrap_err().contains("unknown unit `d`"));
        assert!(parse("abc").is_err());
        assert!(parse(".s").unwrap_err().contains("is not a number"));
        assert!(parse("1.2.3s").unwrap_err().contains("is not a number"));
    }

    #[test]
    fn long_durations_are_errors_not_panics() {
        for s in [
            "99999999999999999999999h",
            "10000000000000000000s10000000000000000000s",
            "18446744073709551616s",
            "5124095576030431h1h",
            "99999999999999999999999999999999999999999999999999999999999.5h",
            "1.99999999999999999999999999999999999999999999999h99999999999999999999h",
            "18446744073709551615s1s",
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains("too long a duration"), "{s}: {e}");
        }
        // the largest representable duration still parses
        assert_eq!(
            parse("18446744073709551615s").unwrap(),
            Duration::from_secs(u64::MAX)
        );
    }

    #[test]
    fn fractions_are_exact_to_the_nanosecond() {
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0.1s").unwrap(), Duration::from_millis(100));
        assert_eq!(parse(".25s").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2.s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1.0000000001s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse("0.000000001s").unwrap(), Duration::from_nanos(1));
        assert_eq!(
            parse("0.333333333333333333333333333h").unwrap(),
            Duration::from_nanos(1_199_999_999_999)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_errs_without_panicking(s in "[0-9.]{0,30}(ns|us|ms|s|m|h|x)?([0-9.]{0,25}(s|h))?") {
            let _ = parse(&s);
        }

        #[test]
        fn any_duration_round_trips(ns in 0u128..=(u64::MAX as u128 * 1_000_000_000 + 999_999_999)) {
            let d = Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
            proptest::prop_assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(1500),
            Duration::from_secs(60),
            Duration::from_micros(7),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}
