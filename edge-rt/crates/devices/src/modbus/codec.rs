//! Registers to values and back, as a [`Register`] map says: the data type
//! over one, two or four registers (or `count` of them for text and bytes),
//! byte order within a register, register order within a value, and
//! `value = raw * scale + offset`.
//!
//! Pure: the bus reads and writes 16-bit registers as the wire carries them
//! (big-endian, as tokio-modbus decodes them); everything about what they
//! mean is here, so it is tested without a device.

use heapless::Vec as Fixed;
use outrigger_proto::device::{DataType, Order, PropertyType, Register, Value};

/// The most registers one request reads or writes (the standard's 125 for
/// reads, 123 for writes; a value never spans more).
pub const MAX_WORDS: usize = 123;

/// Registers to write, in wire order.
pub type Words = Fixed<u16, MAX_WORDS>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("{got} registers where the value needs {want}")]
    Length { want: usize, got: usize },
    #[error("{value} does not fit a {data_type:?} register (raw {raw})")]
    OutOfRange {
        value: String,
        data_type: DataType,
        raw: f64,
    },
    #[error("a {value_type} value cannot go into a {data_type:?} register")]
    Type {
        value_type: &'static str,
        data_type: DataType,
    },
    #[error("the text is {len} bytes; the registers hold {max}")]
    TooLong { len: usize, max: usize },
}

/// The bytes of `words` in value order: register order, then the order in
/// each register, undone.
fn bytes_of(r: &Register, words: &[u16]) -> Fixed<u8, { MAX_WORDS * 2 }> {
    let mut out = Fixed::new();
    let reorder = r.word_order == Order::LittleEndian && r.data_type.numeric();
    let mut push = |w: u16| {
        let b = match r.byte_order {
            Order::BigEndian => w.to_be_bytes(),
            Order::LittleEndian => w.to_le_bytes(),
        };
        // Capacity is MAX_WORDS * 2 and callers pass at most MAX_WORDS.
        let _ = out.extend_from_slice(&b);
    };
    if reorder {
        words.iter().rev().for_each(|w| push(*w));
    } else {
        words.iter().for_each(|w| push(*w));
    }
    out
}

/// `bytes` (value order) back into registers in wire order.
fn words_of(r: &Register, bytes: &[u8]) -> Words {
    let mut out = Words::new();
    for c in bytes.chunks(2) {
        let pair = [c[0], c.get(1).copied().unwrap_or(0)];
        let w = match r.byte_order {
            Order::BigEndian => u16::from_be_bytes(pair),
            Order::LittleEndian => u16::from_le_bytes(pair),
        };
        let _ = out.push(w);
    }
    if r.word_order == Order::LittleEndian && r.data_type.numeric() {
        out.reverse();
    }
    out
}

fn raw(r: &Register, b: &[u8]) -> f64 {
    let a = |n: usize| -> [u8; 8] {
        let mut x = [0u8; 8];
        x[8 - n..].copy_from_slice(&b[..n]);
        x
    };
    match r.data_type {
        DataType::Int16 => f64::from(i16::from_be_bytes([b[0], b[1]])),
        DataType::Uint16 | DataType::Bool => f64::from(u16::from_be_bytes([b[0], b[1]])),
        DataType::Int32 => f64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Uint32 => f64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Int64 => i64::from_be_bytes(a(8)) as f64,
        DataType::Uint64 => u64::from_be_bytes(a(8)) as f64,
        DataType::Float32 => f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Float64 => f64::from_be_bytes(a(8)),
        DataType::String | DataType::Bytes => 0.0,
    }
}

/// The value of registers `words` (exactly the ones the map spans).
pub fn decode(r: &Register, ty: PropertyType, words: &[u16]) -> Result<Value, CodecError> {
    let want = usize::from(r.data_type.registers(r.count));
    if words.len() != want || want > MAX_WORDS {
        return Err(CodecError::Length {
            want,
            got: words.len(),
        });
    }
    let bytes = bytes_of(r, words);
    match r.data_type {
        DataType::String => {
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            return Ok(Value::String(
                String::from_utf8_lossy(&bytes[..end]).into_owned(),
            ));
        }
        DataType::Bytes => return Ok(Value::Bytes(bytes.to_vec())),
        _ => {}
    }
    let v = tidy(r, raw(r, &bytes));
    Ok(match ty {
        PropertyType::Bool => Value::Bool(v != 0.0),
        PropertyType::Int => Value::Int(v.round() as i64),
        PropertyType::Float => Value::Float(v),
        // A number shown as text (a model that says string for a counter).
        PropertyType::String => Value::String(Value::Float(v).to_string()),
        PropertyType::Bytes => Value::Bytes(bytes.to_vec()),
    })
}

