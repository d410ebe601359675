//! Workflows (seed 001, "Clojurecast"): single-owner state machines that take ordered
//! messages and fail over without losing or repeating one.
//!
//! A workflow *type* is a [`Workflow`]: a state (serde, `Default` for a new instance) and a
//! handler `(state, message, step) -> new state`. An *instance* is addressed by its type
//! and id and created by its first message. Messages reach it through its mailbox
//! ([`send`]): a reliable topic per flock of instance ids (`wf/inbox/{flock}`), so each
//! message has a sequence id and nothing is lost while no node runs the instance.
//!
//! **One owner.** An instance belongs to the primary of its id's flock in the placement
//! table (the node that also herds that flock's store data). That node claims an instance
//! before its first step by writing the instance record with its table epoch; from then on
//! it commits each step with a compare-and-set on the record's version. A node that lost
//! the flock (a newer table, or a paused process whose lease ran out by its own clock)
//! finds its next commit refused, because the claim changed the version: **fencing by
//! version, ordered by table epoch**, so a stale owner can never overwrite what a newer
//! one committed.
//!
//! **Exactly-once state.** A step's new state and the position it consumed (the message's
//! source and sequence id) are one record, committed in one atomic write. A new owner
//! resumes from the committed positions; messages at or below them are skipped. What a
//! handler does outside girder is at least once: [`Step::idempotency_key`] is stable across
//! replays.
//!
//! **Failure.** A handler that returns an error or panics does not advance the position:
//! the message is retried with backoff, and after [`STEP_ATTEMPTS_MAX`] attempts the
//! instance is *parked* with the error in its record; its later messages wait (they stay
//! in the mailbox) and other instances go on.
//!
//! **Inputs and effects.** Besides its mailbox, a type may subscribe to reliable topics
//! ([`Workflows::subscribe`]): a forwarder copies each topic message into the mailbox of
//! the instance it routes to, tagged with the topic and its sequence id, so every input
//! reaches an instance through one ordered path and is deduplicated by its source's
//! position. A step may send to other instances, publish to topics and set durable timers
//! ([`Step::send`], [`Step::publish`], [`Step::set_timer`]): these are committed with the
//! new state and carried out after the commit, so none is lost; sends are numbered per
//! sender and deduplicated by the receiver, publishes are at least once, and a timer fires
//! once (its firing is the commit that removes it).

mod forward;
mod record;
mod runtime;
mod timers;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use record::{instance, list, Instance, Outgoing, Status, Timer, LIST_MAX};
pub use runtime::{WorkflowRuntime, WorkflowStats, MAILBOX};

use crate::structures::{DsError, Retention};

/// Attempts of one step before its instance is parked.
pub const STEP_ATTEMPTS_MAX: u32 = 5;
/// Largest encoded state or message, in bytes.
pub const STATE_BYTES_MAX: usize = 1 << 20;
/// Longest workflow type name or instance id, in characters (at most 4 bytes each, so an
/// instance's record key stays within the statekeeper's key limit).
pub const NAME_CHARS_MAX: usize = 100;
/// Messages a mailbox keeps (per flock of ids): room for owners to be away a long time.
pub const MAILBOX_RETENTION: Retention = Retention { count_max: 1_000_000, age_ms_max: None };
/// Messages a topic a step publishes to keeps.
pub const PUBLISH_RETENTION: Retention = Retention { count_max: 1_000_000, age_ms_max: None };
/// Sends, publishes and timer changes one step may make.
pub const EFFECTS_MAX: usize = 1_000;
/// Timers one instance may have set at once.
pub const TIMERS_MAX: usize = 64;
/// Longest delay of a timer (a year).
pub const TIMER_DELAY_MS_MAX: u64 = 365 * 24 * 3_600 * 1_000;

