//! Formats: one serial frame's text turned into reading fields.
//!
//! Pure functions: no I/O, no clock. Every way a frame can be bad is a
//! [`FormatError`] with a short `reason` used as the metrics label, so a noisy line is
//! counted, never fatal. Text formats must be valid UTF-8 (`invalid_utf8` otherwise).
//!
//! Values in `csv` and `kv` frames are typed the same way: `true` and `false` become
//! booleans, whole numbers that fit an `i64` stay integers, other numbers become
//! floats, everything else is a string. Empty values are left out.

use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// How a frame's text is turned into fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Comma-separated values named by `fields`, in order. Cells are trimmed; empty
    /// cells are left out; a line must have exactly one cell per name (a line of
    /// another shape is noise, not a reading). No quoting.
    Csv,
    /// One JSON object per frame.
    Json,
    /// `key=value` pairs separated by spaces or commas, e.g. `t=21.5 door=open`.
    Kv,
    /// NMEA 0183 sentences with a `*hh` checksum (required and checked). `GGA` and
    /// `RMC` are read; other sentence types (GSV, GSA, VTG, ... that receivers send
    /// all the time) are skipped, not errors.
    Nmea,
    /// Nothing is read from the port: frames are skipped. For a port that only takes
    /// commands (`action.serial_write`) and whose answers do not matter.
    None,
}

/// The format part of a serial source's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FormatConfig {
    /// How each frame is turned into fields: `csv`, `json`, `kv` or `nmea`.
    pub format: Format,
    /// For `csv`: the field names, in column order. Not used by the other formats.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// A way a frame failed to give fields.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("frame is not valid UTF-8")]
    InvalidUtf8,
    #[error("frame has no values")]
    Empty,
    #[error("frame has {cells} cells but only {fields} field names")]
    TooManyCells { cells: usize, fields: usize },
    #[error("frame has {cells} cells but {fields} field names")]
    TooFewCells { cells: usize, fields: usize },
    #[error("frame is not valid JSON: {0}")]
    Malformed(String),
    #[error("frame is JSON but not an object")]
    NotAnObject,
    #[error("{0:?} is not a key=value pair")]
    BadPair(String),
    #[error("frame is not an NMEA sentence")]
    NotNmea,
    #[error("NMEA sentence has no valid *hh checksum")]
    MissingChecksum,
    #[error("NMEA checksum is {computed:02X} but the sentence says {stated:02X}")]
    BadChecksum { stated: u8, computed: u8 },
    #[error("NMEA sentence {0:?} is not supported")]
    UnsupportedSentence(String),
    #[error("NMEA field {field} has a bad value {value:?}")]
    BadField { field: &'static str, value: String },
    #[error("format = \"none\": frames are not read")]
    NotRead,
}

impl FormatError {
    /// The metrics label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::InvalidUtf8 => "invalid_utf8",
            FormatError::Empty => "empty",
            FormatError::TooManyCells { .. } => "too_many_cells",
            FormatError::TooFewCells { .. } => "too_few_cells",
            FormatError::Malformed(_) => "malformed",
            FormatError::NotAnObject => "not_an_object",
            FormatError::BadPair(_) => "bad_pair",
            FormatError::NotNmea => "not_nmea",
            FormatError::MissingChecksum => "missing_checksum",
            FormatError::BadChecksum { .. } => "bad_checksum",
            FormatError::UnsupportedSentence(_) => "unsupported_sentence",
            FormatError::BadField { .. } => "bad_field",
            FormatError::NotRead => "not_read",
        }
    }

    /// A frame that is fine but carries nothing to read (an NMEA sentence type that
    /// is not read, any frame with `format = "none"`): skipped, not a sign of trouble.
    pub fn is_skip(&self) -> bool {
        matches!(
            self,
            FormatError::UnsupportedSentence(_) | FormatError::NotRead
        )
    }
}

