//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use girder::{Embedded, Node, PoolSpec, Registry, Statekeeper, WorkerSpec};

/// A node with one pool `main` of `workers` workers with `slots` slots each.
pub async fn grid(registry: Registry, workers: usize, slots: usize) -> Node {
    Node::builder()
        .registry(registry)
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", workers, slots))
        .start()
        .await
        .expect("node starts")
}

/// A fresh embedded statekeeper.
pub fn embedded() -> Arc<dyn Statekeeper> {
    Arc::new(Embedded::default())
}
