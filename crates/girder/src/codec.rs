//! The wire format: MessagePack for arguments and results, and its conversions from and to
//! JSON for the HTTP API and the CLI.
//!
//! Arguments are always encoded as one MessagePack array with an element per parameter, in
//! the canonical form of [`encode_canonical`], so a typed call `fib(90)` and a JSON call
//! `[90]` produce the same bytes and so the same request identity, and so do a Rust struct
//! and the same JSON object. Integers are written in their smallest form whatever their
//! Rust type, which keeps `90u8`, `90i64` and JSON `90` (and `90.0`) identical too.
//!
//! Integers beyond ±[`JSON_EXACT_INT_MAX`] (2^53), where a JSON parser that reads numbers as
//! 64-bit floats would round them, are written as their decimal text: in the canonical
//! MessagePack form as in JSON. So `u64::MAX` from Rust, the JSON number
//! `18446744073709551615` and the JSON string `"18446744073709551615"` are one identity, a
//! `u128` of any size has a JSON form, and a client can send back what it received.
//! [`decode`] reads that text (and only that exact text) into any integer type.

mod canon;
mod lenient;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes a value as MessagePack (structs as arrays, the compact form).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, String> {
    rmp_serde::to_vec(value).map(Bytes::from).map_err(|e| e.to_string())
}

/// Encodes arguments or a result in girder's canonical form, the one their identity is
/// computed from: structs as maps of field names, every map's keys sorted (by their
/// encoding), and one representation per number (a float with an integral value, like `1.0`,
/// is the integer `1`; other floats are 64-bit). So a Rust struct and the same JSON object
/// (any key order, `1` or `1.0`) are the same request, and results read as JSON keep their
/// field names.
///
/// Integers beyond ±[`JSON_EXACT_INT_MAX`] are written as their decimal text (a `u128` or an
/// `i128` within that range as a plain integer); [`decode`] reads them back into any
/// integer type.
pub fn encode_canonical<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, String> {
    // Integers are made canonical on the typed value: in the bytes, a `u128` (16 bytes of
    // binary) looks like any 16-byte buffer.
    let named = rmp_serde::to_vec_named(&canon::Canon(value, canon::Mode::Identity)).map_err(|e| e.to_string())?;
    // Only maps and floats have anything to canonicalize, and each starts with its marker
    // byte: without any such byte (data bytes may match too: then the slow path), the
    // encoding is canonical already.
    if !named.iter().any(|b| matches!(b, 0x80..=0x8f | 0xde | 0xdf | 0xca | 0xcb)) {
        return Ok(Bytes::from(named));
    }
    canonicalize(&named)
}

/// Encodes a function's result: structs as maps of field names (so its JSON form keeps
/// them), integers as MessagePack integers wherever one holds them (`u128`/`i128` beyond
/// the 64-bit range as their decimal text, which [`decode`] reads back). A result has no
/// identity to keep canonical, so it keeps the bytes Rust callers have always read, which
/// also decode where serde buffers values (internally tagged enums, `#[serde(flatten)]`);
/// [`msgpack_to_json`] writes the integers beyond ±[`JSON_EXACT_INT_MAX`] as text.
pub fn encode_result<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, String> {
    rmp_serde::to_vec_named(&canon::Canon(value, canon::Mode::Result)).map(Bytes::from).map_err(|e| e.to_string())
}

/// The canonical form (see [`encode_canonical`]) of well-formed MessagePack bytes.
fn canonicalize(bytes: &[u8]) -> Result<Bytes, String> {
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader).map_err(|e| e.to_string())?;
    if !reader.is_empty() {
        return Err(format!("{} trailing bytes after the value", reader.len()));
    }
    let mut out = Vec::with_capacity(bytes.len());
    rmpv::encode::write_value(&mut out, &canonical(value)).map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

/// Largest magnitude of an integer written as a number, in the canonical form and in JSON:
/// 2^53. Every integer up to it is exactly a 64-bit float, so any JSON parser reads it
/// exactly; larger ones are written as their decimal text (`"9007199254740993"`).
pub const JSON_EXACT_INT_MAX: u64 = 1 << 53;

/// [`JSON_EXACT_INT_MAX`] as a float (exact).
const EXACT_FLOAT_INT_MAX: f64 = JSON_EXACT_INT_MAX as f64;

/// Whether an integer is written as a number (within ±[`JSON_EXACT_INT_MAX`]).
fn is_exact(int: rmpv::Integer) -> bool {
    int.as_u64().or_else(|| int.as_i64().map(i64::unsigned_abs)).is_some_and(|n| n <= JSON_EXACT_INT_MAX)
}

