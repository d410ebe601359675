//! The stored form of cache values: a sequence of frames, one per `set` or `append`, each
//! compressed on its own, so appends stay atomic and cheap whatever the codec.
//!
//! A frame is `tag: u8`, `len: u32 little-endian`, then `len` bytes: tag 0 is raw bytes, 1 an
//! LZ4 block (with its size prepended), 2 a zstd frame.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DsError, DsResult};

/// How cache values are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Stored as given.
    None,
    /// LZ4: fast, moderate ratio. The default.
    #[default]
    Lz4,
    /// zstd at the given level: slower, better ratio.
    Zstd(i32),
}

const RAW: u8 = 0;
const LZ4: u8 = 1;
const ZSTD: u8 = 2;
const HEADER_BYTES: usize = 5;
/// Largest value a frame may decode to; guards against corrupt or hostile stored data.
const DECODED_BYTES_MAX: usize = 1 << 30;

/// Encodes `value` as one frame, compressed when it is at least `min_bytes` long and
/// compression makes it smaller.
pub(crate) fn encode(value: &[u8], compression: Compression, min_bytes: usize) -> Bytes {
    let compressed = if value.len() < min_bytes {
        None
    } else {
        match compression {
            Compression::None => None,
            Compression::Lz4 => Some((LZ4, lz4_flex::compress_prepend_size(value))),
            Compression::Zstd(level) => zstd::bulk::compress(value, level).ok().map(|c| (ZSTD, c)),
        }
    };
    let (tag, payload) = match compressed {
        Some((tag, payload)) if payload.len() < value.len() => (tag, payload),
        _ => (RAW, value.to_vec()),
    };
    let mut out = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    out.put_u8(tag);
    out.put_u32_le(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(&payload);
    out.freeze()
}

/// Decodes every frame of `stored` and concatenates them.
pub(crate) fn decode(key: &str, stored: &[u8]) -> DsResult<Bytes> {
    let corrupt = |message: String| DsError::Decode { key: key.to_owned(), message };
    let mut out = BytesMut::new();
    let mut rest = stored;
    while !rest.is_empty() {
        if rest.len() < HEADER_BYTES {
            return Err(corrupt("truncated frame header".into()));
        }
        let tag = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest.get(HEADER_BYTES..HEADER_BYTES + len).ok_or_else(|| corrupt("truncated frame".into()))?;
        match tag {
            RAW => out.put_slice(payload),
            LZ4 => {
                let size = payload.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                if size.is_none_or(|s| s > DECODED_BYTES_MAX) {
                    return Err(corrupt("bad LZ4 size".into()));
                }
                let plain = lz4_flex::decompress_size_prepended(payload).map_err(|e| corrupt(e.to_string()))?;
                out.put_slice(&plain);
            }
            ZSTD => {
                let plain = zstd::bulk::decompress(payload, DECODED_BYTES_MAX).map_err(|e| corrupt(e.to_string()))?;
                out.put_slice(&plain);
            }
            other => return Err(corrupt(format!("unknown frame tag {other}"))),
        }
        if out.len() > DECODED_BYTES_MAX {
            return Err(corrupt("decodes to more than 1 GiB".into()));
        }
        rest = &rest[HEADER_BYTES + len..];
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_compress() {
        let text = "girder ".repeat(1_000).into_bytes();
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd(3)] {
            let frame = encode(&text, compression, 64);
            assert_eq!(decode("k", &frame).unwrap(), Bytes::from(text.clone()));
            if compression != Compression::None {
                assert!(frame.len() < text.len() / 10, "{compression:?}: {} bytes", frame.len());
            }
        }
        // Appended frames concatenate, whatever their codecs.
        let mut stored = encode(b"abc", Compression::Lz4, 1).to_vec();
        stored.extend_from_slice(&encode(&text, Compression::Zstd(1), 1));
        stored.extend_from_slice(&encode(b"xyz", Compression::None, 1));
        let joined = decode("k", &stored).unwrap();
        assert_eq!(&joined[..3], b"abc");
        assert_eq!(&joined[joined.len() - 3..], b"xyz");
        assert_eq!(joined.len(), 6 + text.len());
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        for bad in [&[9u8, 1, 0, 0, 0, 7][..], &[0, 9, 0, 0, 0, 1], &[1, 4, 0, 0, 0, 255, 255, 255, 255], &[0, 1]] {
            assert!(decode("k", bad).is_err(), "{bad:?}");
        }
    }
}
