//! Frames on the wire: a fixed 14-byte header, then the payload.
//!
//! ```text
//! 0      kind (Kind)
//! 1      low nibble: the payload's compression; high nibble (header frames only): the
//!        compression the requester wants for the response's body
//! 2..6   wire length: payload bytes as sent (u32, little-endian)
//! 6..10  raw length: payload bytes once decompressed (u32, little-endian)
//! 10..14 crc32c of bytes 0..10 and of the payload as sent
//! ```
//!
//! A header is checked for sanity before its payload is read (lengths within the reader's
//! limit, a compressed payload strictly shorter than its raw length, a raw one exactly as
//! long), and the checksum before the payload is used, so a corrupt frame is never
//! decompressed. Decompression is bounded by the raw length, itself bounded by the limit:
//! a frame can never make its reader allocate more than that.

use bytes::Bytes;

use super::{Compression, DataError};

/// Bytes of a frame header.
pub(crate) const HEADER_LEN: usize = 14;
/// Chunks smaller than this are sent raw: compressing them saves nothing worth the time.
const COMPRESS_MIN_BYTES: usize = 512;
/// Bytes of the sample that decides whether a large chunk is worth compressing.
const PROBE_BYTES: usize = 16 << 10;
/// The zstd level: the fastest, since a transfer is as fast as its slowest stage.
const ZSTD_LEVEL: i32 = 1;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A request's or response's header.
    Header = 1,
    /// A piece of a body.
    Chunk = 2,
    /// The end of a body.
    End = 3,
    /// The receiver takes this many more chunks (payload: u32, little-endian).
    Credit = 4,
    /// The sender failed (payload: why, UTF-8): instead of a response header, the handler
    /// panicked; inside a body, its producer failed. The connection closes after it.
    Error = 5,
    /// The server closes this idle connection, and read nothing since its last response:
    /// a request that meets it was not acted on.
    Goodbye = 6,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Header),
            2 => Some(Kind::Chunk),
            3 => Some(Kind::End),
            4 => Some(Kind::Credit),
            5 => Some(Kind::Error),
            6 => Some(Kind::Goodbye),
            _ => None,
        }
    }
}

fn code(compression: Compression) -> u8 {
    match compression {
        Compression::None => 0,
        Compression::Lz4 => 1,
        Compression::Zstd => 2,
    }
}

fn from_code(code: u8) -> Option<Compression> {
    match code {
        0 => Some(Compression::None),
        1 => Some(Compression::Lz4),
        2 => Some(Compression::Zstd),
        _ => None,
    }
}

/// A frame header, parsed and found sane (its checksum is checked with the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) kind: Kind,
    /// How the payload is compressed.
    pub(crate) packing: Compression,
    /// For a request's header: how the requester wants the response body compressed.
    pub(crate) reply: Compression,
    pub(crate) wire_len: usize,
    pub(crate) raw_len: usize,
    crc: u32,
}

/// The header of a frame whose payload is `wire` (`raw_len` bytes once unpacked).
pub(crate) fn encode_head(
    kind: Kind,
    packing: Compression,
    reply: Compression,
    wire: &[u8],
    raw_len: usize,
) -> Result<[u8; HEADER_LEN], DataError> {
    let len = |n: usize| u32::try_from(n).map_err(|_| DataError::too_large("frame", n, u32::MAX as usize));
    let mut head = [0u8; HEADER_LEN];
    head[0] = kind as u8;
    head[1] = code(packing) | code(reply) << 4;
    head[2..6].copy_from_slice(&len(wire.len())?.to_le_bytes());
    head[6..10].copy_from_slice(&len(raw_len)?.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..10]), wire);
    head[10..14].copy_from_slice(&crc.to_le_bytes());
    Ok(head)
}