/// An integer in canonical form: itself within ±[`JSON_EXACT_INT_MAX`], else its decimal text.
fn canonical_int(int: rmpv::Integer) -> rmpv::Value {
    if is_exact(int) {
        rmpv::Value::Integer(int)
    } else {
        rmpv::Value::from(int.to_string())
    }
}

fn canonical(value: rmpv::Value) -> rmpv::Value {
    use rmpv::Value as V;
    match value {
        V::Integer(int) => canonical_int(int),
        V::F32(f) => canonical(V::F64(f64::from(f))),
        // Integral floats within the exactly representable range become integers.
        V::F64(f) if f.fract() == 0.0 && f.abs() <= EXACT_FLOAT_INT_MAX => {
            if f >= 0.0 {
                V::from(f as u64)
            } else {
                V::from(f as i64)
            }
        }
        V::Array(items) => V::Array(items.into_iter().map(canonical).collect()),
        V::Map(pairs) => {
            let mut keyed: Vec<(Vec<u8>, (V, V))> = pairs
                .into_iter()
                .map(|(k, v)| {
                    let k = canonical(k);
                    let mut key = Vec::new();
                    // Writing to a Vec cannot fail.
                    let _ = rmpv::encode::write_value(&mut key, &k);
                    (key, (k, canonical(v)))
                })
                .collect();
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            V::Map(keyed.into_iter().map(|(_, pair)| pair).collect())
        }
        other => other,
    }
}

/// Decodes MessagePack into `T`. Any integer type reads a MessagePack integer, the canonical
/// decimal text of an integer beyond ±[`JSON_EXACT_INT_MAX`] (as [`encode_canonical`] and
/// JSON callers write it; other text, like `"5"` or `"+9007199254740993"`, is refused), and
/// for `u128`/`i128` the 16 bytes rmp_serde writes. A negative integer is refused for an
/// unsigned type (rmp_serde alone would wrap `-1` into `u128::MAX`).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    T::deserialize(lenient::Lenient(&mut deserializer)).map_err(|e| e.to_string())
}

/// Encodes a JSON array of arguments as a MessagePack argument array.
///
/// Fails when `args` is not an array: every call takes a list of arguments, even an empty one.
pub fn json_args_to_msgpack(args: &serde_json::Value) -> Result<Bytes, String> {
    if !args.is_array() {
        return Err(format!(
            "arguments must be a JSON array with one element per parameter, got {}",
            json_type_name(args)
        ));
    }
    encode_canonical(args)
}

/// Converts a MessagePack value to JSON. Integers beyond ±[`JSON_EXACT_INT_MAX`] become
/// strings of their decimal value, binary becomes an array of byte values, maps with
/// non-string keys get their keys rendered as JSON text.
pub fn msgpack_to_json(bytes: &[u8]) -> Result<serde_json::Value, String> {
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader).map_err(|e| e.to_string())?;
    if !reader.is_empty() {
        return Err(format!("{} trailing bytes after the value", reader.len()));
    }
    Ok(value_to_json(value))
}

fn value_to_json(value: rmpv::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        rmpv::Value::Nil => J::Null,
        rmpv::Value::Boolean(b) => J::Bool(b),
        rmpv::Value::Integer(i) if !is_exact(i) => J::String(i.to_string()),
        rmpv::Value::Integer(i) => i.as_u64().map(J::from).or_else(|| i.as_i64().map(J::from)).unwrap_or(J::Null),
        rmpv::Value::F32(f) => serde_json::Number::from_f64(f64::from(f)).map_or(J::Null, J::Number),
        rmpv::Value::F64(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        rmpv::Value::String(s) => match s.into_str() {
            Some(text) => J::String(text),
            None => J::Null,
        },
        rmpv::Value::Binary(b) => J::Array(b.into_iter().map(J::from).collect()),
        rmpv::Value::Array(items) => J::Array(items.into_iter().map(value_to_json).collect()),
        rmpv::Value::Map(pairs) => {
            let mut map = serde_json::Map::new();
            for (k, v) in pairs {
                let key = match k {
                    rmpv::Value::String(s) => s.into_str().unwrap_or_default(),
                    other => value_to_json(other).to_string(),
                };
                map.insert(key, value_to_json(v));
            }
            J::Object(map)
        }
        rmpv::Value::Ext(tag, data) => J::Array(vec![J::from(tag), J::Array(data.into_iter().map(J::from).collect())]),
    }
}

/// Checks one encoded argument against its parameter's type ([`check_one`]).
pub type ArgCheck = fn(&[u8]) -> Result<(), String>;

/// Checks that one encoded argument decodes as `T`; the error names `T`.
pub fn check_one<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), String> {
    decode::<T>(bytes).map(|_| ()).map_err(|e| format!("expected {}: {e}", std::any::type_name::<T>()))
}

