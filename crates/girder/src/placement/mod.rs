//! Placement: flocks and farms (seed "Grex") and the shoveling API on top of them.
//!
//! Keys are grouped into [`FLOCKS`] flocks by a stable hash; each flock is owned by
//! `replicas` nodes, chosen by weighted rendezvous hashing over the live nodes (weights from
//! a [`Strategy`]: uniform, CPUs or memory). The assignment is a [`FlockTable`] with an
//! epoch that grows with every change; rendezvous hashing moves only the flocks a joining
//! or leaving node wins or held.

mod service;
mod table;

pub use service::{Placement, DIRECTORY_KEY, INIT_IDS_MAX, REPLICAS_DEFAULT, TABLE_KEY};
pub use table::{flock_of, FlockTable, Strategy, FLOCKS};
