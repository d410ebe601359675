//! Web sessions on girder's data structures: a [`tower-sessions`](https://docs.rs/tower-sessions)
//! session store, so every process of a grid (every app server behind a load balancer)
//! sees the same sessions, and each session expires with its TTL.
//!
//! [`GirderSessionStore`] implements tower-sessions' [`SessionStore`] (tower-sessions 0.15,
//! axum 0.8) on the grid's data structures ([`Store`]): one value per session, under
//! `sessions/{id}` (the prefix is configurable), holding the session's record in
//! MessagePack with a TTL that ends at the record's expiry date. A record past its expiry
//! date is never returned, even while the store still holds it (another process's clock set
//! its TTL). The store drops expired sessions by itself, so there is no `ExpiredDeletion`
//! task to run.
//!
//! Why not a [`Cache`](girder::structures::Cache): on Redis a cache read may be answered by
//! the process's near cache, which another process's write reaches only with its change
//! notice. A request landing on another app process could then read a session one change
//! behind and save it back, losing that change (the two-process test lost a name that way in
//! 4 of 30 runs under load). Sessions are therefore values of kind [`SESSION_KIND`]
//! (`atom`), stored with a TTL through the same atomic value operations: their reads always
//! reach the store (one round trip) and are never stale.
//!
//! ```no_run
//! use girder::{RedisConfig, RedisStatekeeper, Statekeeper};
//! use girder_sessions::GirderSessionStore;
//! use tower_sessions::{Expiry, Session, SessionManagerLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let grid = RedisStatekeeper::connect(RedisConfig::new("redis://127.0.0.1:6379/0")).await?;
//! let store = GirderSessionStore::new(grid.structures());
//! let sessions = SessionManagerLayer::new(store)
//!     .with_expiry(Expiry::OnInactivity(time::Duration::hours(1)));
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|session: Session| async move {
//!         let visits = session.get::<u64>("visits").await.ok().flatten().unwrap_or(0) + 1;
//!         let _ = session.insert("visits", visits).await;
//!         visits.to_string()
//!     }))
//!     .layer(sessions);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! Every read sees the last completed write, from any process. Concurrent writes of one
//! session are last-writer-wins, as with every tower-sessions store. On the embedded
//! statekeeper sessions count towards its memory budget and are not evicted to make room:
//! once it is full, saving a session fails until some expire.
//!
//! The binary `girder-sessions-counter` (feature `counter-app`, on by default) is an
//! example axum app built on it.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use girder::structures::{DsError, Kind, Store, KEY_BYTES_MAX, TTL_MS_MAX};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{session_store, SessionStore};

/// The key prefix used unless configured otherwise. (Keys under `girder/` are the grid's
/// own and are refused.)
pub const DEFAULT_KEY_PREFIX: &str = "sessions/";
/// The largest encoded session record stored unless configured otherwise: 256 KiB.
pub const DEFAULT_RECORD_BYTES_MAX: usize = 256 << 10;
/// Longest key prefix accepted: a key is the prefix and a 22-character session id, and
/// girder's keys are at most [`KEY_BYTES_MAX`] bytes.
pub const KEY_PREFIX_BYTES_MAX: usize = KEY_BYTES_MAX - ID_CHARS;
/// The kind of structure a session is stored as: a value read from the store every time
/// (see the crate docs for why not a cache value).
pub const SESSION_KIND: Kind = Kind::Atom;
/// Fresh ids `create` draws when the one it was given is taken, before it gives up.
pub const CREATE_ATTEMPTS_MAX: u32 = 8;

/// A session id's length in its text form (128 bits in URL-safe base64).
const ID_CHARS: usize = 22;
/// The prefix girder keeps for its own keys (placement, configuration).
const RESERVED_PREFIX: &str = "girder/";
/// The version of [`StoredRecord`]'s layout, stored with it.
const FORMAT_VERSION: u8 = 1;

/// Why a session store operation failed; tower-sessions sees it as a
/// [`session_store::Error`].
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session's encoded record is over the configured limit; nothing was written.
    #[error("session record is {bytes} bytes encoded; the limit is {max_bytes} (keep less in the session)")]
    TooLarge {
        /// The encoded record's size.
        bytes: usize,
        /// The limit ([`SessionStoreConfig::record_bytes_max`]).
        max_bytes: usize,
    },
    /// The session's data does not encode as MessagePack.
    #[error("session record does not encode: {0}")]
    Encode(String),
    /// A stored record does not decode (written by something else under the same prefix?).
    #[error("stored session record {key:?} does not decode: {message}")]
    Decode {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// `create` found every id it drew taken (with random 128-bit ids, a broken generator).
    #[error("no free session id after {0} attempts")]
    NoFreeId(u32),
    /// The store's configuration is unusable.
    #[error("bad session store configuration: {0}")]
    Config(String),
    /// girder's data structures refused or failed the operation (unreachable, full, a key
    /// holding another kind of structure).
    #[error("session store: {0}")]
    Store(#[from] DsError),
}

impl From<SessionError> for session_store::Error {
    fn from(err: SessionError) -> Self {
        match err {
            SessionError::Encode(_) => session_store::Error::Encode(err.to_string()),
            SessionError::Decode { .. } => session_store::Error::Decode(err.to_string()),
            _ => session_store::Error::Backend(err.to_string()),
        }
    }
}

/// Settings of a [`GirderSessionStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStoreConfig {
    /// Sessions are stored under `{key_prefix}{session id}`. Not empty (it keeps sessions
    /// apart from the grid's other keys), not under `girder/`, at most
    /// [`KEY_PREFIX_BYTES_MAX`] bytes.
    pub key_prefix: String,
    /// The largest encoded session record stored; a larger one is refused with
    /// [`SessionError::TooLarge`].
    pub record_bytes_max: usize,
}

impl Default for SessionStoreConfig {
    fn default() -> Self {
        SessionStoreConfig { key_prefix: DEFAULT_KEY_PREFIX.to_owned(), record_bytes_max: DEFAULT_RECORD_BYTES_MAX }
    }
}

impl SessionStoreConfig {
    fn check(&self) -> Result<(), SessionError> {
        let prefix = &self.key_prefix;
        if prefix.is_empty() || prefix.len() > KEY_PREFIX_BYTES_MAX {
            return Err(SessionError::Config(format!("the key prefix must be 1 to {KEY_PREFIX_BYTES_MAX} bytes")));
        }
        if prefix.starts_with(RESERVED_PREFIX) {
            return Err(SessionError::Config(format!("keys under {RESERVED_PREFIX:?} are girder's own: {prefix:?}")));
        }
        if self.record_bytes_max == 0 {
            return Err(SessionError::Config("record_bytes_max must be at least 1".to_owned()));
        }
        Ok(())
    }
}

/// A tower-sessions [`SessionStore`] on girder's data structures. Cheap to clone; every
/// clone (and every process on the same grid) sees the same sessions.
#[derive(Clone)]
pub struct GirderSessionStore {
    store: Store,
    config: SessionStoreConfig,
}

impl fmt::Debug for GirderSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GirderSessionStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl GirderSessionStore {
    /// Sessions on the grid's data structures `store` (`node.structures()` or
    /// `statekeeper.structures()`), with the default settings.
    pub fn new(store: Store) -> GirderSessionStore {
        GirderSessionStore { store, config: SessionStoreConfig::default() }
    }

    /// Sessions on `store` with `config`; refuses an unusable configuration.
    pub fn with_config(store: Store, config: SessionStoreConfig) -> Result<GirderSessionStore, SessionError> {
        config.check()?;
        Ok(GirderSessionStore { store, config })
    }

    /// The store's settings.
    pub fn config(&self) -> &SessionStoreConfig {
        &self.config
    }

    /// The key session `id` is stored under (as a [`SESSION_KIND`]).
    pub fn key(&self, id: &Id) -> String {
        format!("{}{id}", self.config.key_prefix)
    }

    /// Draws fresh ids until one is free, then writes `record` under it.
    async fn create_record(&self, record: &mut Record) -> Result<(), SessionError> {
        // girder has no set-if-absent with a TTL (a compare-and-set from unset keeps no
        // TTL, so a crash before the TTL was set would keep the key forever), so this check
        // and the write are two steps. Two creators racing for one id would need two equal random 128-bit
        // ids within a round trip, which tower-sessions' guidance accepts; the check
        // covers an id that is already stored.
        for _ in 0..CREATE_ATTEMPTS_MAX {
            if !self.store.exists(SESSION_KIND, &self.key(&record.id)).await? {
                return self.write(record).await;
            }
            tracing::warn!("session id collision: drawing another id");
            record.id = Id::default();
        }
        Err(SessionError::NoFreeId(CREATE_ATTEMPTS_MAX))
    }

    /// Stores `record` until its expiry date; an expired record is removed instead.
    async fn write(&self, record: &Record) -> Result<(), SessionError> {
        let key = self.key(&record.id);
        let Some(ttl_ms) = time_left_ms(record.expiry_date) else {
            self.store.delete(SESSION_KIND, &key).await?;
            return Ok(());
        };
        let bytes = encode(record, self.config.record_bytes_max)?;
        self.store.value_set(SESSION_KIND, &key, &bytes, Some(ttl_ms)).await?;
        Ok(())
    }

    /// The record of `id` unless it is missing or past its expiry date by this clock.
    async fn read(&self, id: &Id) -> Result<Option<Record>, SessionError> {
        let key = self.key(id);
        let Some(stored) = self.store.value_get(SESSION_KIND, &key).await? else { return Ok(None) };
        let record = decode(&key, *id, &stored.bytes)?;
        if time_left_ms(record.expiry_date).is_none() {
            tracing::debug!(key = %key, "session record past its expiry date");
            return Ok(None);
        }
        Ok(Some(record))
    }
}

#[async_trait]
impl SessionStore for GirderSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        Ok(self.create_record(record).await?)
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        Ok(self.write(record).await?)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        Ok(self.read(id).await?)
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.store.delete(SESSION_KIND, &self.key(id)).await.map_err(SessionError::from)?;
        Ok(())
    }
}