/// Most characters of an argument quoted back in an error.
const QUOTED_CHARS_MAX: usize = 80;

/// Why an argument array does not decode, naming the parameter: `names` are the parameters
/// in order, `checks` decode one encoded argument each ([`check_one`]). `None` when every
/// argument decodes on its own (the caller's own error is then as good as any).
pub fn explain_args(args: &[u8], names: &[&str], checks: &[ArgCheck]) -> Option<String> {
    let mut reader = args;
    let items = match rmpv::decode::read_value(&mut reader) {
        Ok(rmpv::Value::Array(items)) => items,
        Ok(other) => return Some(format!("the arguments must be an array, got {}", quote(other))),
        Err(err) => return Some(format!("the arguments are not MessagePack: {err}")),
    };
    if items.len() != names.len() {
        let plural = if names.len() == 1 { "" } else { "s" };
        return Some(format!("expected {} argument{plural} ({}), got {}", names.len(), names.join(", "), items.len()));
    }
    for (index, ((item, name), check)) in items.into_iter().zip(names).zip(checks).enumerate() {
        let mut bytes = Vec::new();
        if rmpv::encode::write_value(&mut bytes, &item).is_err() {
            continue;
        }
        if let Err(err) = check(&bytes) {
            return Some(format!("parameter {} `{name}`: {err}; got {}", index + 1, quote(item)));
        }
    }
    None
}