impl FormatConfig {
    /// Checks the config on its own: `csv` needs distinct, non-empty field names, and
    /// the other formats take none.
    pub fn validate(&self) -> Result<(), String> {
        match self.format {
            Format::Csv => {
                if self.fields.is_empty() {
                    return Err("format \"csv\" needs a `fields` list".to_string());
                }
                for (i, name) in self.fields.iter().enumerate() {
                    if name.trim().is_empty() {
                        return Err(format!("fields[{i}] is empty"));
                    }
                    if self.fields[..i].contains(name) {
                        return Err(format!("field {name:?} is listed twice"));
                    }
                }
                Ok(())
            }
            _ if !self.fields.is_empty() => {
                Err("`fields` is only used with format = \"csv\"".to_string())
            }
            _ => Ok(()),
        }
    }

    /// Turns one frame into fields.
    pub fn parse(&self, frame: &[u8]) -> Result<Map<String, Value>, FormatError> {
        let text = std::str::from_utf8(frame).map_err(|_| FormatError::InvalidUtf8)?;
        match self.format {
            Format::Csv => parse_csv(&self.fields, text),
            Format::Json => parse_json(text),
            Format::Kv => parse_kv(text),
            Format::Nmea => parse_nmea(text),
            Format::None => Err(FormatError::NotRead),
        }
    }
}

fn parse_csv(names: &[String], text: &str) -> Result<Map<String, Value>, FormatError> {
    let cells: Vec<&str> = text.split(',').map(str::trim).collect();
    if cells.len() > names.len() {
        return Err(FormatError::TooManyCells {
            cells: cells.len(),
            fields: names.len(),
        });
    }
    if cells.len() < names.len() {
        return Err(FormatError::TooFewCells {
            cells: cells.len(),
            fields: names.len(),
        });
    }
    let fields: Map<String, Value> = names
        .iter()
        .zip(cells)
        .filter(|(_, cell)| !cell.is_empty())
        .map(|(name, cell)| (name.clone(), scalar(cell)))
        .collect();
    non_empty(fields)
}

fn parse_json(text: &str) -> Result<Map<String, Value>, FormatError> {
    // serde_json refuses nesting deeper than 128 levels: an error, not a stack overflow.
    match serde_json::from_str(text).map_err(|e| FormatError::Malformed(e.to_string()))? {
        Value::Object(fields) => Ok(fields),
        _ => Err(FormatError::NotAnObject),
    }
}

fn parse_kv(text: &str) -> Result<Map<String, Value>, FormatError> {
    let mut fields = Map::new();
    for pair in text.split([' ', ',', '\t']).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                if !value.is_empty() {
                    fields.insert(key.to_string(), scalar(value));
                }
            }
            _ => return Err(FormatError::BadPair(clip(pair))),
        }
    }
    non_empty(fields)
}

fn non_empty(fields: Map<String, Value>) -> Result<Map<String, Value>, FormatError> {
    if fields.is_empty() {
        Err(FormatError::Empty)
    } else {
        Ok(fields)
    }
}

/// A text value typed: booleans, `i64` integers, finite floats, else the string.
fn scalar(s: &str) -> Value {
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = s.parse::<i64>() {
                return Value::from(i);
            }
            // `parse::<f64>` also takes "inf" and "NaN"; `from_f64` refuses those, so
            // they stay strings.
            match s.parse::<f64>().ok().and_then(Number::from_f64) {
                Some(n) => Value::Number(n),
                None => Value::String(s.to_string()),
            }
        }
    }
}

