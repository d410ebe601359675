//! The wire format: MessagePack for arguments and results, and its conversions from and to
//! JSON for the HTTP API and the CLI.
//!
//! Arguments are always encoded as one MessagePack array with an element per parameter, so a
//! typed call `fib(90)` and a JSON call `[90]` produce the same bytes and so the same
//! request identity. Integers are written in their smallest form whatever their Rust type,
//! which keeps `90u8`, `90i64` and JSON `90` identical too.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes a value as MessagePack (structs as arrays, the compact form).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, String> {
    rmp_serde::to_vec(value).map(Bytes::from).map_err(|e| e.to_string())
}

/// Decodes MessagePack into `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
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
    encode(args)
}

/// Converts a MessagePack value to JSON. Binary becomes an array of byte values, maps with
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
        rmpv::Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                J::from(u)
            } else if let Some(s) = i.as_i64() {
                J::from(s)
            } else {
                J::Null
            }
        }
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
        assert!(long.len() < 200, "long values are cut: {long}");
        assert!(explain_args(&[0xc1], &names, &checks).is_some(), "not MessagePack");
    }

    #[test]
    fn non_array_arguments_are_refused() {
        let err = json_args_to_msgpack(&serde_json::json!({"n": 1})).unwrap_err();
        assert!(err.contains("an object"), "{err}");
    }

    #[test]
    fn msgpack_to_json_round_trips_plain_data() {
        let value = serde_json::json!({"a": [1, -2, 2.5, "x", null, true], "b": 18446744073709551615u64});
        let bytes = encode(&value).unwrap();
        assert_eq!(msgpack_to_json(&bytes).unwrap(), value);
        assert!(msgpack_to_json(&[0x92, 0x01]).is_err(), "truncated array");
        assert!(msgpack_to_json(&[0x01, 0x02]).is_err(), "trailing bytes");
    }
}