/// A value as short JSON text, for error messages.
fn quote(value: rmpv::Value) -> String {
    let text = value_to_json(value).to_string();
    match text.char_indices().nth(QUOTED_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_and_json_arguments_encode_alike() {
        let typed = encode(&(90u64,)).unwrap();
        let typed_i64 = encode(&(90i64,)).unwrap();
        let json = json_args_to_msgpack(&serde_json::json!([90])).unwrap();
        assert_eq!(typed, json);
        assert_eq!(typed_i64, json);
        let two = encode(&(3u32, "x")).unwrap();
        assert_eq!(two, json_args_to_msgpack(&serde_json::json!([3, "x"])).unwrap());
        let none: [u8; 0] = [];
        assert_eq!(encode(&none).unwrap(), json_args_to_msgpack(&serde_json::json!([])).unwrap());
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Reading {
        label: String,
        celsius: f64,
        count: u32,
        tags: std::collections::BTreeMap<String, f32>,
    }

    #[test]
    fn structs_and_json_objects_are_one_canonical_encoding() {
        let reading = Reading { label: "a".into(), celsius: 21.0, count: 3, tags: [("z".into(), 1.5)].into() };
        let typed = encode_canonical(&(reading,)).unwrap();
        // Another key order, and 21 for 21.0: the same bytes, so the same request.
        let json = serde_json::json!([{"tags": {"z": 1.5}, "count": 3, "celsius": 21, "label": "a"}]);
        assert_eq!(typed, json_args_to_msgpack(&json).unwrap());
        let json_float = serde_json::json!([{"count": 3.0, "label": "a", "celsius": 21.0, "tags": {"z": 1.5}}]);
        assert_eq!(typed, json_args_to_msgpack(&json_float).unwrap());
        // And it decodes back, floats from integers included; as JSON it keeps field names.
        let (back,): (Reading,) = decode(&typed).unwrap();
        assert_eq!(back.celsius, 21.0);
        assert_eq!(msgpack_to_json(&typed).unwrap()[0]["label"], "a");
        // Non-integral and huge floats stay floats; integers keep their value.
        let values = encode_canonical(&(0.5f64, 1e300f64, u64::MAX, -7i64)).unwrap();
        assert_eq!(decode::<(f64, f64, u64, i64)>(&values).unwrap(), (0.5, 1e300, u64::MAX, -7));
        assert_eq!(canonicalize(&typed).unwrap(), typed, "canonical is a fixed point");
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(tag = "kind")]
    enum Event {
        Tick { at_ns: u64, offset: i64 },
    }

    #[test]
    fn results_keep_msgpack_integers_and_read_as_json_text() {
        let event = Event::Tick { at_ns: u64::MAX, offset: i64::MIN };
        let bytes = encode_result(&event).unwrap();
        // serde reads an internally tagged enum through its own buffer, where only a
        // MessagePack integer is an integer: results keep them.
        assert_eq!(decode::<Event>(&bytes).unwrap(), event);
        let json =
            serde_json::json!({"kind": "Tick", "at_ns": "18446744073709551615", "offset": "-9223372036854775808"});
        assert_eq!(msgpack_to_json(&bytes).unwrap(), json);
        assert_eq!(encode_result(&(u64::MAX, -7i64)).unwrap(), encode(&(u64::MAX, -7i64)).unwrap());
        assert_eq!(encode_result(&(7u128, -7i128)).unwrap(), encode(&(7u64, -7i64)).unwrap());
        let wide = encode_result(&(u128::MAX, i128::MIN)).unwrap();
        assert_eq!(decode::<(u128, i128)>(&wide).unwrap(), (u128::MAX, i128::MIN));
        assert_eq!(msgpack_to_json(&wide).unwrap(), serde_json::json!([U128_MAX_TEXT, i128::MIN.to_string()]));
    }

    const U128_MAX_TEXT: &str = "340282366920938463463374607431768211455";

    #[test]
    fn arguments_write_integers_beyond_two_to_the_53_as_text() {
        let args = encode_canonical(&(u64::MAX, u128::MAX, 1u128 << 53, -(1i128 << 53) - 1, 7u128)).unwrap();
        let json = serde_json::json!(["18446744073709551615", U128_MAX_TEXT, 1u64 << 53, "-9007199254740993", 7]);
        assert_eq!(msgpack_to_json(&args).unwrap(), json);
        assert_eq!(json_args_to_msgpack(&json).unwrap(), args, "the JSON form is the same request");
        let numbers = serde_json::json!([u64::MAX, U128_MAX_TEXT, 1u64 << 53, -(1i64 << 53) - 1, 7]);
        assert_eq!(json_args_to_msgpack(&numbers).unwrap(), args, "and so are exact JSON numbers");
        let back: (u64, u128, u128, i128, u128) = decode(&args).unwrap();
        assert_eq!(back, (u64::MAX, u128::MAX, 1 << 53, -(1 << 53) - 1, 7));
        // rmp_serde's own 16 bytes for a u128 (results stored before) still decode.
        assert_eq!(decode::<(u128,)>(&rmp_serde::to_vec(&(u128::MAX,)).unwrap()).unwrap(), (u128::MAX,));
        assert!(decode::<(u128,)>(&encode(&(-1i64,)).unwrap()).is_err(), "-1 is no u128");
        assert!(decode::<(u64,)>(&encode(&("5",)).unwrap()).unwrap_err().contains("sent as a number"));
    }

    #[test]
    fn bad_arguments_are_explained_by_parameter() {
        let names = ["n", "label"];
        let checks: [ArgCheck; 2] = [check_one::<u64>, check_one::<String>];
        let explain = |json: serde_json::Value| explain_args(&encode(&json).unwrap(), &names, &checks);
        let wrong = explain(serde_json::json!([1, 2])).unwrap();
        assert!(
            wrong.contains("parameter 2 `label`") && wrong.contains("String") && wrong.ends_with("got 2"),
            "{wrong}"
        );
        let wrong = explain(serde_json::json!(["x", "y"])).unwrap();
        assert!(wrong.contains("parameter 1 `n`") && wrong.contains("u64") && wrong.contains("got \"x\""), "{wrong}");
        assert_eq!(explain(serde_json::json!([1])).unwrap(), "expected 2 arguments (n, label), got 1");
        assert_eq!(explain(serde_json::json!([1, "ok"])), None);
        let long = explain(serde_json::json!(["y".repeat(500), "ok"])).unwrap();
        assert!(long.len() < 300 && !long.contains(&"y".repeat(100)), "long values are cut: {long}");
        assert!(explain_args(&[0xc1], &names, &checks).is_some(), "not MessagePack");
    }

    #[test]
    fn non_array_arguments_are_refused() {
        let err = json_args_to_msgpack(&serde_json::json!({"n": 1})).unwrap_err();
        assert!(err.contains("an object"), "{err}");
    }

    #[test]
    fn msgpack_to_json_round_trips_plain_data() {
        let value = serde_json::json!({"a": [1, -2, 2.5, "x", null, true], "b": 9007199254740992u64});
        let bytes = encode(&value).unwrap();
        assert_eq!(msgpack_to_json(&bytes).unwrap(), value);
        // Beyond 2^53, integers are their decimal text, whatever encoded them.
        let big = encode(&(u64::MAX, i64::MIN, -9007199254740992i64, 9007199254740993u64)).unwrap();
        let expected = serde_json::json!([
            "18446744073709551615",
            "-9223372036854775808",
            -9007199254740992i64,
            "9007199254740993"
        ]);
        assert_eq!(msgpack_to_json(&big).unwrap(), expected);
        assert!(msgpack_to_json(&[0x92, 0x01]).is_err(), "truncated array");
        assert!(msgpack_to_json(&[0x01, 0x02]).is_err(), "trailing bytes");
    }
}
