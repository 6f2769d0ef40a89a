//! The register map: what a slave's registers mean, and how the words or bits read
//! from them become reading fields.
//!
//! Pure: no I/O. A [`RegisterConfig`] is what the installer wrote; [`RegisterConfig::check`]
//! turns it into a [`Register`] or says everything that is wrong with it. Decoding never
//! panics: too few words or a value JSON cannot hold (an `f32` NaN) is a
//! [`DecodeError`].
//!
//! Values: `raw * scale + offset`. With the default `scale = 1` and `offset = 0`,
//! integer types stay integers. Otherwise the result is rounded to the decimals the
//! arithmetic can produce (those of the raw value plus those of `scale`, or those of
//! `offset` if more), so a raw 3 with `scale = 0.1` is 0.3 and not
//! 0.30000000000000004; rules that compare against 0.3 see what the device meant.

use serde::Deserialize;
use serde_json::{Number, Value};

/// Which Modbus table a value lives in, and so which read function fetches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Holding registers, read with function 0x03.
    #[default]
    Holding,
    /// Input registers, read with function 0x04.
    Input,
    /// Coils, read with function 0x01.
    Coil,
    /// Discrete inputs, read with function 0x02.
    Discrete,
}

impl Function {
    /// Whether the table holds single bits rather than 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, Function::Coil | Function::Discrete)
    }

    /// Most items one read may ask for (Modbus application protocol, 6.1-6.4).
    pub fn max_per_read(self) -> u16 {
        if self.is_bits() {
            2000
        } else {
            125
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Function::Holding => "holding",
            Function::Input => "input",
            Function::Coil => "coil",
            Function::Discrete => "discrete",
        }
    }
}

/// How the raw words of one value are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
}

impl ValueType {
    /// Registers (or bits) one value takes.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U16 | ValueType::I16 | ValueType::Bool => 1,
        }
    }

    /// For messages: "a u16", "an i16" (as they are read aloud).
    fn with_article(self) -> &'static str {
        match self {
            ValueType::U16 => "a u16",
            ValueType::I16 => "an i16",
            ValueType::U32 => "a u32",
            ValueType::I32 => "an i32",
            ValueType::F32 => "an f32",
            ValueType::Bool => "a bool",
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
        }
    }
}

/// Which register of a 32-bit value holds the high half. Bytes within a register
/// are always big-endian, as Modbus says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The first register is the high word (`ABCD`), the Modbus convention.
    #[default]
    Big,
    /// The first register is the low word (`CDAB`), common in meters and PLCs.
    Little,
}

/// `[[source.modbus.slave.register]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The reading field this value goes into. Unique within the slave.
    pub field: String,
    /// The 0-based address on the wire (the register a manual calls 40001 is holding
    /// address 0). A 32-bit value takes this register and the next.
    pub address: i64,
    /// `holding`, `input`, `coil` or `discrete`. Default `holding`.
    #[serde(default)]
    pub function: Function,
    /// `u16`, `i16`, `u32`, `i32`, `f32`, or `bool` (the only type of coils and
    /// discrete inputs). Default `u16` for registers, `bool` for bits.
    #[serde(default, rename = "type")]
    pub ty: Option<ValueType>,
    /// For 32-bit types: `big` (first register is the high word) or `little`.
    /// Default `big`.
    #[serde(default)]
    pub word_order: Option<WordOrder>,
    /// Multiplies the raw value. Default 1.
    #[serde(default = "one")]
    pub scale: f64,
    /// Added after scaling. Default 0.
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

/// One thing wrong with a register entry: the key to point at and what to say.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterProblem {
    pub key: &'static str,
    pub message: String,
}

/// A checked register: everything resolved, every value in range.
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    pub field: String,
    pub function: Function,
    pub address: u16,
    pub ty: ValueType,
    pub word_order: WordOrder,
    pub scale: f64,
    pub offset: f64,
}

