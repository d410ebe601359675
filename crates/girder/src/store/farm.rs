//! A node's farm: its engine opened, its data plane serving other nodes, its upkeep.

use std::sync::Arc;

use super::engine::{DiskEngine, Engine, MemoryEngine};
use super::service::{LeaseLeft, StoreHandler, StoreNode};
use super::{ItemStore, StoreConfig, StoreError};
use crate::dataplane::{DataConfig, DataServer};
use crate::placement::Placement;

/// A node's store and the data-plane server that serves it.
pub(crate) struct Farm {
    pub(crate) node: Arc<StoreNode>,
    server: DataServer,
    address: String,
    /// The near cache's notice publisher and listener.
    notices: tokio::task::JoinHandle<()>,
}

impl Farm {
    /// Opens the engine (`config.data_dir`, else memory), rebuilds the flocks' digests
    /// from it, and starts serving the data plane.
    pub(crate) async fn open(
        id: &str,
        config: StoreConfig,
        placement: Arc<Placement>,
        structures: crate::structures::Store,
        lease_left: LeaseLeft,
        node_ttl_ms: u64,
    ) -> Result<Farm, StoreError> {
        let engine: Arc<dyn Engine> = match &config.data_dir {
            Some(dir) => {
                let (dir, engine_config) = (dir.clone(), config.engine.clone());
                let opened = tokio::task::spawn_blocking(move || DiskEngine::open(&dir, engine_config)).await;
                match opened {
                    Ok(engine) => Arc::new(engine?),
                    Err(join) => return Err(StoreError::Unavailable(format!("opening the data directory: {join}"))),
                }
            }
            None => Arc::new(MemoryEngine::new()),
        };
        let listen = config.data_listen.clone();
        let advertise = config.data_advertise.clone();
        let node = Arc::new(StoreNode::new(id.to_owned(), engine, config, placement, lease_left, node_ttl_ms));
        node.load().await?;
        let handler = Arc::new(StoreHandler(node.clone()));
        let server = DataServer::bind(&listen, DataConfig::default(), handler)
            .await
            .map_err(|e| StoreError::Unavailable(format!("the data plane cannot listen on {listen}: {e}")))?;
        let address = advertise.unwrap_or_else(|| server.local_addr().to_string());
        *node.address.lock() = Some(address.clone());
        tracing::info!(node = %id, data = %address, "store: serving the data plane");
        let notices = tokio::spawn(node.near.clone().run(structures, id.to_owned()));
        Ok(Farm { node, server, address, notices })
    }

    /// Where other nodes reach this node's data plane.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// What the data-plane server did (requests served, bytes received).
    pub(crate) fn server_stats(&self) -> crate::dataplane::DataStats {
        self.server.stats()
    }

    /// The store as callers use it.
    pub(crate) fn store(&self) -> ItemStore {
        ItemStore::new(self.node.clone())
    }

    /// Stops serving and makes what was written durable.
    pub(crate) async fn shutdown(&self) {
        self.notices.abort();
        self.server.shutdown().await;
        let engine = self.node.engine.clone();
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || engine.flush()).await {
            tracing::warn!(error = %err, "store: final flush failed");
        }
    }
}
