//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) and ClusterNetworkPolicy
//! (`policy.networking.k8s.io/v1alpha2`) for the pods of the overlay.
//!
//! Contract: [`eval::Cluster::allows`] decides, from the objects alone (namespaces, pods with
//! their addresses, nodes and container ports, policies), whether a connection is allowed by
//! the API's semantics (pure; it is the oracle the enforcement is tested against and never
//! calls into it). The decisions on what Kubernetes leaves open are documented on
//! [`eval`] and in docs/network-policy.md. [`compile`] turns the same objects into this
//! node's nftables table (pure) and the difference between two tables; [`enforce::Enforcer`]
//! applies each change as one atomic `nft` transaction; [`run::run`] feeds it from etcd
//! (`flanneld --network-policy`).

#![forbid(unsafe_code)]

#[cfg(test)]
mod cnp_eval_tests;
pub mod compile;
pub mod enforce;
pub mod eval;
pub mod metrics;
pub mod nfnl;
pub mod run;
#[cfg(test)]
mod sim_tests;
