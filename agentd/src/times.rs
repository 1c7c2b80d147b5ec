//! Times as the CLI and the API read and print them: `--since`/`since` values, and
//! fixed-width UTC times.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Reads `since` as docker does: an RFC 3339 time (`2026-12-01T19:00:00Z`), Unix seconds
/// (`1764615600`, `1764615600.5`), or a duration back from `now` (`90s`, `10m`, `1h30m`,
/// `2d`, `500ms`).
pub fn parse_since(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    let wrong = || {
        format!(
            "since {text:?} is neither an RFC 3339 time (2026-12-01T19:00:00Z), Unix seconds (1764615600) \
             nor a duration back from now (90s, 10m, 1h30m, 2d)"
        )
    };
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = text.parse().map_err(|_| wrong())?;
        let nanos = (secs * 1e9) as i128;
        return OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| wrong());
    }
    let mut back = time::Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(wrong());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(wrong)?;
        if digits == 0 {
            return Err(wrong());
        }
        let amount: i64 = rest[..digits].parse().map_err(|_| wrong())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let step = match &rest[..unit_len] {
            "ms" => time::Duration::milliseconds(amount),
            unit => {
                let per: i64 = match unit {
                    "s" => 1,
                    "m" => 60,
                    "h" => 3600,
                    "d" => 86_400,
                    _ => return Err(wrong()),
                };
                time::Duration::seconds(amount.checked_mul(per).ok_or_else(wrong)?)
            }
        };
        back = back.checked_add(step).ok_or_else(wrong)?;
        rest = &rest[unit_len..];
    }
    now.checked_sub(back).ok_or_else(wrong)
}

/// `at` in UTC with `digits` (0 to 9) of the second's fraction, always as wide:
/// `2026-12-01T18:00:00.250Z` with 3, `…00.250000000Z` with 9.
pub fn utc_fixed(at: OffsetDateTime, digits: u32) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let digits = digits.min(9);
    let fraction = at.nanosecond() / 10u32.pow(9 - digits);
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    if digits == 0 {
        format!("{date}Z")
    } else {
        format!("{date}.{fraction:0width$}Z", width = digits as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn since_takes_times_unix_seconds_and_durations() {
        let now = datetime!(2026-12-01 19:00:00 UTC);
        assert_eq!(parse_since("2026-12-01T18:00:00Z", now), Ok(datetime!(2026-12-01 18:00:00 UTC)));
        assert_eq!(parse_since("2026-12-01T20:00:00+01:00", now), Ok(datetime!(2026-12-01 19:00:00 UTC)));
        assert_eq!(parse_since("10m", now), Ok(datetime!(2026-12-01 18:50:00 UTC)));
        assert_eq!(parse_since("1h30m", now), Ok(datetime!(2026-12-01 17:30:00 UTC)));
        assert_eq!(parse_since("2d", now), Ok(datetime!(2026-11-29 19:00:00 UTC)));
        assert_eq!(parse_since("500ms", now), Ok(datetime!(2026-12-01 18:59:59.5 UTC)));
        assert_eq!(parse_since("1764615600", now), Ok(datetime!(2025-12-01 19:00:00 UTC)));
        for bad in ["", "m", "10x", "-5m", "1h 30m", "yesterday", "99999999999999999999d", "999999999999999d"] {
            let error = parse_since(bad, now).expect_err(bad);
            assert!(error.contains("RFC 3339") && error.contains("10m"), "{bad}: {error}");
        }
    }

    #[test]
    fn fixed_width_times_keep_their_width() {
        let at = datetime!(2026-12-01 20:00:00.5 +01:00);
        assert_eq!(utc_fixed(at, 9), "2026-12-01T19:00:00.500000000Z");
        assert_eq!(utc_fixed(at, 3), "2026-12-01T19:00:00.500Z");
        assert_eq!(utc_fixed(datetime!(2026-01-02 03:04:05.000123 UTC), 3), "2026-01-02T03:04:05.000Z");
        assert_eq!(utc_fixed(at, 0), "2026-12-01T19:00:00Z");
    }
}
