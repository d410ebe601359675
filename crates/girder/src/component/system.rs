//! A node's component system: its components on every node started in order at once, and
//! a supervisor that takes the lock of each singleton it can, runs it while the lock's
//! lease holds, and stops it when the lease is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::events::{self, Lifecycle, Watch};
use super::{Component, ComponentError, Components, Context, Placement};
use crate::structures::{Kind, Lock, LockGuard, Store};

/// How long a singleton's holding lasts unless renewed (renewed well before): a singleton
/// whose node dies restarts elsewhere within about this.
pub const SINGLETON_LEASE: Duration = Duration::from_millis(2_000);
/// How often the supervisor looks for lost holdings and free singletons.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// What a node's component system did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ComponentStats {
    /// The components running here now, in start order.
    pub running: Vec<String>,
    /// Starts here (singletons count each holding).
    pub starts: u64,
    /// Stops here.
    pub stops: u64,
    /// Singleton holdings lost here (lease not renewed in time).
    pub lost: u64,
}

struct Inner {
    node: String,
    store: Store,
    client: crate::Client,
    /// Whether the node's lease holds by its own clock.
    lease_ok: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Components on every node, started, in start order.
    every: Vec<Arc<dyn Component>>,
    /// Singletons in start order.
    singletons: Vec<Arc<dyn Component>>,
    /// The singletons held here, with their locks, in the order taken.
    held: tokio::sync::Mutex<Vec<(Arc<dyn Component>, LockGuard)>>,
    starts: AtomicU64,
    stops: AtomicU64,
    lost: AtomicU64,
}