/// Error text quotes at most 64 characters of the input.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn parse_nmea(text: &str) -> Result<Map<String, Value>, FormatError> {
    let s = text.trim();
    if !s.is_ascii() {
        return Err(FormatError::NotNmea);
    }
    let body = s
        .strip_prefix('$')
        .or_else(|| s.strip_prefix('!'))
        .ok_or(FormatError::NotNmea)?;
    let (body, sum) = body.rsplit_once('*').ok_or(FormatError::MissingChecksum)?;
    if sum.len() != 2 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FormatError::MissingChecksum);
    }
    let stated = u8::from_str_radix(sum, 16).map_err(|_| FormatError::MissingChecksum)?;
    let computed = body.bytes().fold(0u8, |acc, b| acc ^ b);
    if stated != computed {
        return Err(FormatError::BadChecksum { stated, computed });
    }
    let parts: Vec<&str> = body.split(',').collect();
    let get = |i: usize| parts.get(i).copied().unwrap_or("");
    let address = get(0);
    // A standard address is a 2 letter talker (GP, GN, GL, ...) and a 3 letter type;
    // proprietary (`P...`) and other shapes are unsupported. ASCII was checked above,
    // so slicing at byte 2 is on a character boundary.
    let kind = match address.len() {
        5 if !address.starts_with('P') => &address[2..],
        _ => "",
    };
    let mut fields = Map::new();
    match kind {
        "GGA" => {
            fields.insert("sentence".into(), "GGA".into());
            put(&mut fields, "utc_time", utc_time(get(1))?);
            position(&mut fields, [get(2), get(3), get(4), get(5)])?;
            put(&mut fields, "fix_quality", integer("fix_quality", get(6))?);
            put(&mut fields, "satellites", integer("satellites", get(7))?);
            put(&mut fields, "hdop", float("hdop", get(8))?);
            put(&mut fields, "altitude_m", float("altitude_m", get(9))?);
        }
        "RMC" => {
            fields.insert("sentence".into(), "RMC".into());
            put(&mut fields, "utc_time", utc_time(get(1))?);
            let status = match get(2) {
                "" => None,
                s @ ("A" | "V") => Some(Value::from(s)),
                other => return Err(bad("status", other)),
            };
            put(&mut fields, "status", status);
            position(&mut fields, [get(3), get(4), get(5), get(6)])?;
            put(&mut fields, "speed_knots", float("speed_knots", get(7))?);
            put(&mut fields, "course_deg", float("course_deg", get(8))?);
            put(&mut fields, "date", date(get(9))?);
        }
        _ => return Err(FormatError::UnsupportedSentence(clip(address))),
    }
    Ok(fields)
}

fn put(fields: &mut Map<String, Value>, name: &str, value: Option<Value>) {
    if let Some(v) = value {
        fields.insert(name.to_string(), v);
    }
}

fn bad(field: &'static str, value: &str) -> FormatError {
    FormatError::BadField {
        field,
        value: clip(value),
    }
}

fn float(field: &'static str, s: &str) -> Result<Option<Value>, FormatError> {
    if s.is_empty() {
        return Ok(None);
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(bad(field, s));
    }
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(|n| Some(Value::Number(n)))
        .ok_or_else(|| bad(field, s))
}

fn integer(field: &'static str, s: &str) -> Result<Option<Value>, FormatError> {
    if s.is_empty() {
        return Ok(None);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(field, s));
    }
    s.parse::<u64>()
        .map(|n| Some(Value::from(n)))
        .map_err(|_| bad(field, s))
}

/// `latitude`, `longitude` from `[ddmm.mmmm, N|S, dddmm.mmmm, E|W]`, as signed decimal
/// degrees rounded to 7 places (about 1 cm). An empty position (no fix) gives none.
fn position(fields: &mut Map<String, Value>, p: [&str; 4]) -> Result<(), FormatError> {
    let lat = coordinate("latitude", p[0], p[1], 90.0, ('N', 'S'))?;
    let lon = coordinate("longitude", p[2], p[3], 180.0, ('E', 'W'))?;
    put(fields, "latitude", lat);
    put(fields, "longitude", lon);
    Ok(())
}

fn coordinate(
    field: &'static str,
    value: &str,
    hemisphere: &str,
    max_deg: f64,
    (pos, neg): (char, char),
) -> Result<Option<Value>, FormatError> {
    if value.is_empty() {
        return Ok(None);
    }
    let err = || bad(field, &format!("{value},{hemisphere}"));
    if !value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(err());
    }
    let raw: f64 = value.parse().map_err(|_| err())?;
    let deg = (raw / 100.0).trunc();
    let min = raw - deg * 100.0;
    let decimal = deg + min / 60.0;
    if min >= 60.0 || decimal > max_deg {
        return Err(err());
    }
    let sign = match hemisphere.chars().collect::<Vec<_>>()[..] {
        [c] if c == pos => 1.0,
        [c] if c == neg => -1.0,
        _ => return Err(err()),
    };
    let rounded = (sign * decimal * 1e7).round() / 1e7;
    Ok(Number::from_f64(rounded).map(Value::Number))
}

