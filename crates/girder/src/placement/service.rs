//! The placement service: keeps the grid's [`FlockTable`] in step with its live nodes, and
//! answers the seed's `init`, `node_id` and `node_ids` from a local snapshot.
//!
//! The table is an atom in the data-structure store: every node recomputes the table it
//! wants from the live nodes after each heartbeat and, if it differs from the stored one,
//! replaces it by compare-and-set with the next epoch; concurrent writers race harmlessly.
//! Ids placed with [`Placement::init`] are kept in a directory map and win over the table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::{flock_of, FlockTable, Strategy};
use crate::control::{Health, NodeInfo, Statekeeper};
use crate::structures::{Atom, DsError, Map, Store};

/// Where the table lives in the store.
pub const TABLE_KEY: &str = "girder/placement/table";
/// Where ids placed by `init` live.
pub const DIRECTORY_KEY: &str = "girder/placement/ids";
/// Owners per flock unless configured.
pub const REPLICAS_DEFAULT: u32 = 2;
/// Most ids one `init` call places.
pub const INIT_IDS_MAX: usize = 1_000_000;

/// Most `init` placements a process keeps in memory; older ones are read again from the
/// store when asked for.
pub const DIRECTORY_CACHED_MAX: usize = 100_000;

/// A snapshot of placement: the table and the live nodes, as last read.
struct Snapshot {
    table: Arc<FlockTable>,
    /// Shared, so a view of it costs no copy: it is replaced whole on every refresh.
    nodes: Arc<HashMap<String, NodeInfo>>,
    node_ttl_ms: u64,
    /// `init` placements seen by this process, bounded (ids come from callers).
    directory: lru::LruCache<String, Vec<String>>,
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        let cap = std::num::NonZeroUsize::new(DIRECTORY_CACHED_MAX).unwrap_or(std::num::NonZeroUsize::MIN);
        Snapshot { table: Arc::default(), nodes: Arc::default(), node_ttl_ms: 0, directory: lru::LruCache::new(cap) }
    }
}

/// Placement of keys and ids on the grid's nodes.
pub struct Placement {
    statekeeper: Arc<dyn Statekeeper>,
    store: Store,
    local: Option<String>,
    snapshot: RwLock<Snapshot>,
    /// Round-trip times from this process to other nodes, as last measured.
    rtt: RwLock<HashMap<String, Duration>>,
}

/// Most nodes one round of round-trip measurements probes.
const RTT_PROBES_MAX: usize = 64;
/// Longest a probe waits; a node slower than that counts as far away.
const RTT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

impl Placement {
    /// Placement on `statekeeper`'s grid, seen from node `local` (for closeness), if any.
    pub fn new(statekeeper: Arc<dyn Statekeeper>, local: Option<String>) -> Placement {
        let store = statekeeper.structures();
        Placement { statekeeper, store, local, snapshot: RwLock::default(), rtt: RwLock::default() }
    }

    fn table_atom(&self) -> Result<Atom<FlockTable>, DsError> {
        Atom::new(self.store.clone(), TABLE_KEY)
    }

    fn directory(&self) -> Result<Map<String, Vec<String>>, DsError> {
        Map::new(self.store.clone(), DIRECTORY_KEY)
    }

    /// Reads the live nodes and the table; if the table does not match the live nodes, a
    /// new one (next epoch) replaces it. `node_ttl_ms` judges the nodes' health.
    pub async fn refresh(&self, node_ttl_ms: u64) -> Result<Arc<FlockTable>, DsError> {
        let nodes = self.statekeeper.live_nodes().await.map_err(|e| DsError::Unavailable(e.to_string()))?;
        let atom = self.table_atom()?;
        // The strategy and replication factor are the stored table's: `configure` sets them.
        let settings = |table: &FlockTable| {
            if table.replicas == 0 {
                (REPLICAS_DEFAULT, Strategy::default())
            } else {
                (table.replicas, table.strategy)
            }
        };
        let weights = |strategy: Strategy| -> Vec<(String, f64)> {
            // Suspect nodes keep their flocks: only dead ones (reaped) lose them.
            nodes.iter().map(|n| (n.id.clone(), strategy.weight(n))).collect()
        };
        // The epoch this process has seen: a stored table below it was lost (a statekeeper
        // that came back empty) and is replaced by one above it, so epochs only grow here.
        let floor = self.snapshot.read().table.epoch;
        let current = atom.get().await?.unwrap_or_default();
        let (replicas, strategy) = settings(&current);
        let table = if current.epoch >= floor && current.matches(replicas, strategy, &weights(strategy)) {
            current
        } else {
            // Recomputed from the value being replaced, so a concurrent `configure` or
            // another node's newer table is never overwritten with stale settings.
            atom.swap(|old| {
                let old = old.unwrap_or_default();
                let (replicas, strategy) = settings(&old);
                let wanted = weights(strategy);
                if old.epoch >= floor && old.matches(replicas, strategy, &wanted) {
                    old
                } else {
                    FlockTable::compute(old.epoch.max(floor) + 1, replicas, strategy, &wanted)
                }
            })
            .await?
        };
        let mut snapshot = self.snapshot.write();
        // Refreshes run at once (heartbeats, the store, seals): one that read an older table
        // than another already installed keeps the newer. A table's view never goes back.
        if table.epoch >= snapshot.table.epoch {
            snapshot.table = Arc::new(table);
        }
        snapshot.nodes = Arc::new(nodes.into_iter().map(|n| (n.id.clone(), n)).collect());
        snapshot.node_ttl_ms = node_ttl_ms;
        Ok(snapshot.table.clone())
    }