impl RegisterConfig {
    /// The checked register, or every problem with this entry.
    pub fn check(&self) -> Result<Register, Vec<RegisterProblem>> {
        let mut out = Vec::new();
        let mut problem = |key, message: String| out.push(RegisterProblem { key, message });
        if self.field.trim().is_empty() {
            problem("field", "field must not be empty".to_string());
        }
        let bits = self.function.is_bits();
        let ty = self.ty.unwrap_or(if bits {
            ValueType::Bool
        } else {
            ValueType::U16
        });
        let table = match self.function {
            Function::Holding => "a holding register",
            Function::Input => "an input register",
            Function::Coil => "a coil",
            Function::Discrete => "a discrete input",
        };
        match (bits, ty) {
            (true, ValueType::Bool) | (false, ValueType::U16 | ValueType::I16) => {}
            (false, ValueType::U32 | ValueType::I32 | ValueType::F32) => {}
            (true, other) => problem(
                "type",
                format!(
                    "{table} is one bit: its type can only be bool, not {}",
                    other.name()
                ),
            ),
            (false, ValueType::Bool) => problem(
                "type",
                format!(
                    "bool is for coils and discrete inputs; {table} is u16, i16, u32, i32 or f32"
                ),
            ),
        }
        let last = 65_535 - i64::from(ty.width()) + 1;
        if !(0..=last).contains(&self.address) {
            let why = if ty.width() == 2 && self.address == 65_535 {
                format!(
                    "{} takes two registers, so its address can be at most 65534",
                    ty.with_article()
                )
            } else {
                "Modbus addresses are 0 to 65535".to_string()
            };
            problem(
                "address",
                format!("address {} is out of range: {why}", self.address),
            );
        }
        if self.word_order.is_some() && ty.width() != 2 {
            problem(
                "word_order",
                format!(
                    "word_order is for 32-bit types (u32, i32, f32); {} is one register",
                    ty.with_article()
                ),
            );
        }
        let identity = self.scale == 1.0 && self.offset == 0.0;
        if ty == ValueType::Bool && !identity {
            problem(
                "scale",
                "scale and offset do not apply to bool values".to_string(),
            );
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            problem(
                "scale",
                format!(
                    "scale must be a finite number other than 0, not {}",
                    self.scale
                ),
            );
        }
        if !self.offset.is_finite() {
            problem(
                "offset",
                format!("offset must be a finite number, not {}", self.offset),
            );
        }
        if !out.is_empty() {
            return Err(out);
        }
        Ok(Register {
            field: self.field.clone(),
            function: self.function,
            // In range: checked above.
            address: u16::try_from(self.address).unwrap_or(0),
            ty,
            word_order: self.word_order.unwrap_or_default(),
            scale: self.scale,
            offset: self.offset,
        })
    }
}

/// Why one value could not be turned into a field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("field {field:?}: the answer holds {got} of the {want} registers or bits it needs")]
    Short {
        field: String,
        want: usize,
        got: usize,
    },
    #[error("field {field:?}: the value {value} cannot be sent (not a finite number)")]
    NotFinite { field: String, value: f64 },
}

/// A raw value before scaling.
#[derive(Debug, Clone, Copy)]
enum Raw {
    Int(i64),
    Float(f32),
}

impl Register {
    /// Registers (or bits) this value takes.
    pub fn width(&self) -> u16 {
        self.ty.width()
    }

    /// The field value from the words this register starts at (`words[0]` is its own
    /// register; only the first `width` are used).
    pub fn decode_words(&self, words: &[u16]) -> Result<Value, DecodeError> {
        let join = |a: u16, b: u16| {
            let (hi, lo) = match self.word_order {
                WordOrder::Big => (a, b),
                WordOrder::Little => (b, a),
            };
            (u32::from(hi) << 16) | u32::from(lo)
        };
        let raw = match (self.ty, words) {
            (ValueType::U16, [w, ..]) => Raw::Int(i64::from(*w)),
            (ValueType::I16, [w, ..]) => Raw::Int(i64::from(*w as i16)),
            (ValueType::U32, [a, b, ..]) => Raw::Int(i64::from(join(*a, *b))),
            (ValueType::I32, [a, b, ..]) => Raw::Int(i64::from(join(*a, *b) as i32)),
            (ValueType::F32, [a, b, ..]) => Raw::Float(f32::from_bits(join(*a, *b))),
            // A checked register never pairs bool with a register table.
            (ValueType::Bool, [w, ..]) => return Ok(Value::Bool(*w != 0)),
            _ => return Err(self.short(usize::from(self.width()), words.len())),
        };
        self.scaled(raw)
    }

    /// The field value from the bits this register starts at.
    pub fn decode_bits(&self, bits: &[bool]) -> Result<Value, DecodeError> {
        match bits.first() {
            Some(b) => Ok(Value::Bool(*b)),
            None => Err(self.short(1, 0)),
        }
    }

    fn short(&self, want: usize, got: usize) -> DecodeError {
        DecodeError::Short {
            field: self.field.clone(),
            want,
            got,
        }
    }

    fn scaled(&self, raw: Raw) -> Result<Value, DecodeError> {
        let identity = self.scale == 1.0 && self.offset == 0.0;
        let (x, raw_decimals) = match raw {
            Raw::Int(i) if identity => return Ok(Value::from(i)),
            Raw::Int(i) => (i as f64, Some(0)),
            // Through the f32's shortest decimal form: 0.1f32 is sent as 0.1, not as
            // the 0.10000000149011612 a plain widening would give.
            Raw::Float(f) => {
                let text = f.to_string();
                (text.parse().unwrap_or(f64::from(f)), decimals(&text))
            }
        };
        let value = if identity {
            x
        } else {
            let exact = x * self.scale + self.offset;
            let d = raw_decimals
                .zip(decimals(&self.scale.to_string()))
                .map(|(r, s)| r + s)
                .zip(decimals(&self.offset.to_string()))
                .map(|(p, o)| p.max(o));
            match d {
                Some(d) if d <= 15 && exact.is_finite() => {
                    format!("{exact:.*}", d as usize).parse().unwrap_or(exact)
                }
                _ => exact,
            }
        };
        Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| DecodeError::NotFinite {
                field: self.field.clone(),
                value,
            })
    }
}