/// `raw * scale + offset` without binary noise: as many decimals as the
/// scale and offset have (215 * 0.1 is 21.5, not 21.500000000000004), and a
/// float32 as its shortest decimal (0.1f32 is 0.1).
fn tidy(r: &Register, raw: f64) -> f64 {
    if r.scale == 1.0 && r.offset == 0.0 {
        if r.data_type == DataType::Float32 {
            return (raw as f32).to_string().parse().unwrap_or(raw);
        }
        return raw;
    }
    let v = raw * r.scale + r.offset;
    let decimals = |x: f64| {
        let t = x.abs().to_string();
        t.split_once('.').map_or(0, |(_, d)| d.len()).min(12) as i32
    };
    let d = decimals(r.scale).max(decimals(r.offset));
    let f = 10f64.powi(d);
    let rounded = (v * f).round() / f;
    if rounded.is_finite() {
        rounded
    } else {
        v
    }
}

/// The registers that hold `value`.
pub fn encode(r: &Register, value: &Value) -> Result<Words, CodecError> {
    let dt = r.data_type;
    match (dt, value) {
        (DataType::String, Value::String(s)) => return fixed(r, s.as_bytes()),
        (DataType::Bytes, Value::Bytes(b)) => return fixed(r, b),
        (DataType::String | DataType::Bytes, v) | (_, v @ (Value::String(_) | Value::Bytes(_))) => {
            return Err(CodecError::Type {
                value_type: kind(v),
                data_type: dt,
            })
        }
        _ => {}
    }
    let v = value.as_f64().unwrap_or_default();
    let raw = (v - r.offset) / r.scale;
    let out_of_range = || CodecError::OutOfRange {
        value: value.to_string(),
        data_type: dt,
        raw,
    };
    let int = |lo: f64, hi: f64| -> Result<f64, CodecError> {
        let x = raw.round();
        if !(lo..=hi).contains(&x) {
            return Err(out_of_range());
        }
        Ok(x)
    };
    let mut b: Fixed<u8, 8> = Fixed::new();
    let put = |b: &mut Fixed<u8, 8>, s: &[u8]| {
        let _ = b.extend_from_slice(s);
    };
    match dt {
        DataType::Bool => put(&mut b, &u16::from(raw != 0.0).to_be_bytes()),
        DataType::Int16 => put(&mut b, &(int(-32768.0, 32767.0)? as i16).to_be_bytes()),
        DataType::Uint16 => put(&mut b, &(int(0.0, 65535.0)? as u16).to_be_bytes()),
        DataType::Int32 => put(
            &mut b,
            &(int(i32::MIN.into(), i32::MAX.into())? as i32).to_be_bytes(),
        ),
        DataType::Uint32 => put(&mut b, &(int(0.0, u32::MAX.into())? as u32).to_be_bytes()),
        DataType::Int64 => put(
            &mut b,
            &(int(i64::MIN as f64, i64::MAX as f64)? as i64).to_be_bytes(),
        ),
        DataType::Uint64 => put(&mut b, &(int(0.0, u64::MAX as f64)? as u64).to_be_bytes()),
        DataType::Float32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(out_of_range());
            }
            put(&mut b, &(raw as f32).to_be_bytes())
        }
        DataType::Float64 => put(&mut b, &raw.to_be_bytes()),
        // Text and bytes were written above.
        DataType::String | DataType::Bytes => {}
    }
    Ok(words_of(r, &b))
}

