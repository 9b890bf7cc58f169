//! vfolderd: the per-node reconciler that gives a GPU/notebook cluster's
//! users their own storage.
//!
//! # Layout
//! - [`config`]: the node config file.
//! - [`spec`], [`names`], [`keys`], [`policy`]: the key schema and the typed,
//!   validated desired objects.
//! - [`state::watch`] → [`state::desired`]: etcd list + watch into a typed cache.
//! - [`reconcile::actual`]: the mount table; [`state::ledger`]: what vfolderd owns.
//! - [`reconcile::plan`]: desired × actual → ordered actions (pure).
//! - [`reconcile::execute`] over [`reconcile::sys`]: carries actions out.
//! - [`reconcile::report`] → [`state::status`]: status write-back.
//! - [`daemon`]: startup, the readiness gate and the loop; [`reconcile::pass`]:
//!   one pass (observe → resolve → scope → plan → execute → remember → report),
//!   with [`reconcile::observe`], [`reconcile::scope`], [`reconcile::bookkeeping`].
//! - [`metrics`]: `/metrics`, `/healthz`, `/readyz`; [`error`]: error chains.
//! - [`azure`]: blob containers, SAS tokens, datasets; [`secret`]: a string that never prints.
//! - [`cli`]: the operator commands; [`inspect`]: `get` and `describe`.

pub mod azure;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod etcd;
pub mod features;
pub mod http;
pub mod inspect;
pub mod keys;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod plancmd;
pub mod policy;
pub mod reconcile;
pub mod secret;
pub mod spec;
pub mod state;
pub mod statuspage;
pub mod usage;

pub use daemon::{run, Deps};
