//! An instance's record in the statekeeper: its state, the positions it consumed, its
//! owner and epoch, and whether it runs, finished or is parked. Every change is one
//! compare-and-set on the record's version, which is what fences a stale owner.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{WorkflowError, STATE_BYTES_MAX};

/// Largest encoded record: its state, plus the outbox and timers of a step.
pub const RECORD_BYTES_MAX: usize = 8 << 20;
use crate::structures::{Kind, Store};

/// Whether an instance takes messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// It takes messages.
    Running,
    /// It finished; later messages are skipped.
    Finished,
    /// A message failed every attempt: `error` says why; that message and later ones wait.
    Parked {
        /// The last attempt's error.
        error: String,
        /// The source of the message that failed.
        source: String,
        /// Its sequence id in its source.
        seq: u64,
        /// Its place in the flock's mailbox (0 for a timer): the mailbox is kept from there.
        #[serde(default)]
        at: u64,
    },
}

/// An effect of a committed step still to be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outgoing {
    /// A message to another instance, the `seq`th this instance sent.
    Send {
        /// The receiver's type.
        workflow: String,
        /// The receiver's id.
        id: String,
        /// The message (MessagePack).
        message: Bytes,
        /// Its number among this instance's sends (the receiver's position for it).
        seq: u64,
    },
    /// A message to a reliable topic.
    Publish {
        /// The topic.
        topic: String,
        /// The message (MessagePack).
        message: Bytes,
    },
}

/// A durable timer of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// When it fires (Unix milliseconds).
    pub due_ms: u64,
    /// What it hands the instance (MessagePack).
    pub message: Bytes,
    /// Its number among this instance's timers (the step's sequence id when it fires).
    pub seq: u64,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The encoded state (MessagePack); `None` before the first step.
    pub state: Option<Bytes>,
    /// The last sequence id handled, per source.
    pub positions: BTreeMap<String, u64>,
    /// The node that owns it.
    pub owner: String,
    /// The placement table epoch its owner claimed it under.
    pub epoch: u64,
    /// How many times an owner claimed it (its first owner's claim included).
    #[serde(default)]
    pub claims: u64,
    /// Messages handled.
    pub handled: u64,
    /// Whether it runs, finished or is parked.
    pub status: Status,
    /// Effects of the last step not yet carried out (a new owner carries them out first).
    #[serde(default)]
    pub outbox: Vec<Outgoing>,
    /// Messages this instance sent to other instances so far.
    #[serde(default)]
    pub sent: u64,
    /// Timers set, by name.
    #[serde(default)]
    pub timers: BTreeMap<String, Timer>,
    /// Timers set so far.
    #[serde(default)]
    pub timers_set: u64,
}

impl Instance {
    /// A new instance, owned by nobody yet.
    pub(crate) fn new() -> Instance {
        Instance {
            state: None,
            positions: BTreeMap::new(),
            owner: String::new(),
            epoch: 0,
            claims: 0,
            handled: 0,
            status: Status::Running,
            outbox: Vec::new(),
            sent: 0,
            timers: BTreeMap::new(),
            timers_set: 0,
        }
    }
}

/// A record read with its version (0: absent).
pub(crate) struct Loaded {
    pub(crate) instance: Option<Instance>,
    pub(crate) version: u64,
}

/// The record's key.
pub(crate) fn key_of(workflow: &str, id: &str) -> String {
    format!("wf/i/{workflow}/{id}")
}

/// Reads an instance's record.
pub(crate) async fn load(store: &Store, workflow: &str, id: &str) -> Result<Loaded, WorkflowError> {
    match store.value_get(Kind::Atom, &key_of(workflow, id)).await? {
        None => Ok(Loaded { instance: None, version: 0 }),
        Some(found) => {
            let instance = rmp_serde::from_slice(&found.bytes)
                .map_err(|e| WorkflowError::Invalid(format!("the record of {workflow}/{id} does not decode: {e}")))?;
            Ok(Loaded { instance: Some(instance), version: found.version })
        }
    }
}