fn fixed(r: &Register, b: &[u8]) -> Result<Words, CodecError> {
    let max = usize::from(r.data_type.registers(r.count)) * 2;
    if b.len() > max || max > MAX_WORDS * 2 {
        return Err(CodecError::TooLong { len: b.len(), max });
    }
    // NUL-padded to the registers it spans.
    let mut padded: Fixed<u8, { MAX_WORDS * 2 }> = Fixed::new();
    let _ = padded.extend_from_slice(b);
    while padded.len() < max {
        let _ = padded.push(0);
    }
    Ok(words_of(r, &padded))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::device::Table;

    fn reg(dt: DataType) -> Register {
        Register {
            table: Table::HoldingRegister,
            address: 0,
            data_type: dt,
            count: None,
            byte_order: Order::BigEndian,
            word_order: Order::BigEndian,
            scale: 1.0,
            offset: 0.0,
        }
    }

    #[test]
    fn a_float32_in_every_order() {
        // 21.5f32 = 0x41AC0000.
        let mut r = reg(DataType::Float32);
        let v = Value::Float(21.5);
        assert_eq!(&encode(&r, &v).unwrap()[..], &[0x41AC, 0x0000]);
        assert_eq!(decode(&r, PropertyType::Float, &[0x41AC, 0]).unwrap(), v);
        r.word_order = Order::LittleEndian;
        assert_eq!(&encode(&r, &v).unwrap()[..], &[0x0000, 0x41AC]);
        assert_eq!(decode(&r, PropertyType::Float, &[0, 0x41AC]).unwrap(), v);
        r.byte_order = Order::LittleEndian;
        assert_eq!(&encode(&r, &v).unwrap()[..], &[0x0000, 0xAC41]);
        assert_eq!(decode(&r, PropertyType::Float, &[0, 0xAC41]).unwrap(), v);
    }

    #[test]
    fn scale_and_offset_both_ways() {
        let mut r = reg(DataType::Int16);
        r.scale = 0.1;
        r.offset = -40.0;
        // raw 615 -> 21.5
        let v = decode(&r, PropertyType::Float, &[615]).unwrap();
        assert!(
            matches!(v, Value::Float(x) if (x - 21.5).abs() < 1e-9),
            "{v:?}"
        );
        assert_eq!(&encode(&r, &Value::Float(21.5)).unwrap()[..], &[615]);
        // Negative raw values are two's complement in the register.
        assert_eq!(
            &encode(&r, &Value::Float(-50.0)).unwrap()[..],
            &[(-100i16) as u16]
        );
        assert_eq!(
            decode(&r, PropertyType::Int, &[(-100i16) as u16]).unwrap(),
            Value::Int(-50)
        );
    }

    #[test]
    fn what_does_not_fit_is_refused_not_wrapped() {
        let r = reg(DataType::Uint16);
        assert!(matches!(
            encode(&r, &Value::Int(70000)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&r, &Value::Int(-1)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&r, &Value::String("x".into())),
            Err(CodecError::Type { .. })
        ));
        assert!(matches!(
            decode(&r, PropertyType::Int, &[1, 2]),
            Err(CodecError::Length { want: 1, got: 2 })
        ));
    }

    #[test]
    fn wide_integers_and_text() {
        let r = reg(DataType::Uint32);
        assert_eq!(&encode(&r, &Value::Int(0x0001_0002)).unwrap()[..], &[1, 2]);
        assert_eq!(
            decode(&r, PropertyType::Int, &[1, 2]).unwrap(),
            Value::Int(65538)
        );
        let r64 = reg(DataType::Int64);
        let w = encode(&r64, &Value::Int(-2)).unwrap();
        assert_eq!(&w[..], &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]);
        assert_eq!(decode(&r64, PropertyType::Int, &w).unwrap(), Value::Int(-2));
        let mut s = reg(DataType::String);
        s.count = Some(3);
        let w = encode(&s, &Value::String("pump".into())).unwrap();
        assert_eq!(&w[..], &[0x7075, 0x6D70, 0x0000]);
        assert_eq!(
            decode(&s, PropertyType::String, &w).unwrap(),
            Value::String("pump".into())
        );
        assert!(matches!(
            encode(&s, &Value::String("too long!".into())),
            Err(CodecError::TooLong { len: 9, max: 6 })
        ));
    }

    #[test]
    fn decoded_numbers_carry_no_binary_noise() {
        let mut r = reg(DataType::Uint16);
        r.scale = 0.1;
        assert_eq!(
            decode(&r, PropertyType::Float, &[215]).unwrap().to_string(),
            "21.5"
        );
        let f = reg(DataType::Float32);
        let w = encode(&f, &Value::Float(0.1)).unwrap();
        assert_eq!(
            decode(&f, PropertyType::Float, &w).unwrap().to_string(),
            "0.1"
        );
    }

    #[test]
    fn a_bool_in_a_register_is_not_zero() {
        let r = reg(DataType::Uint16);
        assert_eq!(
            decode(&r, PropertyType::Bool, &[7]).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            decode(&r, PropertyType::Bool, &[0]).unwrap(),
            Value::Bool(false)
        );
        assert_eq!(&encode(&r, &Value::Bool(true)).unwrap()[..], &[1]);
    }
}
