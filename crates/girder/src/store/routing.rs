//! Who serves what: a flock's primary, the nodes a write must reach, the nodes a read may
//! go to, from one snapshot of the placement table and the live nodes' store reports.

use std::collections::HashMap;
use std::sync::Arc;

use crate::control::{Health, NodeInfo, StoreReport};
use crate::placement::FlockTable;

use super::engine::Flock;

/// One consistent snapshot of placement as the store sees it.
pub(crate) struct View {
    pub(crate) table: Arc<FlockTable>,
    nodes: Arc<HashMap<String, NodeInfo>>,
    node_ttl_ms: u64,
}

impl View {
    /// A view of `table` and `nodes`, of which those silent past `node_ttl_ms` are dead.
    pub(crate) fn new(table: Arc<FlockTable>, nodes: Arc<HashMap<String, NodeInfo>>, node_ttl_ms: u64) -> View {
        View { table, nodes, node_ttl_ms }
    }

    /// `node`'s report, if it is live.
    fn live(&self, node: &str) -> Option<&NodeInfo> {
        self.nodes.get(node).filter(|n| n.health(self.node_ttl_ms) != Health::Dead)
    }

    /// The table's epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.table.epoch
    }

    /// The flock's owners in the table, best first.
    pub(crate) fn owners(&self, flock: Flock) -> Vec<&str> {
        self.table.owners_of(flock).collect()
    }

    /// The flock's primary: its first owner. It does not depend on readiness, so every
    /// node with the same table agrees on it; a primary still catching up fetches an item
    /// from a ready holder before it writes it.
    pub(crate) fn primary(&self, flock: Flock) -> Option<&str> {
        self.table.owners_of(flock).next()
    }

    fn report(&self, node: &str) -> Option<&StoreReport> {
        self.live(node).and_then(|n| n.store.as_ref())
    }

    /// Whether `node` is live and said it holds `flock` completely.
    pub(crate) fn ready(&self, node: &str, flock: Flock) -> bool {
        self.report(node).is_some_and(|r| StoreReport::has(&r.ready, flock))
    }

    /// Whether `node` is live and said it holds data of `flock` it takes writes for.
    pub(crate) fn holds(&self, node: &str, flock: Flock) -> bool {
        self.report(node).is_some_and(|r| StoreReport::has(&r.held, flock))
    }

    /// Where a write of `flock` must land besides the primary: the other owners, and every
    /// live node that still holds the flock (handing it over), so no node that may serve
    /// a read misses a write.
    pub(crate) fn replicas(&self, flock: Flock, primary: &str) -> Vec<String> {
        let mut targets: Vec<String> =
            self.table.owners_of(flock).filter(|n| *n != primary).map(str::to_owned).collect();
        let mut holders: Vec<&String> = self.nodes.keys().filter(|n| self.holds(n, flock)).collect();
        holders.sort();
        for holder in holders {
            if holder != primary && !targets.contains(holder) {
                targets.push(holder.clone());
            }
        }
        targets
    }

    /// Nodes that may serve a read of `flock`, best first: ready owners, then ready
    /// holders that are not owners any more (while owners catch up).
    pub(crate) fn readers(&self, flock: Flock) -> Vec<String> {
        let mut readers: Vec<String> =
            self.table.owners_of(flock).filter(|n| self.ready(n, flock)).map(str::to_owned).collect();
        let mut holders: Vec<&String> =
            self.nodes.keys().filter(|n| self.ready(n, flock) && !readers.contains(n)).collect();
        holders.sort();
        readers.extend(holders.into_iter().cloned());
        readers
    }

    /// Nodes to copy `flock` from, other than `me`: ready ones first, then the other
    /// owners (after a whole-grid restart nobody is ready yet, and owners merge each
    /// other's copies).
    pub(crate) fn sources(&self, flock: Flock, me: &str) -> (Vec<String>, Vec<String>) {
        let ready: Vec<String> = self.readers(flock).into_iter().filter(|n| n != me).collect();
        let owners: Vec<String> = self
            .table
            .owners_of(flock)
            .filter(|n| *n != me && !ready.iter().any(|r| r == n) && self.live(n).is_some())
            .map(str::to_owned)
            .collect();
        (ready, owners)
    }

    /// Whether every owner of `flock` other than `me` is live and ready: a holder that is
    /// no owner may then stop serving and drop it.
    pub(crate) fn owners_ready(&self, flock: Flock, me: &str) -> bool {
        let owners = self.owners(flock);
        !owners.is_empty() && owners.iter().filter(|n| **n != me).all(|n| self.ready(n, flock))
    }

    /// Every live node with a data plane, by id: the nodes that may hold a flock's data,
    /// whatever the table says.
    pub(crate) fn stores(&self) -> Vec<String> {
        let mut stores: Vec<String> =
            self.nodes.keys().filter(|n| self.address(n).is_some()).map(String::clone).collect();
        stores.sort();
        stores
    }

    /// A node's data-plane address.
    pub(crate) fn address(&self, node: &str) -> Option<&str> {
        self.live(node).and_then(|n| n.data.as_deref())
    }
}

/// A bitmap of flocks as [`StoreReport`] carries it.
pub(crate) fn bitmap(flocks: impl Iterator<Item = Flock>) -> Vec<u8> {
    let mut bits = vec![0u8; (crate::placement::FLOCKS as usize).div_ceil(8)];
    for flock in flocks {
        if let Some(byte) = bits.get_mut((flock / 8) as usize) {
            *byte |= 1 << (flock % 8);
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Strategy;

    fn node(id: &str, ready: &[Flock], held: &[Flock]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            data: Some(format!("{id}:1")),
            store: Some(StoreReport {
                ready: bitmap(ready.iter().copied()),
                held: bitmap(held.iter().copied()),
                ..StoreReport::default()
            }),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn writes_reach_owners_and_holders_and_reads_prefer_ready_owners() {
        let weights: Vec<(String, f64)> = ["a", "b", "c"].iter().map(|n| (n.to_string(), 1.0)).collect();
        let table = Arc::new(FlockTable::compute(3, 2, Strategy::UniformNodes, &weights));
        let flock = 7;
        let owners: Vec<String> = table.owners_of(flock).map(str::to_owned).collect();
        let other = ["a", "b", "c"].into_iter().find(|n| !owners.iter().any(|o| o == n)).unwrap_or("c");
        // The second owner is still catching up; the third node hands the flock over.
        let nodes = vec![
            node(&owners[0], &[flock], &[flock]),
            node(&owners[1], &[], &[flock]),
            node(other, &[flock], &[flock]),
        ];
        let nodes = Arc::new(nodes.into_iter().map(|n| (n.id.clone(), n)).collect());
        let view = View::new(table, nodes, 1_000);
        assert_eq!(view.primary(flock), Some(owners[0].as_str()));
        assert_eq!(view.replicas(flock, &owners[0]), vec![owners[1].clone(), other.to_owned()]);
        assert_eq!(view.readers(flock), vec![owners[0].clone(), other.to_owned()]);
        assert!(!view.owners_ready(flock, other));
        assert_eq!(view.sources(flock, &owners[1]).0, vec![owners[0].clone(), other.to_owned()]);
    }
}
