//! A serializer adapter that writes integers in one form whatever their Rust type. For
//! arguments ([`Mode::Identity`], see [`super::JSON_EXACT_INT_MAX`]): magnitudes up to 2^53
//! as MessagePack integers, larger ones (`u64`, `i64`, `u128`, `i128` alike) as their decimal
//! text. For results ([`Mode::Result`]): every integer MessagePack can hold as an integer,
//! only 128-bit ones beyond as text. It must act on the typed value: rmp_serde writes a
//! `u128` as 16 bytes of binary, which in the encoded bytes cannot be told apart from a
//! 16-byte buffer.

use serde::ser::{self, Serialize, Serializer};

use super::JSON_EXACT_INT_MAX;

/// Which integers are written as their decimal text.
#[derive(Clone, Copy)]
pub(super) enum Mode {
    /// Arguments, whose bytes are their identity: beyond ±2^53, as JSON writes them.
    Identity,
    /// Results: only those no MessagePack integer holds, so that Rust callers read the
    /// same bytes as before wherever serde buffers values (internally tagged enums,
    /// `#[serde(flatten)]`), where only a MessagePack integer reads as an integer.
    Result,
}

impl Mode {
    /// The largest magnitude written as an integer.
    fn int_max(self) -> u128 {
        match self {
            Mode::Identity => u128::from(JSON_EXACT_INT_MAX),
            Mode::Result => u128::from(u64::MAX),
        }
    }
}

/// `value`, serialized with its integers in the form of `mode`.
pub(super) struct Canon<'a, T: ?Sized>(pub(super) &'a T, pub(super) Mode);

impl<T: Serialize + ?Sized> Serialize for Canon<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(Ints(serializer, self.1))
    }
}

/// Writes an unsigned integer in the form of `mode`.
fn unsigned<S: Serializer>(serializer: S, mode: Mode, value: u128) -> Result<S::Ok, S::Error> {
    match u64::try_from(value) {
        Ok(small) if value <= mode.int_max() => serializer.serialize_u64(small),
        _ => serializer.serialize_str(&value.to_string()),
    }
}

/// Writes a signed integer in the form of `mode` (non-negative ones exactly as unsigned).
fn signed<S: Serializer>(serializer: S, mode: Mode, value: i128) -> Result<S::Ok, S::Error> {
    match (u128::try_from(value), i64::try_from(value)) {
        (Ok(unsigned_value), _) => unsigned(serializer, mode, unsigned_value),
        (_, Ok(small)) if value.unsigned_abs() <= mode.int_max() => serializer.serialize_i64(small),
        _ => serializer.serialize_str(&value.to_string()),
    }
}

/// A serializer (or one of its compound states) whose integers are written in one form.
pub(super) struct Ints<S>(S, Mode);

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $method(self, $($arg: $ty),*) -> Result<S::Ok, S::Error> {
            self.0.$method($($arg),*)
        })*
    };
}

impl<S: Serializer> Serializer for Ints<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Ints<S::SerializeSeq>;
    type SerializeTuple = Ints<S::SerializeTuple>;
    type SerializeTupleStruct = Ints<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Ints<S::SerializeTupleVariant>;
    type SerializeMap = Ints<S::SerializeMap>;
    type SerializeStruct = Ints<S::SerializeStruct>;
    type SerializeStructVariant = Ints<S::SerializeStructVariant>;

    forward! {
        serialize_bool(v: bool);
        serialize_i8(v: i8);
        serialize_i16(v: i16);
        serialize_i32(v: i32);
        serialize_u8(v: u8);
        serialize_u16(v: u16);
        serialize_u32(v: u32);
        serialize_f32(v: f32);
        serialize_f64(v: f64);
        serialize_char(v: char);
        serialize_str(v: &str);
        serialize_bytes(v: &[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(name: &'static str);
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str);
    }

    fn serialize_i64(self, v: i64) -> Result<S::Ok, S::Error> {
        signed(self.0, self.1, i128::from(v))
    }

    fn serialize_i128(self, v: i128) -> Result<S::Ok, S::Error> {
        signed(self.0, self.1, v)
    }

    fn serialize_u64(self, v: u64) -> Result<S::Ok, S::Error> {
        unsigned(self.0, self.1, u128::from(v))
    }

    fn serialize_u128(self, v: u128) -> Result<S::Ok, S::Error> {
        unsigned(self.0, self.1, v)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(&Canon(value, self.1))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, name: &'static str, value: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, &Canon(value, self.1))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_variant(name, index, variant, &Canon(value, self.1))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.0.serialize_seq(len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.0.serialize_tuple(len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_tuple_struct(self, name: &'static str, len: usize) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.0.serialize_tuple_struct(name, len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        self.0.serialize_tuple_variant(name, index, variant, len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.0.serialize_map(len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Self::SerializeStruct, S::Error> {
        self.0.serialize_struct(name, len).map(|inner| Ints(inner, self.1))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.0.serialize_struct_variant(name, index, variant, len).map(|inner| Ints(inner, self.1))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// The compound states: each element goes through [`Canon`] too.
macro_rules! compound {
    ($trait:ident, $method:ident $(, $key:ident: $key_ty:ty)?) => {
        impl<S: ser::$trait> ser::$trait for Ints<S> {
            type Ok = S::Ok;
            type Error = S::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, $($key: $key_ty,)? value: &T) -> Result<(), S::Error> {
                self.0.$method($($key,)? &Canon(value, self.1))
            }

            fn end(self) -> Result<S::Ok, S::Error> {
                self.0.end()
            }
        }
    };
}

compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

/// Passes a struct's fields on, each through [`Canon`].
macro_rules! structure {
    ($trait:ident) => {
        impl<S: ser::$trait> ser::$trait for Ints<S> {
            type Ok = S::Ok;
            type Error = S::Error;

            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), S::Error> {
                self.0.serialize_field(key, &Canon(value, self.1))
            }

            fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
                self.0.skip_field(key)
            }

            fn end(self) -> Result<S::Ok, S::Error> {
                self.0.end()
            }
        }
    };
}

structure!(SerializeStruct);
structure!(SerializeStructVariant);

impl<S: ser::SerializeMap> ser::SerializeMap for Ints<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), S::Error> {
        self.0.serialize_key(&Canon(key, self.1))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
        self.0.serialize_value(&Canon(value, self.1))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}
