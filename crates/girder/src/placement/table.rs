//! The flock table: which nodes own each flock, by weighted rendezvous hashing.

use serde::{Deserialize, Serialize};

use crate::control::NodeInfo;

/// The number of flocks: the unit of placement and replication.
pub const FLOCKS: u32 = 1_024;

/// How nodes are weighted when flocks (or ids) are spread over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every node the same.
    #[default]
    UniformNodes,
    /// In proportion to CPU count.
    Cpu,
    /// In proportion to memory (the node's `max-memory` if set, else its total).
    Memory,
}

impl Strategy {
    /// `node`'s weight under this strategy; zero for a node without workers (a pure client
    /// or gateway holds no data and runs nothing) and for a draining one (its flocks move
    /// away before it leaves).
    pub fn weight(self, node: &NodeInfo) -> f64 {
        if node.workers.is_empty() || node.draining {
            return 0.0;
        }
        match self {
            Strategy::UniformNodes => 1.0,
            Strategy::Cpu => f64::from(node.cpus.max(1)),
            Strategy::Memory => node.memory_max_bytes.unwrap_or(node.memory_total_bytes).max(1) as f64,
        }
    }
}

impl Strategy {
    /// Parses `uniform_nodes`, `cpu` or `memory`.
    pub fn parse(text: &str) -> Option<Strategy> {
        match text {
            "uniform_nodes" | "uniform" | "nodes" => Some(Strategy::UniformNodes),
            "cpu" | "uniform_cpu" => Some(Strategy::Cpu),
            "memory" | "uniform_memory" => Some(Strategy::Memory),
            _ => None,
        }
    }
}

/// The flock of `key`: a stable hash, the same on every node and every version.
pub fn flock_of(key: &[u8]) -> u32 {
    let hash = blake3::hash(key);
    let bytes = hash.as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % FLOCKS
}

/// A uniform number in (0, 1) from `flock` and `node`.
fn unit(flock: u32, node: &str) -> f64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&flock.to_le_bytes());
    hasher.update(node.as_bytes());
    let bytes = hasher.finalize();
    let b = bytes.as_bytes();
    let n = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) >> 11; // 53 bits
    (n as f64 + 0.5) / (1u64 << 53) as f64
}

/// Which nodes own each flock, with the epoch of this assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FlockTable {
    /// Grows by one with every change.
    pub epoch: u64,
    /// Owners per flock.
    pub replicas: u32,
    /// The strategy the weights came from.
    pub strategy: Strategy,
    /// The nodes and weights the table was computed from, sorted by id.
    pub nodes: Vec<(String, f64)>,
    /// For each flock, its owners, best first.
    pub owners: Vec<Vec<u16>>,
}

impl FlockTable {
    /// Assigns every flock to the `replicas` nodes with the highest weighted rendezvous
    /// score `-weight / ln(u)`, where `u` is a uniform hash of (flock, node). Nodes with a
    /// weight of zero or less own nothing.
    pub fn compute(epoch: u64, replicas: u32, strategy: Strategy, nodes: &[(String, f64)]) -> FlockTable {
        let mut nodes: Vec<(String, f64)> = nodes.iter().filter(|(_, w)| *w > 0.0 && w.is_finite()).cloned().collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        nodes.dedup_by(|a, b| a.0 == b.0);
        let take = (replicas as usize).min(nodes.len());
        let owners = (0..FLOCKS)
            .map(|flock| {
                let mut scored: Vec<(f64, u16)> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, (id, weight))| (-weight / unit(flock, id).ln(), i as u16))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                scored.into_iter().take(take).map(|(_, i)| i).collect()
            })
            .collect();
        FlockTable { epoch, replicas, strategy, nodes, owners }
    }

    /// The owners of `flock`, best first.
    pub fn owners_of(&self, flock: u32) -> impl Iterator<Item = &str> {
        self.owners
            .get(flock as usize)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.nodes.get(i as usize).map(|(id, _)| id.as_str()))
    }

    /// The owners of `key`'s flock, best first.
    pub fn owners_of_key(&self, key: &[u8]) -> impl Iterator<Item = &str> {
        self.owners_of(flock_of(key))
    }

    /// How many flocks `node` owns (as any replica).
    pub fn flocks_of(&self, node: &str) -> usize {
        let Some(index) = self.nodes.iter().position(|(id, _)| id == node) else { return 0 };
        self.owners.iter().filter(|owners| owners.contains(&(index as u16))).count()
    }

    /// How many (flock, owner) pairs differ from `other`: what a change moves.
    pub fn moved_from(&self, other: &FlockTable) -> usize {
        let names = |t: &FlockTable, f: u32| -> Vec<String> { t.owners_of(f).map(str::to_owned).collect() };
        (0..FLOCKS)
            .map(|f| {
                let (now, before) = (names(self, f), names(other, f));
                now.iter().filter(|n| !before.contains(n)).count()
            })
            .sum()
    }

    /// Whether the table was computed from exactly these nodes and weights.
    pub fn matches(&self, replicas: u32, strategy: Strategy, nodes: &[(String, f64)]) -> bool {
        let mut sorted: Vec<(String, f64)> = nodes.iter().filter(|(_, w)| *w > 0.0 && w.is_finite()).cloned().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        self.replicas == replicas && self.strategy == strategy && self.nodes == sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<(String, f64)> {
        (0..n).map(|i| (format!("node-{i}"), 1.0)).collect()
    }

    #[test]
    fn flocks_are_stable_and_spread() {
        assert_eq!(flock_of(b"johndoe"), flock_of(b"johndoe"));
        let mut counts = vec![0u32; FLOCKS as usize];
        for i in 0..100_000u32 {
            counts[flock_of(&i.to_le_bytes()) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "every flock gets keys");
    }

    #[test]
    fn uniform_tables_balance_and_replicate() {
        let table = FlockTable::compute(1, 2, Strategy::UniformNodes, &nodes(4));
        for flock in 0..FLOCKS {
            let owners: Vec<&str> = table.owners_of(flock).collect();
            assert_eq!(owners.len(), 2);
            assert_ne!(owners[0], owners[1]);
        }
        let mean = 2.0 * FLOCKS as f64 / 4.0;
        for (id, _) in nodes(4) {
            let share = table.flocks_of(&id) as f64;
            assert!((share - mean).abs() < mean * 0.15, "{id}: {share} flocks, mean {mean}");
        }
    }

    #[test]
    fn adding_a_node_moves_about_its_share() {
        let before = FlockTable::compute(1, 2, Strategy::UniformNodes, &nodes(4));
        let after = FlockTable::compute(2, 2, Strategy::UniformNodes, &nodes(5));
        let moved = after.moved_from(&before);
        let ideal = 2 * FLOCKS as usize / 5;
        assert!(moved <= ideal + ideal / 5, "moved {moved} owner slots, ideal {ideal}");
        // Only the new node gains flocks.
        assert_eq!(after.flocks_of("node-4"), moved);
    }

    #[test]
    fn weights_shape_the_shares() {
        let weighted = vec![("a".to_owned(), 1.0), ("b".to_owned(), 3.0)];
        let table = FlockTable::compute(1, 1, Strategy::Cpu, &weighted);
        let (a, b) = (table.flocks_of("a") as f64, table.flocks_of("b") as f64);
        assert!((b / a - 3.0).abs() < 0.6, "a {a}, b {b}");
        assert!(FlockTable::compute(1, 2, Strategy::Cpu, &[]).owners_of(0).next().is_none());
    }
}