/// Writes `instance` if the record is still at `version` (0: absent); the new version, or
/// `None` when someone else wrote it first (a newer owner: this one must stop).
pub(crate) async fn commit(
    store: &Store,
    workflow: &str,
    id: &str,
    version: u64,
    instance: &Instance,
) -> Result<Option<u64>, WorkflowError> {
    if instance.state.as_ref().is_some_and(|s| s.len() > STATE_BYTES_MAX) {
        return Err(WorkflowError::Invalid(format!("a state is at most {STATE_BYTES_MAX} bytes")));
    }
    let bytes = rmp_serde::to_vec_named(instance).map_err(|e| WorkflowError::Invalid(e.to_string()))?;
    if bytes.len() > RECORD_BYTES_MAX {
        let why = format!("a record (state, outbox and timers) is at most {RECORD_BYTES_MAX} bytes");
        return Err(WorkflowError::Invalid(why));
    }
    let expected = (version != 0).then_some(version);
    Ok(store.value_cas(Kind::Atom, &key_of(workflow, id), expected, &bytes).await?)
}

/// Instances a listing returns at most.
pub const LIST_MAX: usize = 1_000;

fn list_key(workflow: &str) -> String {
    format!("wf/ids/{workflow}")
}

/// Adds an instance to its type's listing.
pub(crate) async fn list_add(store: &Store, workflow: &str, id: &str) -> Result<(), WorkflowError> {
    store.set_add(&list_key(workflow), id.as_bytes()).await?;
    Ok(())
}

/// How many instances of `workflow` exist, and the ids of up to `limit` of them (at most
/// [`LIST_MAX`], in no particular order).
pub async fn list(store: &Store, workflow: &str, limit: usize) -> Result<(u64, Vec<String>), WorkflowError> {
    super::check_name("workflow type", workflow)?;
    let key = list_key(workflow);
    let count = store.set_len(&key).await?;
    let members = store.set_members(&key, limit.min(LIST_MAX)).await?;
    let mut ids: Vec<String> = members.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    ids.sort();
    Ok((count, ids))
}

/// Reads an instance and reports it, for status and tests (`None`: never sent anything).
pub async fn instance(store: &Store, workflow: &str, id: &str) -> Result<Option<Instance>, WorkflowError> {
    Ok(load(store, workflow, id).await?.instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Statekeeper;

    fn owned_by(owner: &str, epoch: u64, handled: u64) -> Instance {
        Instance {
            state: Some(Bytes::from(vec![handled as u8])),
            positions: BTreeMap::from([("mailbox".to_owned(), handled)]),
            owner: owner.to_owned(),
            epoch,
            handled,
            ..Instance::new()
        }
    }

    #[tokio::test]
    async fn a_stale_owner_cannot_commit_over_a_newer_claim() {
        let store = crate::Embedded::new(crate::EmbeddedConfig::default()).structures();
        let v1 = commit(&store, "t", "i", 0, &owned_by("a", 1, 0)).await.unwrap().expect("a claims a new instance");
        let v2 = commit(&store, "t", "i", v1, &owned_by("a", 1, 1)).await.unwrap().expect("a commits a step");
        // b claims under a newer epoch, from what it read.
        let read = load(&store, "t", "i").await.unwrap();
        assert_eq!(read.version, v2);
        commit(&store, "t", "i", read.version, &owned_by("b", 2, 1)).await.unwrap().expect("b claims");
        // a, paused meanwhile, tries to commit its next step from its old version.
        let stale = commit(&store, "t", "i", v2, &owned_by("a", 1, 2)).await.unwrap();
        assert_eq!(stale, None, "a's commit is refused");
        let now = load(&store, "t", "i").await.unwrap().instance.unwrap();
        assert_eq!((now.owner.as_str(), now.epoch, now.handled), ("b", 2, 1), "b's record stands");
        assert_eq!(commit(&store, "t", "i", 0, &owned_by("c", 3, 0)).await.unwrap(), None, "no blind create");
    }
}
