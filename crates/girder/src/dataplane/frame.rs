//! Frames on the wire: a fixed header (kind, compression, wire length, raw length, crc32c
//! of the header's other fields and the wire payload), then the payload. Every frame is checked before use, and a
//! compressed payload is never inflated beyond its declared raw length, itself capped.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Compression, DataError};

/// Bytes of a frame header.
pub(crate) const HEADER_LEN: usize = 14;
/// What a connection says first, both ways: the protocol's name and version.
pub(crate) const MAGIC: &[u8; 6] = b"GRDP\x00\x01";
/// Chunks smaller than this are sent raw: compressing them saves nothing worth the time.
const COMPRESS_MIN_BYTES: usize = 512;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A request's or response's header.
    Header = 1,
    /// A piece of a body.
    Chunk = 2,
    /// The end of a body.
    End = 3,
    /// The receiver takes this many more chunks (payload: u32 little-endian).
    Credit = 4,
    /// The request failed on the serving side (payload: why, UTF-8), instead of a header.
    Error = 5,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Header),
            2 => Some(Kind::Chunk),
            3 => Some(Kind::End),
            4 => Some(Kind::Credit),
            5 => Some(Kind::Error),
            _ => None,
        }
    }
}

/// A frame read off the wire, checked and decompressed.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    /// For a request's header: how the requester wants the response body compressed.
    pub(crate) reply: Compression,
    pub(crate) payload: Bytes,
    /// Bytes it took on the wire, header included.
    pub(crate) wire_bytes: usize,
}

fn compress(compression: Compression, raw: &[u8]) -> Option<(u8, Vec<u8>)> {
    if raw.len() < COMPRESS_MIN_BYTES {
        return None;
    }
    let packed = match compression {
        Compression::None => return None,
        Compression::Lz4 => (1, lz4_flex::block::compress(raw)),
        Compression::Zstd => (2, zstd::bulk::compress(raw, 1).ok()?),
    };
    (packed.1.len() < raw.len()).then_some(packed)
}

fn code(compression: Compression) -> u8 {
    match compression {
        Compression::None => 0,
        Compression::Lz4 => 1,
        Compression::Zstd => 2,
    }
}

/// Writes one frame of `payload`: a chunk compressed with `compression` when that shrinks
/// it; a header (never compressed) tells the peer to compress its reply's chunks so.
pub(crate) async fn write<W: AsyncWrite + Unpin>(
    out: &mut W,
    kind: Kind,
    payload: &[u8],
    compression: Compression,
) -> Result<usize, DataError> {
    let packed = if kind == Kind::Chunk { compress(compression, payload) } else { None };
    let (flag, wire): (u8, &[u8]) = match &packed {
        Some((flag, bytes)) => (*flag, bytes),
        None if kind == Kind::Header => (code(compression) << 4, payload),
        None => (0, payload),
    };
    let (wire_len, raw_len) = (len_u32(wire.len())?, len_u32(payload.len())?);
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1] = flag;
    header[2..6].copy_from_slice(&wire_len.to_le_bytes());
    header[6..10].copy_from_slice(&raw_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..10]), wire);
    header[10..14].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&header).await.map_err(io)?;
    out.write_all(wire).await.map_err(io)?;
    Ok(HEADER_LEN + wire.len())
}

/// Reads one frame whose raw payload is at most `raw_max` bytes.
pub(crate) async fn read<R: AsyncRead + Unpin>(input: &mut R, raw_max: usize) -> Result<Frame, DataError> {
    let mut header = [0u8; HEADER_LEN];
    input.read_exact(&mut header).await.map_err(io)?;
    let kind =
        Kind::from_u8(header[0]).ok_or_else(|| DataError::Protocol(format!("unknown frame kind {}", header[0])))?;
    let (flag, reply) = match (kind, header[1] >> 4) {
        (Kind::Header, 0) => (header[1] & 0x0f, Compression::None),
        (Kind::Header, 1) => (header[1] & 0x0f, Compression::Lz4),
        (Kind::Header, 2) => (header[1] & 0x0f, Compression::Zstd),
        (_, 0) => (header[1], Compression::None),
        _ => return Err(DataError::Protocol(format!("unknown frame flags {:#x}", header[1]))),
    };
    let wire_len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as usize;
    let raw_len = u32::from_le_bytes([header[6], header[7], header[8], header[9]]) as usize;
    let crc = u32::from_le_bytes([header[10], header[11], header[12], header[13]]);
    if raw_len > raw_max || wire_len > raw_max.saturating_add(raw_max / 64 + 64) {
        return Err(DataError::TooLarge(format!("a frame of {raw_len} bytes; at most {raw_max}")));
    }
    if flag == 0 && wire_len != raw_len {
        return Err(DataError::Protocol("an uncompressed frame whose lengths differ".into()));
    }
    let mut wire = BytesMut::zeroed(wire_len);
    input.read_exact(&mut wire).await.map_err(io)?;
    if crc32c::crc32c_append(crc32c::crc32c(&header[..10]), &wire) != crc {
        return Err(DataError::Checksum);
    }
    let payload = match flag {
        0 => wire.freeze(),
        1 => lz4_flex::block::decompress(&wire, raw_len).map_err(|e| DataError::Protocol(format!("lz4: {e}")))?.into(),
        2 => zstd::bulk::decompress(&wire, raw_len).map_err(|e| DataError::Protocol(format!("zstd: {e}")))?.into(),
        other => return Err(DataError::Protocol(format!("unknown compression {other}"))),
    };
    if payload.len() != raw_len {
        return Err(DataError::Protocol("a frame that inflated to another length".into()));
    }
    Ok(Frame { kind, reply, payload, wire_bytes: HEADER_LEN + wire_len })
}

fn len_u32(len: usize) -> Result<u32, DataError> {
    u32::try_from(len).map_err(|_| DataError::TooLarge(format!("a frame of {len} bytes")))
}

pub(crate) fn io(err: std::io::Error) -> DataError {
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => DataError::Closed,
        _ => DataError::Io(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn round_trip(payload: &[u8], compression: Compression) -> Result<Frame, DataError> {
        let mut wire = Vec::new();
        write(&mut wire, Kind::Chunk, payload, compression).await?;
        read(&mut &wire[..], 1 << 20).await
    }

    #[tokio::test]
    async fn frames_round_trip_with_every_compression() {
        let text = b"girder girder girder ".repeat(100);
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let frame = round_trip(&text, compression).await.unwrap();
            assert_eq!(&frame.payload[..], &text[..]);
            if compression != Compression::None {
                assert!(frame.wire_bytes < text.len() / 4, "{compression:?} did not compress");
            }
        }
    }

    proptest! {
        #[test]
        fn any_flipped_byte_is_refused(payload in proptest::collection::vec(any::<u8>(), 1..2000), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut wire = Vec::new();
            runtime.block_on(write(&mut wire, Kind::Chunk, &payload, Compression::Lz4)).unwrap();
            let at = at.index(wire.len());
            wire[at] ^= 1 << bit;
            prop_assert!(runtime.block_on(read(&mut &wire[..], 1 << 20)).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = runtime.block_on(read(&mut &bytes[..], 1 << 16));
        }
    }
}