/// `hhmmss[.sss]` as `hh:mm:ss[.sss]`.
fn utc_time(s: &str) -> Result<Option<Value>, FormatError> {
    if s.is_empty() {
        return Ok(None);
    }
    let err = || bad("utc_time", s);
    let (hms, frac) = s.split_at_checked(6).ok_or_else(err)?;
    let digits: Vec<u8> = hms.bytes().map(|b| b.wrapping_sub(b'0')).collect();
    if digits.iter().any(|&d| d > 9) {
        return Err(err());
    }
    let [h1, h2, m1, m2, s1, s2] = digits[..] else {
        return Err(err());
    };
    let frac_ok = frac.is_empty()
        || frac
            .strip_prefix('.')
            .is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    // 60 seconds: a leap second.
    if h1 * 10 + h2 > 23 || m1 * 10 + m2 > 59 || s1 * 10 + s2 > 60 || !frac_ok {
        return Err(err());
    }
    Ok(Some(Value::from(format!(
        "{}:{}:{}{frac}",
        &hms[..2],
        &hms[2..4],
        &hms[4..]
    ))))
}

/// `ddmmyy` as `yyyy-mm-dd`; two digit years 80-99 are 1980-1999 (GPS began in
/// 1980), 00-79 are 2000-2079.
fn date(s: &str) -> Result<Option<Value>, FormatError> {
    if s.is_empty() {
        return Ok(None);
    }
    let err = || bad("date", s);
    if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().map_err(|_| err());
    let (d, m, y) = (num(0..2)?, num(2..4)?, num(4..6)?);
    let year = if y >= 80 { 1900 + y } else { 2000 + y };
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, m, d).ok_or_else(err)?;
    Ok(Some(Value::from(date.format("%Y-%m-%d").to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(format: Format, fields: &[&str]) -> FormatConfig {
        FormatConfig {
            format,
            fields: fields.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn parse(format: Format, fields: &[&str], frame: &str) -> Result<Value, FormatError> {
        cfg(format, fields)
            .parse(frame.as_bytes())
            .map(Value::Object)
    }

    fn reason(format: Format, fields: &[&str], frame: &[u8]) -> &'static str {
        match cfg(format, fields).parse(frame) {
            Ok(v) => panic!("{} parsed as {v:?}", String::from_utf8_lossy(frame)),
            Err(e) => e.reason(),
        }
    }

    /// An NMEA sentence with its checksum computed.
    fn nmea(body: &str) -> String {
        let sum = body.bytes().fold(0u8, |a, b| a ^ b);
        format!("${body}*{sum:02X}")
    }

    const GGA: &str = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
    const RMC: &str = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A";

    #[test]
    fn csv_cells_are_named_and_typed() {
        let v = parse(
            Format::Csv,
            &["t", "door", "n", "ok", "big"],
            " 21.5,open, 3 ,true,",
        )
        .unwrap();
        assert_eq!(v, json!({"t": 21.5, "door": "open", "n": 3, "ok": true}));
        assert!(v["n"].is_i64());
    }

    #[test]
    fn csv_empty_cells_are_left_out() {
        let v = parse(Format::Csv, &["a", "b", "c"], ",2,").unwrap();
        assert_eq!(v, json!({"b": 2}));
    }

    #[test]
    fn a_csv_line_of_another_shape_is_noise_not_a_reading() {
        assert_eq!(reason(Format::Csv, &["a"], b"1,2"), "too_many_cells");
        assert_eq!(
            reason(Format::Csv, &["t", "door"], b"garbage line here"),
            "too_few_cells"
        );
        assert_eq!(reason(Format::Csv, &["a", "b"], b" , "), "empty");
    }

    #[test]
    fn other_nmea_sentences_and_any_frame_of_format_none_are_skipped_not_rejected() {
        let gsv = "$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74";
        let fmt = |format| FormatConfig {
            format,
            fields: Vec::new(),
        };
        let skipped = |format, frame: &str| {
            fmt(format)
                .parse(frame.as_bytes())
                .err()
                .map(|e| (e.is_skip(), e.reason()))
        };
        assert_eq!(
            skipped(Format::Nmea, gsv),
            Some((true, "unsupported_sentence"))
        );
        assert_eq!(skipped(Format::None, "OK"), Some((true, "not_read")));
        assert_eq!(skipped(Format::Nmea, "junk"), Some((false, "not_nmea")));
    }

    #[test]
    fn numbers_that_do_not_fit_i64_become_floats_and_non_finite_stay_strings() {
        let v = parse(
            Format::Kv,
            &[],
            "big=99999999999999999999 neg=-7 e=1e3 inf=inf nan=NaN huge=1e999 hex=0x10",
        )
        .unwrap();
        assert_eq!(v["big"], json!(1e20));
        assert_eq!(v["neg"], json!(-7));
        assert_eq!(v["e"], json!(1000.0));
        assert_eq!(v["inf"], json!("inf"));
        assert_eq!(v["nan"], json!("NaN"));
        assert_eq!(v["huge"], json!("1e999"));
        assert_eq!(v["hex"], json!("0x10"));
    }

    #[test]
    fn json_lines_must_be_objects() {
        let v = parse(Format::Json, &[], r#"{"t":21.5,"n":[1]}"#).unwrap();
        assert_eq!(v, json!({"t": 21.5, "n": [1]}));
        assert_eq!(reason(Format::Json, &[], b"[1,2]"), "not_an_object");
        assert_eq!(reason(Format::Json, &[], b"{nope"), "malformed");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(reason(Format::Json, &[], deep.as_bytes()), "malformed");
    }

    #[test]
    fn kv_pairs_split_on_spaces_and_commas() {
        let v = parse(Format::Kv, &[], "t=21.5, door=open,alarm=false  n=4 empty=").unwrap();
        assert_eq!(
            v,
            json!({"t": 21.5, "door": "open", "alarm": false, "n": 4})
        );
        assert_eq!(reason(Format::Kv, &[], b"t=1 oops"), "bad_pair");
        assert_eq!(reason(Format::Kv, &[], b"=1"), "bad_pair");
        assert_eq!(reason(Format::Kv, &[], b"  ,"), "empty");
    }

    #[test]
    fn invalid_utf8_is_an_error_in_every_format() {
        for format in [Format::Csv, Format::Json, Format::Kv, Format::Nmea] {
            assert_eq!(reason(format, &["a"], b"a=\xff\xfe"), "invalid_utf8");
        }
    }

    #[test]
    fn the_checksum_helper_matches_real_sentences() {
        assert_eq!(nmea(&GGA[1..GGA.len() - 3]), GGA);
        assert_eq!(nmea(&RMC[1..RMC.len() - 3]), RMC);
    }

    #[test]
    fn a_gga_sentence_gives_position_fix_and_altitude() {
        let v = parse(Format::Nmea, &[], GGA).unwrap();
        assert_eq!(
            v,
            json!({
                "sentence": "GGA",
                "utc_time": "12:35:19",
                "latitude": 48.1173,
                "longitude": 11.5166667,
                "fix_quality": 1,
                "satellites": 8,
                "hdop": 0.9,
                "altitude_m": 545.4,
            })
        );
    }

    #[test]
    fn an_rmc_sentence_gives_position_speed_course_status_and_date() {
        let v = parse(Format::Nmea, &[], &format!("{RMC}\r\n")).unwrap();
        assert_eq!(
            v,
            json!({
                "sentence": "RMC",
                "utc_time": "12:35:19",
                "status": "A",
                "latitude": 48.1173,
                "longitude": 11.5166667,
                "speed_knots": 22.4,
                "course_deg": 84.4,
                "date": "1994-03-23",
            })
        );
    }

    #[test]
    fn southern_and_western_positions_are_negative() {
        let s = nmea("GNRMC,235959.50,V,3351.123,S,15112.500,W,0.0,,010126,,,N");
        let v = parse(Format::Nmea, &[], &s).unwrap();
        assert_eq!(v["latitude"], json!(-33.8520500));
        assert_eq!(v["longitude"], json!(-151.2083333));
        assert_eq!(v["utc_time"], json!("23:59:59.50"));
        assert_eq!(v["date"], json!("2026-01-01"));
        assert_eq!(v["status"], json!("V"));
        assert!(v.get("course_deg").is_none());
    }

    #[test]
    fn a_gga_without_a_fix_has_no_position() {
        let v = parse(Format::Nmea, &[], &nmea("GPGGA,,,,,,0,00,,,M,,M,,")).unwrap();
        assert_eq!(
            v,
            json!({"sentence": "GGA", "fix_quality": 0, "satellites": 0})
        );
    }

    #[test]
    fn bad_nmea_sentences_are_errors_with_reasons() {
        let bad_sum = GGA.replace("*47", "*48");
        let cases: [(String, &str); 12] = [
            (bad_sum, "bad_checksum"),
            (GGA.replace("545.4", "545.5"), "bad_checksum"),
            (GGA[..GGA.len() - 3].to_string(), "missing_checksum"),
            (GGA.replace("*47", "*4"), "missing_checksum"),
            (GGA.replace("*47", "*+7"), "missing_checksum"),
            ("GPGGA,1*00".to_string(), "not_nmea"),
            ("$GPGGA,é*00".to_string(), "not_nmea"),
            (nmea("GPGSV,3,1,11"), "unsupported_sentence"),
            (nmea("PGRME,15.0,M"), "unsupported_sentence"),
            (nmea("GPGGA,123519,9107.038,N,,,1"), "bad_field"),
            (nmea("GPGGA,123519,4807.038,X,,,1"), "bad_field"),
            (nmea("GPRMC,256000,A"), "bad_field"),
        ];
        for (frame, want) in cases {
            assert_eq!(reason(Format::Nmea, &[], frame.as_bytes()), want, "{frame}");
        }
        for frame in [
            nmea("GPRMC,123519,Q"),
            nmea("GPRMC,123519,A,,,,,1.0,2.0,310299"),
            nmea("GPRMC,12351,A"),
            nmea("GPGGA,123519,,,inf,E,1"),
            nmea("GPGGA,123519,,,,,x"),
            nmea("GPGGA,123519,,,,,1,8,1e3"),
        ] {
            assert_eq!(
                reason(Format::Nmea, &[], frame.as_bytes()),
                "bad_field",
                "{frame}"
            );
        }
    }

    #[test]
    fn csv_config_needs_distinct_field_names_and_others_take_none() {
        assert!(cfg(Format::Csv, &["a", "b"]).validate().is_ok());
        assert!(cfg(Format::Csv, &[]).validate().is_err());
        assert!(cfg(Format::Csv, &["a", "a"]).validate().is_err());
        assert!(cfg(Format::Csv, &["a", " "]).validate().is_err());
        assert!(cfg(Format::Kv, &["a"]).validate().is_err());
        assert!(cfg(Format::Nmea, &[]).validate().is_ok());
    }

    #[test]
    fn the_format_config_deserializes_from_toml() {
        let c: FormatConfig =
            toml::from_str("format = \"csv\"\nfields = [\"t\", \"door\"]").unwrap();
        assert_eq!(c, cfg(Format::Csv, &["t", "door"]));
        let c: FormatConfig = toml::from_str("format = \"nmea\"").unwrap();
        assert_eq!(c.format, Format::Nmea);
        assert!(toml::from_str::<FormatConfig>("format = \"xml\"").is_err());
    }

    #[test]
    fn random_frames_never_panic_in_any_format() {
        let mut rng = crate::serial::XorShift(0x2545_F491_4F6C_DD1D);
        let alphabet = b"$!*,.=0123456789ABCDEFGPNSEW \t\r\n{}[]\":-etrufalsx\xff\xc3";
        let formats = [Format::Csv, Format::Json, Format::Kv, Format::Nmea];
        for i in 0..20_000 {
            let n = (rng.next() % 80) as usize;
            let mut frame: Vec<u8> = (0..n)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            if i % 2 == 0 {
                // Half the frames are NMEA-shaped with a valid checksum, to get past it.
                let body = String::from_utf8_lossy(&frame).replace(['$', '*', '\u{FFFD}'], "");
                let kind = ["GPGGA,", "GPRMC,"][i % 4 / 2];
                frame = nmea(&format!("{kind}{body}")).into_bytes();
            }
            let _ = cfg(formats[i % 4], &["a", "b", "c"]).parse(&frame);
        }
    }
}
