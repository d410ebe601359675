//! The stored form of an item: a [`Record`] (version, tombstone flag, write time, value) and its
//! encoding, a fixed header followed by the value bytes.
//!
//! Header layout (little-endian, [`HEADER_LEN`] bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format ([`FORMAT`]) |
//! | 1 | 1 | flags (bit 0: tombstone; the others must be 0) |
//! | 2 | 8 | `version.seq` |
//! | 10 | 8 | `version.epoch` |
//! | 18 | 8 | `written_ms` |
//! | 26 | 8 | value length in bytes |
//! | 34 | 4 | crc32c of the value |
//! | 38 | 4 | crc32c of bytes 0..38 |
//!
//! CRC-32C detects every error burst of up to 32 bits, so any single damaged byte, in the header
//! (caught by the header's checksum, which covers the value's checksum too) or in the value
//! (caught by the value's), makes [`Record::decode`] fail: a damaged record is never served.

use std::cmp::Ordering;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The only record format this build writes and reads.
pub const FORMAT: u8 = 1;

/// The length of an encoded record's header, before the value bytes.
pub const HEADER_LEN: usize = 42;

/// The tombstone bit of the flags byte.
const FLAG_TOMBSTONE: u8 = 1;

/// Where the header's own checksum starts: it covers every byte before it.
const HEADER_CRC_AT: usize = HEADER_LEN - 4;

/// An item's version: ordered by (epoch, seq).
///
/// `seq` is the user-visible version (1 for the first write, +1 per write); `epoch` is the flock
/// table epoch the primary wrote it under. A write of a newer table's primary wins over any
/// of an older table's: that primary wrote on the newest acknowledged copy it could find
/// after sealing the flock, while an old primary that had not seen the new table may have
/// applied writes locally that were never acknowledged, with higher `seq`s. Ordered by `seq`
/// first, such a write would replace an acknowledged one wherever copies meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Version {
    /// The item's write count.
    pub seq: u64,
    /// The flock table epoch the write was made under.
    pub epoch: u64,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.epoch, self.seq).cmp(&(other.epoch, other.seq))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One stored item: a value, or a tombstone left by a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The item's version.
    pub version: Version,
    /// Whether this records a delete (the value is then empty).
    pub tombstone: bool,
    /// When the primary wrote it, in milliseconds since the Unix epoch (by its clock).
    pub written_ms: u64,
    /// The item's bytes.
    pub value: Bytes,
}

/// What scans for anti-entropy see: a record without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    /// The item's version.
    pub version: Version,
    /// Whether the record is a tombstone.
    pub tombstone: bool,
    /// The value's length in bytes.
    pub len: u64,
    /// The crc32c of the value.
    pub value_crc: u32,
}

/// Bytes that are not a record: a checksum that does not match, too few or too many bytes, or
/// a format this build does not know. The text says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct Corrupt(pub String);

impl Record {
    /// The record's metadata (computes the value's checksum).
    pub fn meta(&self) -> RecordMeta {
        RecordMeta {
            version: self.version,
            tombstone: self.tombstone,
            len: self.value.len() as u64,
            value_crc: crc32c::crc32c(&self.value),
        }
    }

    /// The header that precedes the value in [`Record::encode`].
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        self.meta().encode_header(self.written_ms)
    }

    /// The encoded record: [`Record::encode_header`] then the value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.value.len());
        out.extend_from_slice(&self.encode_header());
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes an encoded record, copying its value. Fails, never panics, on any bytes that
    /// [`Record::encode`] did not produce.
    pub fn decode(bytes: &[u8]) -> Result<Record, Corrupt> {
        let (header, value) = check(bytes)?;
        Ok(header.into_record(Bytes::copy_from_slice(value)))
    }

    /// Decodes an encoded record whose value then shares `bytes` (no copy).
    pub fn decode_bytes(bytes: Bytes) -> Result<Record, Corrupt> {
        let (header, _) = check(&bytes)?;
        Ok(header.into_record(bytes.slice(HEADER_LEN..)))
    }
}

impl RecordMeta {
    /// What `scan_flock` reports for a record whose header is damaged: version 0 (older than any
    /// write, so anti-entropy takes any replica's copy) and a length no value has.
    pub const CORRUPT: RecordMeta =
        RecordMeta { version: Version { seq: 0, epoch: 0 }, tombstone: false, len: u64::MAX, value_crc: 0 };

