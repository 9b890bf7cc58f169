//! Reconciliation: observe actual state, plan, execute, one pass at a time.

pub mod actual;
pub mod bookkeeping;
pub mod btrfs;
pub mod execute;
pub mod explain;
pub mod fsops;
pub mod mountapi;
pub mod mountevents;
pub mod mountwatch;
pub mod newmount;
pub mod observe;
pub mod pass;
pub mod plan;
pub mod probe;
pub mod report;
pub mod scope;
pub mod sys;
pub mod usagescan;