/// What went wrong with a workflow operation.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// A name, id or value is not acceptable.
    #[error("invalid: {0}")]
    Invalid(String),
    /// No workflow type of this name is registered here.
    #[error("unknown workflow type {0:?}")]
    UnknownType(String),
    /// The statekeeper failed.
    #[error(transparent)]
    Structures(#[from] DsError),
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<S> {
    /// Keep the new state and go on.
    Continue(S),
    /// Keep the new state; the instance is finished and takes no more messages.
    Finish(S),
}

/// Where a message came from and what else a handler may use.
#[derive(Clone)]
pub struct Step {
    /// The instance's type.
    pub workflow: String,
    /// The instance's id.
    pub id: String,
    /// The message's source (`mailbox` for messages sent to the instance).
    pub source: String,
    /// The message's sequence id in its source.
    pub seq: u64,
    /// How many times this message was tried before (0 the first time).
    pub attempt: u32,
    client: Option<crate::Client>,
    /// What the handler asked for besides its new state, in order.
    effects: Arc<parking_lot::Mutex<Vec<Effect>>>,
}

/// What a step asks for besides its new state: committed with it, carried out after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// A message (MessagePack) to instance `id` of `workflow`.
    Send { workflow: String, id: String, message: Vec<u8> },
    /// A message (MessagePack) to reliable topic `topic`.
    Publish { topic: String, message: Vec<u8> },
    /// Timer `name` fires `message` (MessagePack) at `due_ms` (Unix milliseconds).
    SetTimer { name: String, due_ms: u64, message: Vec<u8> },
    /// Timer `name` no longer fires.
    CancelTimer { name: String },
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("workflow", &self.workflow)
            .field("id", &self.id)
            .field("source", &self.source)
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Step {
    /// A key that is the same every time this message is handled by this instance, for
    /// side effects outside girder (they are at least once).
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}/{}", self.workflow, self.id, self.source, self.seq)
    }

    /// A client for grid calls from the handler (`None` outside a node).
    pub fn client(&self) -> Option<&crate::Client> {
        self.client.as_ref()
    }

    /// A step for `workflow`/`id` handling message `seq` of `source`.
    pub(crate) fn new(workflow: &str, id: &str, source: &str, seq: u64, attempt: u32, client: crate::Client) -> Step {
        Step {
            workflow: workflow.to_owned(),
            id: id.to_owned(),
            source: source.to_owned(),
            seq,
            attempt,
            client: Some(client),
            effects: Arc::default(),
        }
    }

    /// Sends `message` to instance `id` of `workflow` once this step commits. The receiver
    /// sees it from source `wf:{type}/{id}` of this instance, in the order sent, once even
    /// if this step or its delivery is repeated.
    pub fn send<M: Serialize>(&self, workflow: &str, id: &str, message: &M) -> Result<(), WorkflowError> {
        check_name("workflow type", workflow)?;
        check_name("workflow id", id)?;
        let message = encode_message(message)?;
        self.push(Effect::Send { workflow: workflow.to_owned(), id: id.to_owned(), message })
    }

    /// Publishes `message` to reliable topic `topic` once this step commits (at least once:
    /// a step repeated after a failover may publish it again; [`Step::idempotency_key`]
    /// tells copies apart).
    pub fn publish<M: Serialize>(&self, topic: &str, message: &M) -> Result<(), WorkflowError> {
        check_name("topic", topic)?;
        let message = encode_message(message)?;
        self.push(Effect::Publish { topic: topic.to_owned(), message })
    }

    /// Sets timer `name` of this instance to hand it `message` after `delay` (replacing a
    /// timer of that name). It survives failover and fires once, from source `timer`.
    pub fn set_timer<M: Serialize>(&self, name: &str, delay: Duration, message: &M) -> Result<(), WorkflowError> {
        check_name("timer name", name)?;
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if delay_ms > TIMER_DELAY_MS_MAX {
            return Err(WorkflowError::Invalid(format!("a timer's delay is at most {TIMER_DELAY_MS_MAX} ms")));
        }
        let message = encode_message(message)?;
        let due_ms = crate::store::now_ms().saturating_add(delay_ms);
        self.push(Effect::SetTimer { name: name.to_owned(), due_ms, message })
    }

    /// Cancels timer `name` of this instance, if set.
    pub fn cancel_timer(&self, name: &str) -> Result<(), WorkflowError> {
        check_name("timer name", name)?;
        self.push(Effect::CancelTimer { name: name.to_owned() })
    }

    fn push(&self, effect: Effect) -> Result<(), WorkflowError> {
        let mut effects = self.effects.lock();
        if effects.len() >= EFFECTS_MAX {
            return Err(WorkflowError::Invalid(format!(
                "a step makes at most {EFFECTS_MAX} sends, publishes and timer changes"
            )));
        }
        effects.push(effect);
        Ok(())
    }

    /// The effects asked for so far, taken.
    pub(crate) fn take_effects(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.effects.lock())
    }
}

fn encode_message<M: Serialize>(message: &M) -> Result<Vec<u8>, WorkflowError> {
    let bytes = rmp_serde::to_vec_named(message).map_err(|e| WorkflowError::Invalid(e.to_string()))?;
    if bytes.len() > STATE_BYTES_MAX {
        return Err(WorkflowError::Invalid(format!("a message is at most {STATE_BYTES_MAX} bytes")));
    }
    Ok(bytes)
}

