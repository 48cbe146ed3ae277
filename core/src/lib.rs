//! What every Trainyard service shares: configuration, the NATS topology
//! (subjects, streams, consumers and KV buckets as typed constructors), the
//! stage runtime that owns acks, the artifact store, delivery destinations,
//! events, the trainer subprocess constructor, telemetry and shutdown; and,
//! re-exported from `trainyard-proto`, [`redact`]: how a URL may be shown.
//!
//! Services depend on this crate and on `trainyard-proto`; nothing here knows
//! about a particular stage.

pub mod auth;
pub mod claim;
pub mod config;
pub mod destination;
pub mod events;
pub mod fleet;
pub mod guard;
pub mod manifest;
pub mod nats;
pub mod netguard;
pub mod process;
pub mod registry;
pub mod retry;
pub mod runtime;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod topology;

pub use config::Config;
/// Showing URLs without their secrets (lives in proto, the bottom of the graph).
pub use trainyard_proto::redact;

/// Milliseconds since the Unix epoch, the unit of every timestamp we store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `s` with its `%XX` escapes decoded; `None` when an escape is malformed
/// or the result is not UTF-8 (`OTEL_RESOURCE_ATTRIBUTES` values, an
/// `hf://` destination's revision).
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Milliseconds since the Unix epoch of an RFC 3339 time
/// (`2026-12-06T20:15:00Z`, `2024-01-15T10:30:00.123Z`,
/// `2026-12-06T21:15:00+01:00`), the inverse of [`rfc3339`]; `None` when it
/// is not one. Fractions past milliseconds are dropped.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first3 = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = first3.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = rest[1..].split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            sign * (h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let minutes = (days * 24 + hh) * 60 + mm - offset_min;
    Some(minutes * 60_000 + ss * 1000 + millis)
}

/// `2026-12-01T20:31:11.123Z` for a Unix time in milliseconds (webhook
/// timestamps, a scheduled retry's `Nats-Schedule: @at …`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_back() {
        for ms in [0, 951_782_400_000, 1_614_265_330_123, 1_796_588_100_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_rfc3339("2026-12-06T20:15:00Z"),
            Some(1_796_588_100_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T21:15:00.5+01:00"),
            Some(1_796_588_100_500)
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T20:15:00.123456Z"),
            Some(1_796_588_100_123)
        );
        for bad in [
            "",
            "not a time",
            "2026-12-06",
            "2026-13-06T20:15:00Z",
            "2026-12-06T20:15:00",
            "2026-12-06T20:15:00.Z",
            "2026-12-06T20:15:00+0100",
            "+026-12-06T20:15:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