/// Digits after the decimal point in a number's plain decimal text; `None` if the
/// text is not plain (`NaN`, `inf`).
fn decimals(text: &str) -> Option<u32> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    Some(
        digits
            .split_once('.')
            .map_or(0, |(_, frac)| frac.len() as u32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(text: &str) -> Register {
        let c: RegisterConfig = toml::from_str(text).unwrap();
        c.check().unwrap()
    }

    fn problems(text: &str) -> Vec<RegisterProblem> {
        let c: RegisterConfig = toml::from_str(text).unwrap();
        c.check().unwrap_err()
    }

    #[test]
    fn defaults_are_a_holding_u16_read_as_is() {
        let r = reg("field='t'\naddress=7");
        assert_eq!(
            (r.function, r.ty, r.word_order, r.scale, r.offset),
            (Function::Holding, ValueType::U16, WordOrder::Big, 1.0, 0.0)
        );
        assert_eq!(r.decode_words(&[65535]).unwrap(), Value::from(65535));
    }

    #[test]
    fn coils_and_discrete_inputs_default_to_bool() {
        let r = reg("field='door'\naddress=0\nfunction='discrete'");
        assert_eq!(r.ty, ValueType::Bool);
        assert_eq!(r.decode_bits(&[true, false]).unwrap(), Value::Bool(true));
        assert_eq!(r.decode_bits(&[false]).unwrap(), Value::Bool(false));
    }

    #[test]
    fn an_i16_register_reads_negative_numbers() {
        let r = reg("field='t'\naddress=0\ntype='i16'");
        assert_eq!(r.decode_words(&[0xFFEC]).unwrap(), Value::from(-20));
    }

    #[test]
    fn thirty_two_bit_values_follow_the_word_order() {
        let big = reg("field='e'\naddress=0\ntype='u32'");
        assert_eq!(
            big.decode_words(&[0x0001, 0x0002]).unwrap(),
            Value::from(0x0001_0002)
        );
        let little = reg("field='e'\naddress=0\ntype='u32'\nword_order='little'");
        assert_eq!(
            little.decode_words(&[0x0001, 0x0002]).unwrap(),
            Value::from(0x0002_0001)
        );
        let i = reg("field='e'\naddress=0\ntype='i32'");
        assert_eq!(i.decode_words(&[0xFFFF, 0xFFFE]).unwrap(), Value::from(-2));
    }

    #[test]
    fn an_f32_arrives_as_its_shortest_decimal() {
        let bits = 21.7f32.to_bits();
        let (hi, lo) = ((bits >> 16) as u16, bits as u16);
        let big = reg("field='t'\naddress=0\ntype='f32'");
        assert_eq!(
            big.decode_words(&[hi, lo]).unwrap(),
            serde_json::json!(21.7)
        );
        let little = reg("field='t'\naddress=0\ntype='f32'\nword_order='little'");
        assert_eq!(
            little.decode_words(&[lo, hi]).unwrap(),
            serde_json::json!(21.7)
        );
    }

    #[test]
    fn scale_and_offset_give_the_decimal_the_device_meant() {
        let r = reg("field='t'\naddress=0\nscale=0.1");
        assert_eq!(r.decode_words(&[3]).unwrap(), serde_json::json!(0.3));
        assert_eq!(r.decode_words(&[215]).unwrap(), serde_json::json!(21.5));
        let r = reg("field='t'\naddress=0\ntype='i16'\nscale=0.01\noffset=-40");
        assert_eq!(
            r.decode_words(&[(-1234i16) as u16]).unwrap(),
            serde_json::json!(-52.34)
        );
        let r = reg("field='t'\naddress=0\nscale=2.0\noffset=0.5");
        assert_eq!(r.decode_words(&[10]).unwrap(), serde_json::json!(20.5));
        let r = reg("field='t'\naddress=0\ntype='f32'\nscale=0.1");
        let bits = 21.7f32.to_bits();
        assert_eq!(
            r.decode_words(&[(bits >> 16) as u16, bits as u16]).unwrap(),
            serde_json::json!(2.17)
        );
    }

    #[test]
    fn a_scaled_integer_becomes_a_float_even_when_whole() {
        let r = reg("field='t'\naddress=0\nscale=2.0");
        let v = r.decode_words(&[10]).unwrap();
        assert!(v.is_f64(), "{v}");
        assert_eq!(v, serde_json::json!(20.0));
    }

    #[test]
    fn a_nan_or_infinite_f32_is_a_decode_error_not_a_panic() {
        let r = reg("field='t'\naddress=0\ntype='f32'");
        let nan = f32::NAN.to_bits();
        let err = r
            .decode_words(&[(nan >> 16) as u16, nan as u16])
            .unwrap_err();
        assert!(matches!(err, DecodeError::NotFinite { .. }), "{err}");
        let inf = f32::INFINITY.to_bits();
        let err = r
            .decode_words(&[(inf >> 16) as u16, inf as u16])
            .unwrap_err();
        assert!(matches!(err, DecodeError::NotFinite { .. }), "{err}");
        let r = reg("field='t'\naddress=0\ntype='f32'\nscale=1e300");
        let max = f32::MAX.to_bits();
        let err = r
            .decode_words(&[(max >> 16) as u16, max as u16])
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::NotFinite { .. }),
            "scaled past f64: {err}"
        );
    }

    #[test]
    fn too_few_words_is_a_decode_error_not_a_panic() {
        let r = reg("field='e'\naddress=0\ntype='u32'");
        assert_eq!(
            r.decode_words(&[1]).unwrap_err(),
            DecodeError::Short {
                field: "e".into(),
                want: 2,
                got: 1
            }
        );
        assert_eq!(
            r.decode_words(&[]).unwrap_err(),
            DecodeError::Short {
                field: "e".into(),
                want: 2,
                got: 0
            }
        );
        assert_eq!(
            reg("field='c'\naddress=0\nfunction='coil'")
                .decode_bits(&[])
                .unwrap_err(),
            DecodeError::Short {
                field: "c".into(),
                want: 1,
                got: 0
            }
        );
    }

    #[test]
    fn every_word_pattern_decodes_without_panicking() {
        let types = ["u16", "i16", "u32", "i32", "f32"];
        let mut rng = crate::serial::XorShift(0x5eed);
        for ty in types {
            for order in ["big", "little"] {
                for scale in ["1.0", "0.001", "1e-30", "3.7e20"] {
                    let text = if ty == "u16" || ty == "i16" {
                        format!("field='x'\naddress=0\ntype='{ty}'\nscale={scale}")
                    } else {
                        format!("field='x'\naddress=0\ntype='{ty}'\nword_order='{order}'\nscale={scale}")
                    };
                    let r = reg(&text);
                    for _ in 0..2000 {
                        let n = rng.next();
                        let _ = r.decode_words(&[n as u16, (n >> 16) as u16]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_32_bit_value_at_the_last_address_is_refused() {
        let p = problems("field='e'\naddress=65535\ntype='f32'");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "address");
        assert!(p[0].message.contains("two registers"), "{}", p[0].message);
        assert!(reg("field='e'\naddress=65534\ntype='f32'").address == 65534);
        assert!(reg("field='e'\naddress=65535").address == 65535);
    }

    #[test]
    fn out_of_range_addresses_are_refused() {
        for a in ["-1", "65536", "100000"] {
            let p = problems(&format!("field='e'\naddress={a}"));
            assert_eq!(p[0].key, "address", "{a}");
            assert!(p[0].message.contains("0 to 65535"), "{}", p[0].message);
        }
    }

    #[test]
    fn bits_take_only_bool_and_registers_never_bool() {
        let p = problems("field='c'\naddress=0\nfunction='coil'\ntype='u16'");
        assert_eq!(p[0].key, "type");
        assert!(p[0].message.contains("only be bool"), "{}", p[0].message);
        let p = problems("field='c'\naddress=0\nfunction='input'\ntype='bool'");
        assert_eq!(p[0].key, "type");
    }

    #[test]
    fn word_order_on_a_16_bit_type_and_scale_on_a_bool_are_refused() {
        let p = problems("field='c'\naddress=0\ntype='i16'\nword_order='little'");
        assert_eq!(p[0].key, "word_order");
        let p = problems("field='c'\naddress=0\nfunction='coil'\nscale=2.0");
        assert_eq!(p[0].key, "scale");
    }

    #[test]
    fn a_zero_scale_and_an_empty_field_are_refused_together() {
        let p = problems("field=' '\naddress=0\nscale=0.0");
        let keys: Vec<_> = p.iter().map(|p| p.key).collect();
        assert_eq!(keys, ["field", "scale"]);
    }

    #[test]
    fn decimals_counts_digits_after_the_point() {
        assert_eq!(decimals("0.1"), Some(1));
        assert_eq!(decimals("-40"), Some(0));
        assert_eq!(decimals("0.000001"), Some(6));
        assert_eq!(decimals("NaN"), None);
        assert_eq!(decimals("inf"), None);
    }
}
