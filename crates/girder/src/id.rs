//! Request identity: a BLAKE3 hash of the canonical encoding of (name, version, arguments).
//!
//! The identity is the cache key, the single-flight key and the notification key, so every
//! node must compute the same identity for the same request. The canonical encoding is the
//! function name, a zero byte, the version as 4 little-endian bytes, then the MessagePack
//! encoding of the argument tuple (an array with one element per argument).

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

/// The identity of a request: `blake3(name || 0 || version_le || args)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReqId(pub [u8; 32]);

impl ReqId {
    /// Computes the identity of a call to `name` at `version` with MessagePack-encoded `args`.
    pub fn of(name: &str, version: u32, args: &[u8]) -> ReqId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(&version.to_le_bytes());
        hasher.update(args);
        ReqId(*hasher.finalize().as_bytes())
    }

    /// The identity as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    /// Parses 64 hex digits, as printed by [`ReqId::to_hex`].
    pub fn from_hex(text: &str) -> Option<ReqId> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ReqId(out))
    }
}

impl fmt::Debug for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes are plenty to tell requests apart in logs.
        write!(f, "ReqId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// A hasher for maps keyed by [`ReqId`]: the id is already a uniform hash, so its first
/// eight bytes are used as they are instead of hashing them again with SipHash.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `ReqId`'s derived Hash writes the array length first and then the 32 bytes; fold
        // everything so the hasher stays correct for any input, cheaply for ours.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_usize(&mut self, _len: usize) {
        // The array length is constant for ReqId; ignoring it keeps the hash = first bytes.
    }
}

/// A `BuildHasher` for [`IdHasher`].
pub type IdBuild = BuildHasherDefault<IdHasher>;

/// A `HashMap` keyed by request identity.
pub type IdMap<V> = std::collections::HashMap<ReqId, V, IdBuild>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_depends_on_every_part() {
        let base = ReqId::of("examples/fib", 1, &[0x91, 0x05]);
        assert_eq!(base, ReqId::of("examples/fib", 1, &[0x91, 0x05]));
        assert_ne!(base, ReqId::of("examples/fib", 2, &[0x91, 0x05]));
        assert_ne!(base, ReqId::of("examples/fob", 1, &[0x91, 0x05]));
        assert_ne!(base, ReqId::of("examples/fib", 1, &[0x91, 0x06]));
        // The zero separator keeps name and version bytes from running together.
        assert_ne!(ReqId::of("a", 0x0062, &[]), ReqId::of("ab", 0, &[]));
    }

    #[test]
    fn hex_round_trip() {
        let id = ReqId::of("x", 0, b"y");
        assert_eq!(ReqId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ReqId::from_hex("zz"), None);
    }
}
