//! Reconciliation: observe actual state, plan, execute, drive the loop.

pub mod actual;
pub mod pass;
pub mod execute;
pub mod fsops;
pub mod mountwatch;
pub mod plan;
pub mod probe;
pub mod report;
pub mod sys;
