//! Distributed components (seed 001, in the manner of Stuart Sierra's Component): parts of
//! an application with a start and a stop, started in the order of their dependencies and
//! stopped in reverse.
//!
//! A component runs either on every node of a [`ComponentSystem`] or as a **cluster
//! singleton**: on exactly one node at a time, the holder of the lock
//! `component/{name}`. The lock is held under a lease renewed in the background and timed by
//! the holder's own clock too; a holder that loses it (its node paused, cut off or gone)
//! stops the component, and another node takes the lock once the lease has run out, so the
//! singleton restarts elsewhere within the lease. Each holding gets a fencing token that
//! only grows ([`Context::token`]): pass it with every write the singleton makes, so the
//! other side can refuse a holder that was replaced (the example [`Ticker`] does).
//!
//! What happens to nodes and components is published as [`Lifecycle`] events on a
//! reliable topic ([`events::read`]).

pub mod events;
mod system;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use events::{Lifecycle, EVENTS_TOPIC};
pub use system::{ComponentStats, ComponentSystem, SINGLETON_LEASE};

use crate::structures::{DsError, Kind, Store};

/// Components one system may have.
pub const COMPONENTS_MAX: usize = 256;

/// Where a component runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// On every node that runs the system.
    EveryNode,
    /// On exactly one node at a time.
    Singleton,
}

/// What went wrong with components.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// The components do not form a system: a name twice, a missing dependency, a cycle,
    /// or a component on every node that needs a singleton.
    #[error("invalid components: {0}")]
    Invalid(String),
    /// A component failed to start (the ones started before it were stopped again).
    #[error("component {name} did not start: {error}")]
    Start {
        /// The component.
        name: String,
        /// What it said.
        error: String,
    },
    /// The statekeeper failed.
    #[error(transparent)]
    Structures(#[from] DsError),
}

/// What a running component may use.
#[derive(Clone)]
pub struct Context {
    /// The node it runs on.
    pub node: String,
    /// The grid's data structures.
    pub structures: Store,
    /// A client for grid calls.
    pub client: crate::Client,
    token: u64,
    held: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("node", &self.node).field("token", &self.token).finish()
    }
}

impl Context {
    /// A singleton's fencing token for this holding (greater than every earlier holder's);
    /// 0 for a component on every node.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether this node may still act for the component: for a singleton, whether its
    /// lease certainly holds by this node's clock (check before each write, and send the
    /// token with it); for a component on every node, whether its node's lease holds.
    pub fn is_held(&self) -> bool {
        (self.held)()
    }
}

/// A part of an application with a start and a stop.
#[async_trait]
pub trait Component: Send + Sync + 'static {
    /// Its name, unique in its system (1 to 100 characters, no control characters).
    fn name(&self) -> &str;

    /// The components started before it and stopped after it.
    fn dependencies(&self) -> Vec<String> {
        Vec::new()
    }

    /// Where it runs.
    fn placement(&self) -> Placement {
        Placement::EveryNode
    }

    /// Starts it: returns once it runs (work that goes on belongs in tasks it keeps, which
    /// `stop` ends). An error stops the system's start (for a singleton: this holding).
    async fn start(&self, ctx: Context) -> Result<(), String>;

    /// Stops it. Called once after each successful start.
    async fn stop(&self) -> Result<(), String>;
}

/// The components of a system, checked and in start order.
#[derive(Clone, Default)]
pub struct Components {
    items: Vec<Arc<dyn Component>>,
}

impl Components {
    /// No components.
    pub fn new() -> Components {
        Components::default()
    }

    /// Adds a component.
    pub fn with(mut self, component: impl Component) -> Components {
        self.items.push(Arc::new(component));
        self
    }

    /// The built-in example: the singleton [`Ticker`].
    pub fn with_examples(self) -> Components {
        self.with(Ticker::default())
    }