fn u32_at(bytes: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses a frame header whose payload may be at most `raw_max` bytes once unpacked.
pub(crate) fn parse_head(bytes: &[u8; HEADER_LEN], raw_max: usize) -> Result<Head, DataError> {
    let kind =
        Kind::from_u8(bytes[0]).ok_or_else(|| DataError::Protocol(format!("unknown frame kind {}", bytes[0])))?;
    let flags =
        |code| from_code(code).ok_or_else(|| DataError::Protocol(format!("unknown frame flags {:#x}", bytes[1])));
    let (packing, reply) = (flags(bytes[1] & 0x0f)?, flags(bytes[1] >> 4)?);
    if kind != Kind::Header && reply != Compression::None {
        return Err(DataError::Protocol(format!("unknown frame flags {:#x}", bytes[1])));
    }
    let (wire_len, raw_len) = (u32_at(bytes, 2) as usize, u32_at(bytes, 6) as usize);
    if raw_len > raw_max {
        return Err(DataError::too_large("frame", raw_len, raw_max));
    }
    let sane = match packing {
        Compression::None => wire_len == raw_len,
        _ => wire_len < raw_len && kind == Kind::Chunk,
    };
    if !sane {
        return Err(DataError::Protocol(format!("a {kind:?} frame of {wire_len} bytes for {raw_len} ({packing:?})")));
    }
    Ok(Head { kind, packing, reply, wire_len, raw_len, crc: u32_at(bytes, 10) })
}

/// Checks the checksum of a frame: its header's first ten bytes and its payload as sent.
pub(crate) fn check(head: &Head, bytes: &[u8; HEADER_LEN], wire: &[u8]) -> Result<(), DataError> {
    if wire.len() != head.wire_len || crc32c::crc32c_append(crc32c::crc32c(&bytes[..10]), wire) != head.crc {
        return Err(DataError::Checksum);
    }
    Ok(())
}

/// A connection's compression state: contexts and scratch space reused frame after frame.
#[derive(Default)]
pub(crate) struct Codec {
    scratch: Vec<u8>,
    zstd_pack: Option<zstd::bulk::Compressor<'static>>,
    zstd_unpack: Option<zstd::bulk::Decompressor<'static>>,
}

impl Codec {
    /// `raw` compressed with `compression` when that shrinks it: how it is packed, and the
    /// bytes to send (in the codec's scratch space, or `raw` itself).
    pub(crate) fn pack<'a>(&'a mut self, compression: Compression, raw: &'a [u8]) -> (Compression, &'a [u8]) {
        if raw.len() < COMPRESS_MIN_BYTES || compression == Compression::None {
            return (Compression::None, raw);
        }
        // Incompressible bytes (already compressed, encrypted, random) would cost a whole
        // compression for nothing: a sample from the middle tells first.
        if raw.len() >= PROBE_BYTES * 4 {
            let middle = raw.len() / 2 - PROBE_BYTES / 2;
            let sample = &raw[middle..middle + PROBE_BYTES];
            if self.compress(compression, sample).is_none_or(|len| len >= sample.len() / 8 * 7) {
                return (Compression::None, raw);
            }
        }
        match self.compress(compression, raw) {
            Some(len) if len < raw.len() => (compression, &self.scratch[..len]),
            _ => (Compression::None, raw),
        }
    }

    /// Compresses `raw` into the scratch space: the compressed length.
    fn compress(&mut self, compression: Compression, raw: &[u8]) -> Option<usize> {
        match compression {
            Compression::None => None,
            Compression::Lz4 => {
                self.room(lz4_flex::block::get_maximum_output_size(raw.len()));
                lz4_flex::block::compress_into(raw, &mut self.scratch).ok()
            }
            Compression::Zstd => {
                self.room(zstd::zstd_safe::compress_bound(raw.len()));
                let context = match &mut self.zstd_pack {
                    Some(context) => Some(context),
                    None => zstd::bulk::Compressor::new(ZSTD_LEVEL).ok().map(|c| self.zstd_pack.insert(c)),
                };
                context.and_then(|c| c.compress_to_buffer(raw, &mut self.scratch[..]).ok())
            }
        }
    }

    /// Lets a scratch space larger than `bytes_max` go (the contexts stay).
    pub(crate) fn idle(&mut self, bytes_max: usize) {
        if self.scratch.capacity() > bytes_max {
            self.scratch = Vec::new();
        }
    }

    fn room(&mut self, bytes: usize) {
        if self.scratch.len() < bytes {
            self.scratch.resize(bytes, 0);
        }
    }

    /// The payload of a checked frame, decompressed into exactly `head.raw_len` bytes.
    pub(crate) fn unpack(&mut self, head: &Head, wire: Bytes) -> Result<Bytes, DataError> {
        let raw = match head.packing {
            Compression::None => return Ok(wire),
            Compression::Lz4 => lz4_flex::block::decompress(&wire, head.raw_len)
                .map_err(|e| DataError::Protocol(format!("lz4: {e}")))?,
            Compression::Zstd => {
                let context = match &mut self.zstd_unpack {
                    Some(context) => context,
                    None => self
                        .zstd_unpack
                        .insert(zstd::bulk::Decompressor::new().map_err(|e| DataError::Io(format!("zstd: {e}")))?),
                };
                // The capacity bounds what it may inflate to.
                context.decompress(&wire, head.raw_len).map_err(|e| DataError::Protocol(format!("zstd: {e}")))?
            }
        };
        if raw.len() != head.raw_len {
            return Err(DataError::Protocol(format!("a frame inflated to {} bytes, not {}", raw.len(), head.raw_len)));
        }
        Ok(raw.into())
    }
}

