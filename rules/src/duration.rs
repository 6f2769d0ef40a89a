//! Durations in rule files: `"30s"`, `"10m"`, `"1h30m"`, `"500ms"`, `"7d"`.

use chrono::TimeDelta;

/// The longest duration accepted anywhere in a rule file: one year. Longer windows
/// make no sense on a gateway, and the cap keeps every time computation far from
/// overflowing.
pub const MAX_DURATION_DAYS: i64 = 366;

/// Milliseconds per unit, longest unit name first so `ms` is not read as `m`.
const UNITS: &[(&str, i64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Parses a duration written as one or more `<whole number><unit>` parts with no
/// spaces (`1h30m`); units `ms`, `s`, `m`, `h`, `d`. It must be more than zero and
/// at most [`MAX_DURATION_DAYS`] days.
///
/// `Err` is `(byte offset into the text, message)`, no offset when the text as a
/// whole is wrong; the message does not name the key (the caller adds it).
pub(crate) fn parse(text: &str) -> Result<TimeDelta, (Option<usize>, String)> {
    let hint = "write a whole number and a unit, like \"30s\", \"10m\" or \"1h30m\" \
                (units: ms, s, m, h, d)";
    if text.is_empty() {
        return Err((None, format!("empty duration; {hint}")));
    }
    let bytes = text.as_bytes();
    let mut total: i64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let digits_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return Err((Some(i), format!("`{text}` is not a duration; {hint}")));
        }
        // At most 12 digits: anything longer is over the cap in every unit anyway.
        let number: i64 = if i - digits_start > 12 {
            i64::MAX
        } else {
            text[digits_start..i].parse().unwrap_or(i64::MAX)
        };
        let rest = &text[i..];
        let Some(&(unit, millis)) = UNITS.iter().find(|(unit, _)| rest.starts_with(unit)) else {
            return Err((
                Some(i),
                format!("`{text}` is not a duration: a number needs a unit; {hint}"),
            ));
        };
        i += unit.len();
        total = total.saturating_add(number.saturating_mul(millis));
    }
    if total == 0 {
        return Err((None, "the duration must be more than zero".into()));
    }
    if total > MAX_DURATION_DAYS * 86_400_000 {
        return Err((
            None,
            format!("`{text}` is too long; the longest duration is {MAX_DURATION_DAYS}d"),
        ));
    }
    Ok(TimeDelta::milliseconds(total))
}

/// Writes a duration the way rule files do, largest units first: `1h30m`, `500ms`.
pub(crate) fn format(duration: TimeDelta) -> String {
    let mut ms = duration.num_milliseconds();
    if ms <= 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for &(unit, millis) in UNITS.iter().rev() {
        if ms >= millis {
            out.push_str(&format!("{}{unit}", ms / millis));
            ms %= millis;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> Result<i64, (Option<usize>, String)> {
        parse(text).map(|d| d.num_milliseconds())
    }

    #[test]
    fn every_unit_is_understood() {
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("10m"), Ok(600_000));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("1d"), Ok(86_400_000));
    }

    #[test]
    fn parts_add_up() {
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("1m1s1ms"), Ok(61_001));
    }

    #[test]
    fn prose_is_refused_pointing_at_the_first_character_that_is_not_understood() {
        let Err((at, message)) = ms("10 minutes later") else {
            panic!("accepted prose");
        };
        assert_eq!(at, Some(2));
        assert!(message.starts_with("`10 minutes later` is not a duration"));
        assert_eq!(ms("10").map_err(|e| e.0), Err(Some(2)));
        assert_eq!(ms("m").map_err(|e| e.0), Err(Some(0)));
        assert_eq!(ms("1.5h").map_err(|e| e.0), Err(Some(1)));
        assert_eq!(ms("-5m").map_err(|e| e.0), Err(Some(0)));
        assert_eq!(ms("10M").map_err(|e| e.0), Err(Some(2)));
    }

    #[test]
    fn zero_empty_and_too_long_are_refused() {
        assert_eq!(
            ms(""),
            Err((
                None,
                "empty duration; write a whole number and a unit, like \"30s\", \"10m\" or \
                 \"1h30m\" (units: ms, s, m, h, d)"
                    .into()
            ))
        );
        assert_eq!(
            ms("0s"),
            Err((None, "the duration must be more than zero".into()))
        );
        assert_eq!(
            ms("367d"),
            Err((
                None,
                "`367d` is too long; the longest duration is 366d".into()
            ))
        );
        assert_eq!(ms("366d"), Ok(366 * 24 * 3_600_000));
        assert_eq!(
            ms("99999999999999999999999h"),
            Err((
                None,
                "`99999999999999999999999h` is too long; the longest duration is 366d".into()
            ))
        );
    }

    #[test]
    fn formatting_uses_the_largest_units() {
        assert_eq!(format(TimeDelta::milliseconds(5_400_000)), "1h30m");
        assert_eq!(format(TimeDelta::milliseconds(500)), "500ms");
        assert_eq!(format(TimeDelta::milliseconds(86_400_000)), "1d");
        assert_eq!(format(TimeDelta::milliseconds(61_001)), "1m1s1ms");
    }
}