    /// The components in an order that starts each after its dependencies; the reason
    /// when there is none.
    pub(crate) fn ordered(&self) -> Result<Vec<Arc<dyn Component>>, ComponentError> {
        if self.items.len() > COMPONENTS_MAX {
            return Err(ComponentError::Invalid(format!("at most {COMPONENTS_MAX} components")));
        }
        let by_name = self.by_name()?;
        let mut order: Vec<Arc<dyn Component>> = Vec::with_capacity(self.items.len());
        // Depth-first, marking each name on the path (1) or done (2).
        let mut marks: std::collections::HashMap<&str, u8> = std::collections::HashMap::new();
        fn visit<'a>(
            name: &'a str,
            by_name: &std::collections::HashMap<&'a str, &'a Arc<dyn Component>>,
            marks: &mut std::collections::HashMap<&'a str, u8>,
            order: &mut Vec<Arc<dyn Component>>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), ComponentError> {
            match marks.get(name) {
                Some(2) => return Ok(()),
                Some(_) => {
                    path.push(name);
                    return Err(ComponentError::Invalid(format!("a dependency cycle: {}", path.join(" -> "))));
                }
                None => {}
            }
            let Some(component) = by_name.get(name) else {
                let needer = path.last().copied().unwrap_or("?");
                return Err(ComponentError::Invalid(format!("{needer} depends on {name:?}, which is not a component")));
            };
            marks.insert(name, 1);
            path.push(name);
            for dependency in component.dependencies() {
                let Some((key, _)) = by_name.get_key_value(dependency.as_str()) else {
                    return Err(ComponentError::Invalid(format!(
                        "{name} depends on {dependency:?}, which is not a component"
                    )));
                };
                let dependent = by_name[key];
                if component.placement() == Placement::EveryNode && dependent.placement() == Placement::Singleton {
                    return Err(ComponentError::Invalid(format!(
                        "{name} runs on every node but depends on the singleton {dependency}, which runs on one"
                    )));
                }
                visit(key, by_name, marks, order, path)?;
            }
            path.pop();
            marks.insert(name, 2);
            order.push((*component).clone());
            Ok(())
        }
        for component in &self.items {
            visit(component.name(), &by_name, &mut marks, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    fn by_name(&self) -> Result<std::collections::HashMap<&str, &Arc<dyn Component>>, ComponentError> {
        let mut by_name = std::collections::HashMap::new();
        for component in &self.items {
            let name = component.name();
            crate::workflow::check_name("component name", name).map_err(|e| ComponentError::Invalid(e.to_string()))?;
            if by_name.insert(name, component).is_some() {
                return Err(ComponentError::Invalid(format!("two components are named {name:?}")));
            }
        }
        Ok(by_name)
    }
}

/// The task a running component keeps (at most one), ended by its stop.
#[derive(Default)]
pub(crate) struct TaskSlot(parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>);

impl TaskSlot {
    /// Keeps `task`, ending the one kept before.
    pub(crate) fn keep(&self, task: tokio::task::JoinHandle<()>) {
        if let Some(old) = self.0.lock().replace(task) {
            old.abort();
        }
    }

    /// Ends the task kept, if any.
    pub(crate) fn end(&self) {
        if let Some(task) = self.0.lock().take() {
            task.abort();
        }
    }
}

/// The example singleton `examples/ticker`: every 20 ms it adds one to a fenced counter,
/// the atom `examples/ticker`, with a compare-and-set that refuses a holder whose token is
/// older than the one stored. The atom keeps the count and the holdings seen (token, node,
/// count at its first tick; the last 64), so a test can check that the holders followed
/// each other, one at a time.
#[derive(Default)]
pub struct Ticker {
    task: TaskSlot,
}

/// The atom the [`Ticker`] counts in.
pub const TICKER_KEY: &str = "examples/ticker";
/// Holdings the ticker's atom remembers.
const TICKER_HOLDINGS_MAX: usize = 64;

/// The [`Ticker`]'s fenced counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickerState {
    /// The token of the holder that ticked last.
    pub token: u64,
    /// Ticks so far, by every holder.
    pub ticks: u64,
    /// Holdings seen, oldest first: (token, node, the count at its first tick).
    pub holdings: Vec<(u64, String, u64)>,
    /// Ticks refused to a holder with an older token (a replaced holder that ticked on).
    pub refused: u64,
}

impl Ticker {
    /// One fenced tick; `false` once a newer holder's token is stored (stop ticking).
    async fn tick(ctx: &Context) -> Result<bool, DsError> {
        loop {
            let found = ctx.structures.value_get(Kind::Atom, TICKER_KEY).await?;
            let (mut state, version) = match &found {
                Some(v) => (rmp_serde::from_slice::<TickerState>(&v.bytes).unwrap_or_default(), Some(v.version)),
                None => (TickerState::default(), None),
            };
            if state.token > ctx.token() || !ctx.is_held() {
                if state.token > ctx.token() {
                    state.refused += 1;
                    let bytes = rmp_serde::to_vec_named(&state).unwrap_or_default();
                    ctx.structures.value_cas(Kind::Atom, TICKER_KEY, version, &bytes).await?;
                }
                return Ok(false);
            }
            if state.token != ctx.token() {
                state.holdings.push((ctx.token(), ctx.node.clone(), state.ticks));
                let excess = state.holdings.len().saturating_sub(TICKER_HOLDINGS_MAX);
                state.holdings.drain(..excess);
            }
            state.token = ctx.token();
            state.ticks += 1;
            let bytes = rmp_serde::to_vec_named(&state).unwrap_or_default();
            if ctx.structures.value_cas(Kind::Atom, TICKER_KEY, version, &bytes).await?.is_some() {
                return Ok(true);
            }
        }
    }
}

#[async_trait]
impl Component for Ticker {
    fn name(&self) -> &str {
        TICKER_KEY
    }