/// A workflow type: its state and how a message changes it.
#[async_trait]
pub trait Workflow: Send + Sync + 'static {
    /// The type's name (e.g. `examples/counter`).
    const NAME: &'static str;
    /// The instance state; a new instance starts from `Default`.
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;
    /// The messages it takes.
    type Message: Serialize + DeserializeOwned + Send + 'static;

    /// Handles one message. An error (or a panic) leaves the state and position as they
    /// were; the message is tried again.
    async fn handle(
        &self,
        state: Self::State,
        message: Self::Message,
        step: &Step,
    ) -> Result<Next<Self::State>, String>;
}

/// A workflow type with its types erased: bytes in, bytes out (MessagePack).
#[async_trait]
pub(crate) trait Handler: Send + Sync {
    async fn step(&self, state: Option<&[u8]>, message: &[u8], step: &Step) -> Result<(Vec<u8>, bool), String>;
}

struct Typed<W>(W);

#[async_trait]
impl<W: Workflow> Handler for Typed<W> {
    async fn step(&self, state: Option<&[u8]>, message: &[u8], step: &Step) -> Result<(Vec<u8>, bool), String> {
        let state: W::State = match state {
            Some(bytes) => {
                rmp_serde::from_slice(bytes).map_err(|e| format!("the stored state does not decode: {e}"))?
            }
            None => W::State::default(),
        };
        let message: W::Message =
            rmp_serde::from_slice(message).map_err(|e| format!("the message does not decode: {e}"))?;
        let (state, finished) = match self.0.handle(state, message, step).await? {
            Next::Continue(state) => (state, false),
            Next::Finish(state) => (state, true),
        };
        let bytes = rmp_serde::to_vec_named(&state).map_err(|e| format!("the new state does not encode: {e}"))?;
        Ok((bytes, finished))
    }
}

/// How a topic message finds its instance: its id, or `None` to skip it.
pub(crate) type Route = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

/// A reliable topic a workflow type takes messages from.
#[derive(Clone)]
pub(crate) struct Subscription {
    pub(crate) topic: String,
    pub(crate) workflow: String,
    pub(crate) route: Route,
}

/// The workflow types a node runs, by name, and the topics they subscribe to.
#[derive(Clone, Default)]
pub struct Workflows {
    types: std::collections::HashMap<String, Arc<dyn Handler>>,
    subscriptions: Vec<Subscription>,
}

impl Workflows {
    /// No types.
    pub fn new() -> Workflows {
        Workflows::default()
    }

    /// Adds a workflow type.
    pub fn with<W: Workflow>(mut self, workflow: W) -> Workflows {
        self.types.insert(W::NAME.to_owned(), Arc::new(Typed(workflow)));
        self
    }

    /// Feeds type `W` the messages of reliable topic `topic`: each goes to the instance
    /// whose id `route` gives (`None`: skipped), in the topic's order, once, from source
    /// `topic:{topic}`. Every node that runs `W` must subscribe it alike.
    pub fn subscribe<W: Workflow>(
        mut self,
        topic: &str,
        route: impl Fn(&W::Message) -> Option<String> + Send + Sync + 'static,
    ) -> Result<Workflows, WorkflowError> {
        check_name("topic", topic)?;
        let route: Route = Arc::new(move |bytes: &[u8]| route(&rmp_serde::from_slice::<W::Message>(bytes).ok()?));
        self.subscriptions.push(Subscription { topic: topic.to_owned(), workflow: W::NAME.to_owned(), route });
        Ok(self)
    }

    /// The built-in example types (`examples/counter`).
    pub fn with_examples(self) -> Workflows {
        self.with(Counter)
    }

    /// Feeds `examples/counter` the messages of `topic`, each to the instance its `id`
    /// field names (e.g. `{"id": "c1"}`).
    pub fn with_counter_topic(self, topic: &str) -> Result<Workflows, WorkflowError> {
        self.subscribe::<Counter>(topic, Counter::route)
    }

    /// The names of the registered types.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.types.keys().cloned().collect();
        names.sort();
        names
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.types.get(name)
    }

    pub(crate) fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }
}

/// One message in a mailbox: whom it is for, its bytes (MessagePack), and where it came
/// from when it was not sent to the mailbox directly.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) workflow: String,
    pub(crate) id: String,
    #[serde(with = "serde_bytes_compat")]
    pub(crate) message: Vec<u8>,
    /// The message's source and its sequence id there (`None`: the mailbox, at the
    /// message's place in it).
    #[serde(default)]
    pub(crate) origin: Option<(String, u64)>,
}

/// The source name of messages forwarded from reliable topic `topic`.
pub fn topic_source(topic: &str) -> String {
    format!("topic:{topic}")
}

/// The source name of messages sent by instance `id` of `workflow`.
pub fn instance_source(workflow: &str, id: &str) -> String {
    format!("wf:{workflow}/{id}")
}

