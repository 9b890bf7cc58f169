//! State: desired (from etcd), owned (sled ledger), and status write-back.

pub mod brake;
pub mod desired;
pub mod election;
pub mod endpoints;
pub mod events;
pub mod follow;
pub mod inuse;
pub mod ledger;
pub mod nodefiles;
pub mod policywatch;
pub mod status;
pub mod verdict;
pub mod watch;