    /// The header of a record with this metadata, written at `written_ms`.
    pub fn encode_header(&self, written_ms: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = FORMAT;
        h[1] = if self.tombstone { FLAG_TOMBSTONE } else { 0 };
        h[2..10].copy_from_slice(&self.version.seq.to_le_bytes());
        h[10..18].copy_from_slice(&self.version.epoch.to_le_bytes());
        h[18..26].copy_from_slice(&written_ms.to_le_bytes());
        h[26..34].copy_from_slice(&self.len.to_le_bytes());
        h[34..38].copy_from_slice(&self.value_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        h[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes a header alone (its own checksum is checked; the value is not there to check)
    /// and returns the metadata and `written_ms`.
    pub fn decode_header(bytes: &[u8]) -> Result<(RecordMeta, u64), Corrupt> {
        let header = Header::decode(bytes)?;
        Ok((header.meta, header.written_ms))
    }
}

/// A checked header.
struct Header {
    meta: RecordMeta,
    written_ms: u64,
}

impl Header {
    fn decode(bytes: &[u8]) -> Result<Header, Corrupt> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| Corrupt(format!("{} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len())))?;
        let stored_crc = u32_at(h, HEADER_CRC_AT);
        let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        if crc != stored_crc {
            return Err(Corrupt(format!("header checksum {crc:#010x} does not match the stored {stored_crc:#010x}")));
        }
        if h[0] != FORMAT {
            return Err(Corrupt(format!("unknown record format {} (this build reads {FORMAT})", h[0])));
        }
        if h[1] & !FLAG_TOMBSTONE != 0 {
            return Err(Corrupt(format!("unknown flags {:#04x}", h[1])));
        }
        let meta = RecordMeta {
            version: Version { seq: u64_at(h, 2), epoch: u64_at(h, 10) },
            tombstone: h[1] & FLAG_TOMBSTONE != 0,
            len: u64_at(h, 26),
            value_crc: u32_at(h, 34),
        };
        Ok(Header { meta, written_ms: u64_at(h, 18) })
    }

    fn into_record(self, value: Bytes) -> Record {
        Record { version: self.meta.version, tombstone: self.meta.tombstone, written_ms: self.written_ms, value }
    }
}

/// Checks a whole encoded record: header, length and value checksum.
fn check(bytes: &[u8]) -> Result<(Header, &[u8]), Corrupt> {
    let header = Header::decode(bytes)?;
    let value = &bytes[HEADER_LEN..];
    if value.len() as u64 != header.meta.len {
        return Err(Corrupt(format!("the header says {} value bytes, {} follow it", header.meta.len, value.len())));
    }
    let crc = crc32c::crc32c(value);
    if crc != header.meta.value_crc {
        return Err(Corrupt(format!(
            "value checksum {crc:#010x} does not match the stored {:#010x}",
            header.meta.value_crc
        )));
    }
    Ok((header, value))
}

fn u64_at(h: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

fn u32_at(h: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(seq, epoch, tombstone, written_ms, value)| Record {
                version: Version { seq, epoch },
                tombstone,
                written_ms,
                value: value.into(),
            })
    }

    proptest! {
        #[test]
        fn encoding_round_trips(r in record()) {
            let bytes = r.encode();
            prop_assert_eq!(bytes.len(), HEADER_LEN + r.value.len());
            prop_assert_eq!(&Record::decode(&bytes).unwrap(), &r);
            prop_assert_eq!(&Record::decode_bytes(bytes.clone().into()).unwrap(), &r);
            let (meta, written_ms) = RecordMeta::decode_header(&bytes).unwrap();
            prop_assert_eq!(meta, r.meta());
            prop_assert_eq!(written_ms, r.written_ms);
        }

        #[test]
        fn any_flipped_byte_is_detected(r in record(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let mut bytes = r.encode();
            let at = at.index(bytes.len());
            bytes[at] ^= flip;
            prop_assert!(Record::decode(&bytes).is_err(), "byte {} flipped by {:#x} went unnoticed", at, flip);
            prop_assert!(Record::decode_bytes(bytes.into()).is_err());
        }

        #[test]
        fn a_length_that_disagrees_is_refused(r in record(), cut in 1usize..50, extra in proptest::collection::vec(any::<u8>(), 1..20)) {
            let bytes = r.encode();
            let short = &bytes[..bytes.len().saturating_sub(cut)];
            prop_assert!(Record::decode(short).is_err());
            let mut long = bytes.clone();
            long.extend_from_slice(&extra);
            let err = Record::decode(&long).unwrap_err();
            prop_assert!(err.0.contains("value bytes"), "{}", err);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
            let _ = RecordMeta::decode_header(&bytes);
        }
    }

    #[test]
    fn versions_order_by_epoch_then_seq() {
        let v = |seq, epoch| Version { seq, epoch };
        // An old primary's unacknowledged writes (higher seq) lose to the new primary's.
        assert!(v(9, 1) < v(2, 2));
        assert!(v(2, 1) < v(3, 1));
        assert_eq!(v(2, 3).max(v(7, 1)), v(2, 3));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let r = Record { version: Version { seq: 1, epoch: 2 }, tombstone: false, written_ms: 3, value: "abc".into() };
        let mut bytes = r.encode();
        assert!(Record::decode(&bytes[..10]).unwrap_err().to_string().contains("shorter than"));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(Record::decode(&bytes).unwrap_err().to_string().contains("value checksum"));
        let mut other = r.encode();
        other[0] = 7;
        let crc = crc32c::crc32c(&other[..HEADER_CRC_AT]);
        other[HEADER_CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        assert!(Record::decode(&other).unwrap_err().to_string().contains("unknown record format 7"));
    }
}
