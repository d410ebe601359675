//! A deserializer adapter that reads integers in every form girder writes or once wrote:
//! MessagePack integers, the canonical decimal text of integers beyond ±2^53 (see
//! [`super::JSON_EXACT_INT_MAX`]), and the 16 bytes of binary rmp_serde writes for `u128`
//! and `i128`. Everything else passes through unchanged.
//!
//! Only the canonical text is read as an integer: `"5"`, `"007"` or `"+9007199254740993"`
//! are refused, because a value sent in two forms would be two request identities.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, Unexpected, Visitor};

use super::JSON_EXACT_INT_MAX;

/// A deserializer, visitor, seed or access whose integers are read leniently.
pub(super) struct Lenient<T>(pub(super) T);

macro_rules! plain {
    ($($method:ident),*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method(Lenient(visitor))
        })*
    };
}

macro_rules! int {
    ($($method:ident => $wide:expr),*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            // `deserialize_any`: the typed entry points of rmp_serde refuse a string marker
            // before any visitor could read it.
            self.0.deserialize_any(Int { visitor, wide: $wide })
        })*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Lenient<D> {
    type Error = D::Error;

    plain!(
        deserialize_any,
        deserialize_bool,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    int!(
        deserialize_i8 => None,
        deserialize_i16 => None,
        deserialize_i32 => None,
        deserialize_i64 => None,
        deserialize_u8 => None,
        deserialize_u16 => None,
        deserialize_u32 => None,
        deserialize_u64 => None,
        deserialize_i128 => Some(Wide::Signed),
        deserialize_u128 => Some(Wide::Unsigned)
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, Lenient(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, Lenient(visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, Lenient(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, Lenient(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, Lenient(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, Lenient(visitor))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! visit {
    ($($method:ident($ty:ty)),*) => {
        $(fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.0.$method(v)
        })*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Lenient<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>)
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Lenient(deserializer))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(Lenient(deserializer))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(Lenient(seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Lenient(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(Lenient(data))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Lenient<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Lenient(deserializer))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Lenient<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Lenient(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Lenient<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Lenient(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Lenient(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Lenient<A> {
    type Error = A::Error;
    type Variant = Lenient<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        self.0.variant_seed(Lenient(seed)).map(|(value, variant)| (value, Lenient(variant)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Lenient<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Lenient(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Lenient(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Lenient(visitor))
    }
}

/// Which 128-bit type reads 16 bytes of binary (the form rmp_serde writes).
#[derive(Clone, Copy)]
enum Wide {
    Signed,
    Unsigned,
}

/// Reads an integer into `visitor` (the integer type's own, which checks the range) from a
/// MessagePack integer, canonical decimal text, or, for a 128-bit type, 16 bytes.
struct Int<V> {
    visitor: V,
    wide: Option<Wide>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Int<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.visitor.expecting(f)?;
        f.write_str(" (a number, or a decimal string beyond ±2^53)")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V::Value, E> {
        self.visitor.visit_i64(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V::Value, E> {
        self.visitor.visit_u64(v)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<V::Value, E> {
        self.visitor.visit_i128(v)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<V::Value, E> {
        self.visitor.visit_u128(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        match parse_canonical(v) {
            Ok(Parsed::Unsigned(n)) => match u64::try_from(n) {
                Ok(small) => self.visitor.visit_u64(small),
                Err(_) => self.visitor.visit_u128(n),
            },
            Ok(Parsed::Signed(n)) => match i64::try_from(n) {
                Ok(small) => self.visitor.visit_i64(small),
                Err(_) => self.visitor.visit_i128(n),
            },
            Err(NotCanonical::Small) => Err(E::custom(format_args!(
                "\"{v}\" is an integer within ±2^53, which is sent as a number: {v}, not \"{v}\""
            ))),
            Err(NotCanonical::TooLarge) => {
                Err(E::invalid_value(Unexpected::Other(&quoted(v)), &"an integer within ±(2^128 − 1)"))
            }
            Err(NotCanonical::Text) => Err(E::invalid_type(Unexpected::Other(&quoted(v)), &self)),
        }
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        match (self.wide, <[u8; 16]>::try_from(v)) {
            (Some(Wide::Unsigned), Ok(bytes)) => self.visitor.visit_u128(u128::from_be_bytes(bytes)),
            (Some(Wide::Signed), Ok(bytes)) => self.visitor.visit_i128(i128::from_be_bytes(bytes)),
            _ => Err(E::invalid_type(Unexpected::Bytes(v), &self)),
        }
    }
}

/// Most characters of a string quoted back in an error.
const QUOTED_CHARS_MAX: usize = 24;

/// `string "..."`, cut to [`QUOTED_CHARS_MAX`] characters: the text is outside input.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS_MAX) {
        Some((cut, _)) => format!("string {:?}...", &text[..cut]),
        None => format!("string {text:?}"),
    }
}

/// An integer read from its canonical text.
#[derive(Debug, PartialEq)]
enum Parsed {
    Unsigned(u128),
    Signed(i128),
}

/// Why a string is not the canonical text of an integer.
#[derive(Debug, PartialEq)]
enum NotCanonical {
    /// Canonical digits, but of an integer that is written as a number.
    Small,
    /// Canonical digits beyond the 128-bit range.
    TooLarge,
    /// Not canonical digits at all (a sign `+`, leading zeros, other characters).
    Text,
}

/// Most characters of the canonical text of a 128-bit integer (`i128::MIN`).
const INT_TEXT_CHARS_MAX: usize = 40;

/// Reads `-?[1-9][0-9]*` with a magnitude beyond [`JSON_EXACT_INT_MAX`].
fn parse_canonical(text: &str) -> Result<Parsed, NotCanonical> {
    if text == "0" {
        return Err(NotCanonical::Small);
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0') && !digits.is_empty();
    if !canonical {
        return Err(NotCanonical::Text);
    }
    if text.len() > INT_TEXT_CHARS_MAX {
        return Err(NotCanonical::TooLarge);
    }
    let magnitude: u128 = digits.parse().map_err(|_| NotCanonical::TooLarge)?;
    if magnitude <= u128::from(JSON_EXACT_INT_MAX) {
        return Err(NotCanonical::Small);
    }
    if digits.len() == text.len() {
        return Ok(Parsed::Unsigned(magnitude));
    }
    // `i128::MIN` has no positive counterpart: read the signed text whole.
    text.parse::<i128>().map(Parsed::Signed).map_err(|_| NotCanonical::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_text_beyond_two_to_the_53_is_an_integer() {
        assert_eq!(parse_canonical("9007199254740993"), Ok(Parsed::Unsigned((1 << 53) + 1)));
        assert_eq!(parse_canonical("-9007199254740993"), Ok(Parsed::Signed(-(1 << 53) - 1)));
        assert_eq!(parse_canonical(&u128::MAX.to_string()), Ok(Parsed::Unsigned(u128::MAX)));
        assert_eq!(parse_canonical(&i128::MIN.to_string()), Ok(Parsed::Signed(i128::MIN)));
        assert_eq!(parse_canonical("9007199254740992"), Err(NotCanonical::Small));
        assert_eq!(parse_canonical("-9007199254740992"), Err(NotCanonical::Small));
        assert_eq!(parse_canonical("5"), Err(NotCanonical::Small));
        assert_eq!(parse_canonical("0"), Err(NotCanonical::Small));
        assert_eq!(parse_canonical("340282366920938463463374607431768211456"), Err(NotCanonical::TooLarge));
        assert_eq!(parse_canonical(&format!("-{}", u128::MAX)), Err(NotCanonical::TooLarge));
        assert_eq!(parse_canonical(&"9".repeat(100)), Err(NotCanonical::TooLarge));
        for text in ["", "-", "+9007199254740993", "09007199254740993", "-0", "00", "1e20", " 9007199254740993", "x"] {
            assert_eq!(parse_canonical(text), Err(NotCanonical::Text), "{text:?}");
        }
    }
}
