//! Per-node configuration kept in the statekeeper (the seed's consul key/value store): a
//! running node reads it with every heartbeat and applies changes without a restart.
//!
//! Keys: `slots` (evaluation slots per worker), `max-memory` (the node's memory budget,
//! e.g. `512M`, used by memory-weighted placement), `cpus` (the CPU count placement uses).

use std::collections::BTreeMap;

use crate::structures::{DsError, Map, Store};

/// The keys a node understands.
pub const CONFIG_KEYS: &[&str] = &["slots", "max-memory", "cpus"];

/// What a node runs with, from its builder and then its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) cpus: Option<u32>,
    pub(crate) max_memory_bytes: Option<u64>,
    pub(crate) slots: Option<usize>,
}

/// Why a configuration change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The key is not one a node understands.
    #[error("unknown configuration key {0:?}; known keys: slots, max-memory, cpus")]
    UnknownKey(String),
    /// The value does not parse or is out of range.
    #[error("bad value {value:?} for {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DsError),
}

fn map(store: &Store, node: &str) -> Result<Map<String, String>, ConfigError> {
    Ok(Map::new(store.clone(), format!("girder/config/{node}"))?)
}

/// Parses `512`, `64K`, `512M`, `2G` (powers of 1024) into bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&text[..i], text[i..].trim().to_ascii_uppercase()),
        None => (text, String::new()),
    };
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

fn validate(key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    match key {
        "slots" => match value.parse::<usize>() {
            Ok(n) if (1..=super::SLOTS_MAX).contains(&n) => Ok(()),
            _ => Err(bad(&format!("a number of slots from 1 to {}", super::SLOTS_MAX))),
        },
        "cpus" => match value.parse::<u32>() {
            Ok(n) if (1..=65_536).contains(&n) => Ok(()),
            _ => Err(bad("a CPU count from 1 to 65536")),
        },
        "max-memory" => parse_bytes(value).filter(|b| *b > 0).map(|_| ()).ok_or_else(|| bad("bytes, like 512M or 2G")),
        other => Err(ConfigError::UnknownKey(other.to_owned())),
    }
}

/// Sets `key` = `value` for `node` (checked first; a bad value changes nothing).
pub async fn set(store: &Store, node: &str, key: &str, value: &str) -> Result<(), ConfigError> {
    validate(key, value)?;
    map(store, node)?.put(&key.to_owned(), &value.to_owned()).await?;
    Ok(())
}

/// Removes `key` for `node`: the node goes back to what it started with.
pub async fn unset(store: &Store, node: &str, key: &str) -> Result<bool, ConfigError> {
    Ok(map(store, node)?.remove(&key.to_owned()).await?)
}

/// The configuration of `node`.
pub async fn get(store: &Store, node: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    Ok(map(store, node)?.entries().await?.into_iter().collect())
}

/// `base` with the valid entries of `config` applied on top; invalid ones are ignored
/// (they were refused when set, unless written by hand).
pub(crate) fn apply(base: &Settings, config: &BTreeMap<String, String>) -> Settings {
    let mut settings = base.clone();
    for (key, value) in config {
        if validate(key, value).is_err() {
            continue;
        }
        match key.as_str() {
            "slots" => settings.slots = value.parse().ok(),
            "cpus" => settings.cpus = value.parse().ok(),
            "max-memory" => settings.max_memory_bytes = parse_bytes(value),
            _ => {}
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_parse_with_units() {
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("99999999999999999T"), None);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(validate("slots", "0").is_err());
        assert!(validate("slots", "8").is_ok());
        assert!(matches!(validate("colour", "blue"), Err(ConfigError::UnknownKey(_))));
        let config = BTreeMap::from([("slots".to_owned(), "3".to_owned()), ("cpus".to_owned(), "x".to_owned())]);
        let applied = apply(&Settings::default(), &config);
        assert_eq!(applied.slots, Some(3));
        assert_eq!(applied.cpus, None);
    }
}