/// How long until `expiry`, as a TTL in milliseconds (at least 1, at most girder's
/// longest); `None` once it has passed.
fn time_left_ms(expiry: OffsetDateTime) -> Option<u64> {
    let left = expiry - OffsetDateTime::now_utc();
    if !left.is_positive() {
        return None;
    }
    let ms = u64::try_from(left.whole_milliseconds()).unwrap_or(TTL_MS_MAX);
    Some(ms.clamp(1, TTL_MS_MAX))
}

/// A record as stored. Its own layout, not tower-sessions' serde form, so that a new
/// tower-sessions release cannot change what is stored; the id is the key.
#[derive(Serialize, Deserialize)]
struct StoredRecord<D> {
    /// [`FORMAT_VERSION`].
    v: u8,
    /// The expiry date as Unix time: whole seconds, then nanoseconds.
    expiry_s: i64,
    expiry_ns: u32,
    data: D,
}

fn encode(record: &Record, max_bytes: usize) -> Result<Vec<u8>, SessionError> {
    let stored = StoredRecord {
        v: FORMAT_VERSION,
        expiry_s: record.expiry_date.unix_timestamp(),
        expiry_ns: record.expiry_date.nanosecond(),
        data: &record.data,
    };
    let bytes = rmp_serde::to_vec_named(&stored).map_err(|e| SessionError::Encode(e.to_string()))?;
    if bytes.len() > max_bytes {
        return Err(SessionError::TooLarge { bytes: bytes.len(), max_bytes });
    }
    Ok(bytes)
}