    fn placement(&self) -> Placement {
        Placement::Singleton
    }

    async fn start(&self, ctx: Context) -> Result<(), String> {
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                every.tick().await;
                match Ticker::tick(&ctx).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(err) => tracing::warn!(error = %err, "examples/ticker: a tick failed"),
                }
            }
        });
        self.task.keep(task);
        Ok(())
    }

    async fn stop(&self) -> Result<(), String> {
        self.task.end();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str, Vec<&'static str>, Placement);

    #[async_trait]
    impl Component for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn dependencies(&self) -> Vec<String> {
            self.1.iter().map(|d| (*d).to_owned()).collect()
        }
        fn placement(&self) -> Placement {
            self.2
        }
        async fn start(&self, _: Context) -> Result<(), String> {
            Ok(())
        }
        async fn stop(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn order(components: Components) -> Result<Vec<String>, String> {
        components.ordered().map(|o| o.iter().map(|c| c.name().to_owned()).collect()).map_err(|e| e.to_string())
    }

    #[test]
    fn components_start_after_their_dependencies_and_bad_graphs_are_refused() {
        use Placement::{EveryNode, Singleton};
        let ok = Components::new()
            .with(Named("web", vec!["db", "cache"], EveryNode))
            .with(Named("cache", vec!["db"], EveryNode))
            .with(Named("db", vec![], EveryNode))
            .with(Named("leader", vec!["db"], Singleton));
        assert_eq!(order(ok).unwrap(), ["db", "cache", "web", "leader"]);
        let cycle = Components::new().with(Named("a", vec!["b"], EveryNode)).with(Named("b", vec!["a"], EveryNode));
        assert!(order(cycle).unwrap_err().contains("cycle: a -> b -> a"));
        let missing = Components::new().with(Named("a", vec!["ghost"], EveryNode));
        assert!(order(missing).unwrap_err().contains("\"ghost\", which is not a component"));
        let twice = Components::new().with(Named("a", vec![], EveryNode)).with(Named("a", vec![], EveryNode));
        assert!(order(twice).unwrap_err().contains("two components"));
        let upside = Components::new().with(Named("a", vec!["s"], EveryNode)).with(Named("s", vec![], Singleton));
        assert!(order(upside).unwrap_err().contains("depends on the singleton"));
    }
}