    /// Sets the strategy and replication factor; the next refresh recomputes the table.
    pub async fn configure(&self, strategy: Strategy, replicas: u32) -> Result<(), DsError> {
        if replicas == 0 {
            return Err(DsError::Invalid("the replication factor must be at least 1".into()));
        }
        self.table_atom()?
            .swap(|old| {
                let old = old.unwrap_or_default();
                FlockTable { epoch: old.epoch + 1, replicas, strategy, nodes: Vec::new(), owners: Vec::new() }
            })
            .await?;
        Ok(())
    }

    /// The table as last read.
    pub fn table(&self) -> Arc<FlockTable> {
        self.snapshot.read().table.clone()
    }

    /// The table and the nodes as last read (one consistent snapshot, shared, not
    /// copied), with the lease that tells the dead among them (see [`NodeInfo::health`]).
    pub fn view(&self) -> (Arc<FlockTable>, Arc<HashMap<String, NodeInfo>>, u64) {
        let snapshot = self.snapshot.read();
        (snapshot.table.clone(), snapshot.nodes.clone(), snapshot.node_ttl_ms.max(1))
    }

    /// Spreads `ids` over the live nodes by `strategy` (smooth weighted round robin, so
    /// shares are exact), `replicas` owners each, and records them. Returns each id's owners.
    pub async fn init(
        &self,
        ids: &[String],
        strategy: Strategy,
        replicas: u32,
    ) -> Result<HashMap<String, Vec<String>>, DsError> {
        if ids.len() > INIT_IDS_MAX {
            return Err(DsError::Invalid(format!("init places at most {INIT_IDS_MAX} ids at once, got {}", ids.len())));
        }
        let mut nodes: Vec<NodeInfo> =
            self.statekeeper.live_nodes().await.map_err(|e| DsError::Unavailable(e.to_string()))?;
        if nodes.is_empty() {
            return Err(DsError::Invalid("no live node to place ids on".into()));
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let weights: Vec<f64> = nodes.iter().map(|n| strategy.weight(n)).collect();
        let total: f64 = weights.iter().sum();
        let mut current = vec![0.0; nodes.len()];
        let take = (replicas.max(1) as usize).min(nodes.len());
        let directory = self.directory()?;
        let mut placed = HashMap::with_capacity(ids.len());
        for id in ids {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let best = (0..nodes.len()).max_by(|&a, &b| current[a].total_cmp(&current[b]).then(b.cmp(&a))).unwrap_or(0);
            current[best] -= total;
            let owners: Vec<String> = (0..take).map(|k| nodes[(best + k) % nodes.len()].id.clone()).collect();
            directory.put(id, &owners).await?;
            placed.insert(id.clone(), owners);
        }
        let mut snapshot = self.snapshot.write();
        for (id, owners) in &placed {
            snapshot.directory.put(id.clone(), owners.clone());
        }
        drop(snapshot);
        Ok(placed)
    }

    fn live(&self, snapshot: &Snapshot, node: &str) -> bool {
        snapshot.nodes.get(node).is_some_and(|n| n.health(snapshot.node_ttl_ms.max(1)) != Health::Dead)
    }

    /// The live nodes holding `id`, best first, from the local snapshot (ids placed by
    /// `init` on this process, else the flock table). No round trip: fit for hot paths.
    pub fn node_ids_cached(&self, id: &str) -> Vec<String> {
        let snapshot = self.snapshot.read();
        let listed = snapshot.directory.peek(id).map(|owners| owners.iter().map(String::as_str).collect::<Vec<_>>());
        let owners = listed.unwrap_or_else(|| snapshot.table.owners_of(flock_of(id.as_bytes())).collect());
        owners.into_iter().filter(|n| self.live(&snapshot, n)).map(str::to_owned).collect()
    }

    /// The live nodes holding `id`, best first: its `init` placement wherever it was made,
    /// else its flock's owners.
    pub async fn node_ids(&self, id: &str) -> Result<Vec<String>, DsError> {
        let known = self.snapshot.read().directory.contains(id);
        if !known {
            if let Some(owners) = self.directory()?.get(&id.to_owned()).await? {
                self.snapshot.write().directory.put(id.to_owned(), owners);
            }
        }
        let owners = self.node_ids_cached(id);
        if !owners.is_empty() || !known {
            return Ok(owners);
        }
        // Every node `init` chose is gone: the flock's owners take over.
        let snapshot = self.snapshot.read();
        let table_owners: Vec<String> = snapshot
            .table
            .owners_of(flock_of(id.as_bytes()))
            .filter(|n| self.live(&snapshot, n))
            .map(str::to_owned)
            .collect();
        Ok(table_owners)
    }

    /// Measures the round trip from this process to each live node's HTTP address (a TCP
    /// handshake), for [`Placement::best_of`]'s closeness.
    pub async fn measure_rtts(&self) {
        let targets: Vec<(String, String)> = {
            let snapshot = self.snapshot.read();
            snapshot
                .nodes
                .values()
                .filter_map(|n| Some((n.id.clone(), n.http.as_deref()?.trim_start_matches("http://").to_owned())))
                .take(RTT_PROBES_MAX)
                .collect()
        };
        // All at once: one peer that never answers costs one probe timeout, not one each.
        let probes = targets.into_iter().map(|(node, address)| async move {
            let begun = Instant::now();
            let rtt = match tokio::time::timeout(RTT_PROBE_TIMEOUT, tokio::net::TcpStream::connect(&address)).await {
                Ok(Ok(_)) => begun.elapsed(),
                _ => RTT_PROBE_TIMEOUT,
            };
            (node, rtt)
        });
        let measured = futures::future::join_all(probes).await;
        // Replaced whole, so nodes gone since are forgotten and the map stays bounded.
        *self.rtt.write() = measured.into_iter().collect();
    }

    /// The best node to process `id`: among its live holders, this node if it is one, else
    /// the least loaded (busy slots over slots, in quarters), then the closest (measured
    /// round trip), then the one placement lists first. `None` when no holder is alive.
    pub fn best_of(&self, holders: &[String]) -> Option<String> {
        if let Some(local) = &self.local {
            if holders.contains(local) {
                return Some(local.clone());
            }
        }
        let snapshot = self.snapshot.read();
        let rtt = self.rtt.read();
        let rank = |id: &String| -> (u32, Duration) {
            let load = snapshot.nodes.get(id).map_or(u32::MAX, |n| {
                let (busy, slots) = n.slots();
                (4 * busy) / slots.max(1)
            });
            (load, rtt.get(id).copied().unwrap_or(RTT_PROBE_TIMEOUT))
        };
        holders.iter().enumerate().min_by_key(|(i, id)| (rank(id), *i)).map(|(_, id)| id.clone())
    }

    /// The best node to process `id` (see [`Placement::best_of`]).
    pub async fn node_id(&self, id: &str) -> Result<Option<String>, DsError> {
        let holders = self.node_ids(id).await?;
        Ok(self.best_of(&holders))
    }

    /// For work keyed by `key` on `function`: a worker of a live owner of `key` that
    /// serves `function` and had a free slot at its last heartbeat, the least busy first.
    /// `None` when no owner can take it now (the work then goes anywhere).
    pub fn affinity_worker(&self, key: &str, function: &str) -> Option<String> {
        let owners = self.node_ids_cached(key);
        let snapshot = self.snapshot.read();
        owners
            .iter()
            .filter_map(|owner| snapshot.nodes.get(owner))
            .filter(|info| info.functions.iter().any(|f| f == function))
            .flat_map(|info| info.workers.iter())
            .filter(|w| w.busy < w.slots)
            .min_by_key(|w| (w.busy, w.queue_len))
            .map(|w| w.id.clone())
    }

    /// For work that must run where `key`'s data is: the worker of a live owner of `key`
    /// serving `function` that is least loaded (busy over slots, then queue length), even
    /// when every one is busy, so the work queues there rather than go elsewhere. `None`
    /// when no owner serves `function`.
    pub fn holder_worker(&self, key: &str, function: &str) -> Option<String> {
        let owners = self.node_ids_cached(key);
        let snapshot = self.snapshot.read();
        owners
            .iter()
            .filter_map(|owner| snapshot.nodes.get(owner))
            .filter(|info| info.functions.iter().any(|f| f == function))
            .flat_map(|info| info.workers.iter())
            .min_by_key(|w| ((u64::from(w.busy) << 16) / u64::from(w.slots.max(1)), w.queue_len))
            .map(|w| w.id.clone())
    }

    /// The best node for `id` from the local snapshot only: no round trip.
    pub fn node_id_cached(&self, id: &str) -> Option<String> {
        self.best_of(&self.node_ids_cached(id))
    }
}