fn decode(key: &str, id: Id, bytes: &[u8]) -> Result<Record, SessionError> {
    let failed = |message: String| SessionError::Decode { key: key.to_owned(), message };
    let stored: StoredRecord<HashMap<String, serde_json::Value>> =
        rmp_serde::from_slice(bytes).map_err(|e| failed(e.to_string()))?;
    if stored.v != FORMAT_VERSION {
        return Err(failed(format!("format version {} (this build reads {FORMAT_VERSION})", stored.v)));
    }
    let expiry_date = OffsetDateTime::from_unix_timestamp(stored.expiry_s)
        .ok()
        .and_then(|date| date.replace_nanosecond(stored.expiry_ns).ok())
        .ok_or_else(|| failed(format!("expiry {}s {}ns is out of range", stored.expiry_s, stored.expiry_ns)))?;
    Ok(Record { id, data: stored.data, expiry_date })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[(&str, serde_json::Value)], expiry: OffsetDateTime) -> Record {
        let data = data.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        Record { id: Id::default(), data, expiry_date: expiry }
    }

    #[test]
    fn records_round_trip_with_nanoseconds() {
        let expiry = OffsetDateTime::now_utc() + time::Duration::nanoseconds(123_456_789_012);
        let original =
            record(&[("n", serde_json::json!(7)), ("s", serde_json::json!({"a": [1.5, "x", null]}))], expiry);
        let bytes = encode(&original, DEFAULT_RECORD_BYTES_MAX).expect("encodes");
        let back = decode("k", original.id, &bytes).expect("decodes");
        assert_eq!(back, original);
    }

    #[test]
    fn a_large_record_is_refused() {
        let big = record(&[("blob", serde_json::json!("x".repeat(2_000)))], OffsetDateTime::now_utc());
        match encode(&big, 1_000) {
            Err(SessionError::TooLarge { bytes, max_bytes: 1_000 }) => assert!(bytes > 2_000),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_and_other_versions_do_not_decode() {
        assert!(matches!(decode("k", Id::default(), b"\xc1"), Err(SessionError::Decode { .. })));
        let future = StoredRecord { v: 9, expiry_s: 0, expiry_ns: 0, data: HashMap::<String, u8>::new() };
        let bytes = rmp_serde::to_vec_named(&future).expect("encodes");
        assert!(matches!(decode("k", Id::default(), &bytes), Err(SessionError::Decode { .. })));
    }

    #[test]
    fn expiry_becomes_a_bounded_ttl() {
        assert_eq!(time_left_ms(OffsetDateTime::now_utc() - time::Duration::seconds(1)), None);
        let soon = time_left_ms(OffsetDateTime::now_utc() + time::Duration::seconds(10)).expect("in the future");
        assert!(soon <= 10_000 && soon > 9_000);
        let far = time_left_ms(OffsetDateTime::now_utc() + time::Duration::weeks(100_000)).expect("in the future");
        assert_eq!(far, TTL_MS_MAX);
    }

    #[test]
    fn prefixes_are_checked() {
        let with = |prefix: &str| SessionStoreConfig { key_prefix: prefix.to_owned(), ..Default::default() }.check();
        assert!(with("sessions/").is_ok());
        assert!(matches!(with(""), Err(SessionError::Config(_))));
        assert!(matches!(with("girder/sessions/"), Err(SessionError::Config(_))));
        assert!(matches!(with(&"p".repeat(KEY_PREFIX_BYTES_MAX + 1)), Err(SessionError::Config(_))));
        assert_eq!(format!("{}{}", "p".repeat(KEY_PREFIX_BYTES_MAX), Id::default()).len(), KEY_BYTES_MAX);
    }
}