/// MessagePack `bin` for the message bytes.
mod serde_bytes_compat {
    pub(super) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let bytes: bytes::Bytes = serde::Deserialize::deserialize(d)?;
        Ok(bytes.to_vec())
    }
}

/// The mailbox topic of instance `id`'s flock.
pub(crate) fn inbox_of(flock: u32) -> String {
    format!("wf/inbox/{flock}")
}

/// The flock of instance `(workflow, id)`: by id alone, so one id's instances of every
/// type live together.
pub fn flock_of(id: &str) -> u32 {
    crate::placement::flock_of(id.as_bytes())
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), WorkflowError> {
    let chars = name.chars().count();
    if chars == 0 || chars > NAME_CHARS_MAX {
        return Err(WorkflowError::Invalid(format!("a {what} is 1 to {NAME_CHARS_MAX} characters, got {chars}")));
    }
    if name.chars().any(char::is_control) {
        return Err(WorkflowError::Invalid(format!("a {what} has no control characters")));
    }
    Ok(())
}

/// Sends `message` to instance `id` of `workflow` (creating it on its first message);
/// returns its sequence id in the mailbox. Any process of the grid may send.
pub async fn send<M: Serialize>(
    structures: &crate::structures::Store,
    workflow: &str,
    id: &str,
    message: &M,
) -> Result<u64, WorkflowError> {
    let bytes = rmp_serde::to_vec_named(message).map_err(|e| WorkflowError::Invalid(e.to_string()))?;
    send_bytes(structures, workflow, id, bytes).await
}

/// [`send`] of a message already encoded as MessagePack.
pub async fn send_bytes(
    structures: &crate::structures::Store,
    workflow: &str,
    id: &str,
    message: Vec<u8>,
) -> Result<u64, WorkflowError> {
    check_name("workflow type", workflow)?;
    check_name("workflow id", id)?;
    if message.len() > STATE_BYTES_MAX {
        return Err(WorkflowError::Invalid(format!("a message is at most {STATE_BYTES_MAX} bytes")));
    }
    post(structures, Envelope { workflow: workflow.to_owned(), id: id.to_owned(), message, origin: None }).await
}

/// Puts `envelope` in its instance's mailbox; its place there.
pub(crate) async fn post(structures: &crate::structures::Store, envelope: Envelope) -> Result<u64, WorkflowError> {
    let flock = flock_of(&envelope.id);
    let bytes = rmp_serde::to_vec_named(&envelope).map_err(|e| WorkflowError::Invalid(e.to_string()))?;
    Ok(structures.reliable_publish(&inbox_of(flock), &bytes, MAILBOX_RETENTION).await?)
}

/// The example workflow type `examples/counter`: counts the messages it handled, by
/// source. Any message will do; the text `"finish"` finishes it, `"panic"` panics. A map
/// may also ask for effects: `{"after_ms": N}` sets timer `t` to fire in N ms (counted
/// from source `timer:t`), `{"send_to": ID}` sends a message to counter `ID` (counted there
/// from source `wf:examples/counter/{this id}`).
pub struct Counter;

impl Counter {
    /// The instance a topic message is for: its `id` field.
    pub fn route(message: &rmpv::Value) -> Option<String> {
        let map = message.as_map()?;
        let (_, id) = map.iter().find(|(k, _)| k.as_str() == Some("id"))?;
        id.as_str().map(str::to_owned)
    }
}

/// The state of an `examples/counter` instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// Messages handled, by source.
    pub counts: std::collections::BTreeMap<String, u64>,
}

#[async_trait]
impl Workflow for Counter {
    const NAME: &'static str = "examples/counter";
    type State = CounterState;
    type Message = rmpv::Value;

    async fn handle(
        &self,
        mut state: CounterState,
        message: rmpv::Value,
        step: &Step,
    ) -> Result<Next<CounterState>, String> {
        *state.counts.entry(step.source.clone()).or_default() += 1;
        let field = |name: &str| message.as_map()?.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
        if let Some(after_ms) = field("after_ms").and_then(rmpv::Value::as_u64) {
            step.set_timer("t", Duration::from_millis(after_ms), &"tick").map_err(|e| e.to_string())?;
        }
        if let Some(to) = field("send_to").and_then(rmpv::Value::as_str) {
            step.send(Self::NAME, to, &"hello").map_err(|e| e.to_string())?;
        }
        if message.as_str() == Some("panic") {
            panic!("examples/counter was told to panic");
        }
        if message.as_str() == Some("finish") {
            return Ok(Next::Finish(state));
        }
        Ok(Next::Continue(state))
    }
}