/// One frame encoded whole: for tests and for peers that write raw frames.
#[cfg(test)]
pub(crate) fn encode(kind: Kind, payload: &[u8], compression: Compression, codec: &mut Codec) -> Vec<u8> {
    let packing = if kind == Kind::Chunk { compression } else { Compression::None };
    let reply = if kind == Kind::Header { compression } else { Compression::None };
    let (packing, wire) = codec.pack(packing, payload);
    let head = encode_head(kind, packing, reply, wire, payload.len()).expect("a small frame");
    [&head[..], wire].concat()
}

/// Decodes one frame at the start of `bytes`: its head, its payload, the bytes it took.
#[cfg(test)]
pub(crate) fn decode(bytes: &[u8], raw_max: usize, codec: &mut Codec) -> Result<(Head, Bytes, usize), DataError> {
    let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(DataError::Closed)?;
    let head = parse_head(header, raw_max)?;
    let wire = bytes.get(HEADER_LEN..HEADER_LEN + head.wire_len).ok_or(DataError::Closed)?;
    check(&head, header, wire)?;
    let payload = codec.unpack(&head, Bytes::copy_from_slice(wire))?;
    Ok((head, payload, HEADER_LEN + head.wire_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EVERY: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    #[test]
    fn frames_round_trip_with_every_compression() {
        let text = b"girder girder girder ".repeat(100);
        let random: Vec<u8> = (0..4_000).map(|_| fastrand::u8(..)).collect();
        let mut codec = Codec::default();
        for compression in EVERY {
            let wire = encode(Kind::Chunk, &text, compression, &mut codec);
            let (head, payload, used) = decode(&wire, 1 << 20, &mut codec).unwrap();
            assert_eq!((&payload[..], used, head.packing), (&text[..], wire.len(), compression));
            if compression != Compression::None {
                assert!(wire.len() < text.len() / 4, "{compression:?} did not compress");
            }
            // Incompressible bytes go raw, whatever was asked.
            let wire = encode(Kind::Chunk, &random, compression, &mut codec);
            let (head, payload, _) = decode(&wire, 1 << 20, &mut codec).unwrap();
            assert_eq!((&payload[..], head.packing), (&random[..], Compression::None));
            assert_eq!(wire.len(), HEADER_LEN + random.len());
        }
    }

    #[test]
    fn a_large_chunk_is_compressed_only_if_a_sample_of_it_shrinks() {
        let mut codec = Codec::default();
        let text = b"{\"id\":1,\"name\":\"girder\"}\n".repeat(10_000);
        let random: Vec<u8> = (0..text.len()).map(|_| fastrand::u8(..)).collect();
        for compression in [Compression::Lz4, Compression::Zstd] {
            assert_eq!(codec.pack(compression, &text).0, compression);
            assert_eq!(codec.pack(compression, &random).0, Compression::None);
            // Mostly random, compressible in the middle: the sample says yes, and the chunk
            // shrinks a little, so it goes compressed.
            let mut mixed = random.clone();
            let middle = mixed.len() / 2;
            mixed[middle - 20_000..middle + 20_000].copy_from_slice(&text[..40_000]);
            let (packing, wire) = codec.pack(compression, &mixed);
            assert!(packing == compression && wire.len() < mixed.len(), "{compression:?}");
        }
    }

    #[test]
    fn a_header_carries_the_reply_compression_and_is_never_packed() {
        let mut codec = Codec::default();
        let header = vec![b'h'; 4_000];
        let wire = encode(Kind::Header, &header, Compression::Zstd, &mut codec);
        let (head, payload, _) = decode(&wire, 1 << 20, &mut codec).unwrap();
        assert_eq!((head.kind, head.packing, head.reply), (Kind::Header, Compression::None, Compression::Zstd));
        assert_eq!(payload, header);
    }

    #[test]
    fn lengths_over_the_limit_are_refused_before_anything_is_read() {
        let mut codec = Codec::default();
        let wire = encode(Kind::Chunk, &[7u8; 2_000], Compression::None, &mut codec);
        let refused = decode(&wire[..HEADER_LEN], 1_000, &mut codec);
        assert!(matches!(refused, Err(DataError::TooLarge { bytes: 2_000, bytes_max: 1_000, .. })), "{refused:?}");
        // A compressed frame that claims to inflate beyond the limit: refused as well.
        let text = b"abc".repeat(10_000);
        let mut wire = encode(Kind::Chunk, &text, Compression::Lz4, &mut codec);
        wire[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&wire, 1 << 20, &mut codec), Err(DataError::TooLarge { .. })));
    }

    #[test]
    fn a_frame_that_lies_about_its_raw_length_is_refused() {
        let mut codec = Codec::default();
        let text = b"abc".repeat(10_000);
        for compression in [Compression::Lz4, Compression::Zstd] {
            let wire = encode(Kind::Chunk, &text, compression, &mut codec);
            // Re-sign a header that claims one byte more (or less) than the payload holds.
            for raw_len in [text.len() + 1, text.len() - 1] {
                let (head, _, _) = decode(&wire, 1 << 20, &mut codec).unwrap();
                let payload = &wire[HEADER_LEN..];
                let forged = encode_head(Kind::Chunk, head.packing, Compression::None, payload, raw_len).unwrap();
                let forged = [&forged[..], payload].concat();
                let decoded = decode(&forged, 1 << 20, &mut codec);
                assert!(matches!(decoded, Err(DataError::Protocol(_))), "{compression:?}, {raw_len}: {decoded:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn any_flipped_bit_is_refused(
            payload in proptest::collection::vec(any::<u8>(), 0..3_000),
            repeat in any::<bool>(),
            compression in proptest::sample::select(EVERY.to_vec()),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            // Repeated payloads compress, random ones go raw: both layouts are covered.
            let payload = if repeat { payload.repeat(4) } else { payload };
            let mut codec = Codec::default();
            let mut wire = encode(Kind::Chunk, &payload, compression, &mut codec);
            let at = at.index(wire.len());
            wire[at] ^= 1 << bit;
            prop_assert!(decode(&wire, 1 << 20, &mut codec).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = Codec::default();
            let _ = decode(&bytes, 1 << 16, &mut codec);
        }

        #[test]
        fn arbitrary_payloads_behind_a_valid_checksum_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 1..512),
            compression in proptest::sample::select(vec![Compression::Lz4, Compression::Zstd]),
            raw_len in 0usize..4_096,
        ) {
            // A peer may sign garbage: decompressing it must fail cleanly, within bounds.
            let mut codec = Codec::default();
            if let Ok(head) = encode_head(Kind::Chunk, compression, Compression::None, &payload, raw_len) {
                let frame = [&head[..], &payload].concat();
                if let Ok((_, unpacked, _)) = decode(&frame, 4_096, &mut codec) {
                    prop_assert_eq!(unpacked.len(), raw_len);
                }
            }
        }
    }
}