/// A node's running components; [`ComponentSystem::shutdown`] stops them in reverse order.
pub struct ComponentSystem {
    inner: Arc<Inner>,
    supervisor: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl ComponentSystem {
    /// Starts `components` on `node`: those on every node now, in dependency order (if one
    /// fails, the ones started are stopped again and its error returned), the singletons
    /// whenever this node holds them. Adds the cluster watch (a singleton).
    pub async fn start(node: &crate::Node, components: Components) -> Result<ComponentSystem, ComponentError> {
        let watch = Arc::new(Watch { placement: node.placement(), task: super::TaskSlot::default() });
        let order = components.with(watch).ordered()?;
        let (every, singletons): (Vec<_>, Vec<_>) =
            order.into_iter().partition(|c| c.placement() == Placement::EveryNode);
        let mut inner = Inner {
            node: node.id().to_owned(),
            store: node.structures(),
            client: node.client(),
            lease_ok: node.lease_check(),
            every: Vec::new(),
            singletons,
            held: tokio::sync::Mutex::new(Vec::new()),
            starts: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        };
        for component in every {
            let ctx = inner.context(0, inner.lease_ok.clone());
            if let Err(error) = component.start(ctx).await {
                for started in inner.every.iter().rev() {
                    inner.stop(started, "a later component did not start").await;
                }
                return Err(ComponentError::Start { name: component.name().to_owned(), error });
            }
            inner.started(component.name()).await;
            inner.every.push(component);
        }
        let inner = Arc::new(inner);
        let supervisor = tokio::spawn(supervise(inner.clone()));
        Ok(ComponentSystem { inner, supervisor: parking_lot::Mutex::new(Some(supervisor)) })
    }

    /// Stops the singletons held here (releasing them at once to another node), then the
    /// components on every node, each in reverse start order.
    pub async fn shutdown(&self) {
        if let Some(supervisor) = self.supervisor.lock().take() {
            supervisor.abort();
        }
        let leaving = events::leaving_key(&self.inner.node);
        if let Err(err) = self.inner.store.value_set(Kind::Value, &leaving, b"1", Some(events::LEAVING_TTL_MS)).await {
            tracing::debug!(error = %err, "components: saying this node leaves failed");
        }
        let held: Vec<_> = std::mem::take(&mut *self.inner.held.lock().await);
        for (component, guard) in held.into_iter().rev() {
            self.inner.stop(&component, "shutdown").await;
            if let Err(err) = guard.release().await {
                tracing::debug!(component = component.name(), error = %err, "components: releasing a singleton failed");
            }
        }
        for component in self.inner.every.iter().rev() {
            self.inner.stop(component, "shutdown").await;
        }
    }

    /// What the system did, and what runs here now.
    pub async fn stats(&self) -> ComponentStats {
        let held = self.inner.held.lock().await;
        let running = self.inner.every.iter().chain(held.iter().map(|(c, _)| c)).map(|c| c.name().to_owned()).collect();
        ComponentStats {
            running,
            starts: self.inner.starts.load(Ordering::Relaxed),
            stops: self.inner.stops.load(Ordering::Relaxed),
            lost: self.inner.lost.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ComponentSystem {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.lock().take() {
            supervisor.abort();
        }
    }
}

impl Inner {
    fn context(&self, token: u64, held: Arc<dyn Fn() -> bool + Send + Sync>) -> Context {
        Context { node: self.node.clone(), structures: self.store.clone(), client: self.client.clone(), token, held }
    }

    async fn started(&self, name: &str) {
        self.starts.fetch_add(1, Ordering::Relaxed);
        let event = Lifecycle::ComponentStarted { component: name.to_owned(), node: self.node.clone() };
        events::publish(&self.store, &event).await;
    }

    async fn stop(&self, component: &Arc<dyn Component>, why: &str) {
        let reason = match component.stop().await {
            Ok(()) => why.to_owned(),
            Err(error) => format!("{why}; its stop failed: {error}"),
        };
        self.stops.fetch_add(1, Ordering::Relaxed);
        let node = self.node.clone();
        events::publish(
            &self.store,
            &Lifecycle::ComponentStopped { component: component.name().to_owned(), node, reason },
        )
        .await;
    }

    /// Takes `component`'s lock if it is free and starts it here.
    async fn try_hold(&self, component: &Arc<dyn Component>) -> Option<LockGuard> {
        let name = component.name();
        let lock = Lock::new(self.store.clone(), format!("component/{name}"), SINGLETON_LEASE).ok()?;
        let guard = match lock.try_lock_now().await {
            Ok(Some(guard)) => guard,
            Ok(None) => return None,
            Err(err) => {
                tracing::debug!(component = name, error = %err, "components: trying a singleton's lock failed");
                return None;
            }
        };
        let (lease, node_lease) = (guard.held_check(), self.lease_ok.clone());
        let ctx = self.context(guard.token(), Arc::new(move || lease() && node_lease()));
        if let Err(error) = component.start(ctx).await {
            tracing::warn!(component = name, %error, "components: a singleton did not start; giving it up");
            let _ = guard.release().await;
            return None;
        }
        self.started(name).await;
        self.moved(name).await;
        Some(guard)
    }

    /// Reports a singleton that started here after running elsewhere.
    async fn moved(&self, name: &str) {
        let key = format!("component/{name}/last");
        let last = match self.store.value_get(Kind::Atom, &key).await {
            Ok(found) => found.map(|v| String::from_utf8_lossy(&v.bytes).into_owned()),
            Err(_) => None,
        };
        if let Err(err) = self.store.value_set(Kind::Atom, &key, self.node.as_bytes(), None).await {
            tracing::debug!(component = name, error = %err, "components: recording where a singleton runs failed");
        }
        if let Some(from) = last.filter(|from| *from != self.node) {
            let event = Lifecycle::ComponentMoved { component: name.to_owned(), from, to: self.node.clone() };
            events::publish(&self.store, &event).await;
        }
    }
}

/// Stops the singletons whose lease was lost, takes the free ones.
async fn supervise(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    loop {
        tick.tick().await;
        let mut held = inner.held.lock().await;
        let mut kept = Vec::with_capacity(held.len());
        for (component, guard) in std::mem::take(&mut *held) {
            if guard.is_held() && (inner.lease_ok)() {
                kept.push((component, guard));
            } else {
                inner.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(component = component.name(), node = %inner.node, "components: a singleton's lease was lost; stopping it");
                inner.stop(&component, "lease lost").await;
            }
        }
        *held = kept;
        if !(inner.lease_ok)() {
            continue;
        }
        for component in &inner.singletons {
            if held.iter().any(|(c, _)| c.name() == component.name()) {
                continue;
            }
            if let Some(guard) = inner.try_hold(component).await {
                held.push((component.clone(), guard));
            }
        }
    }
}
