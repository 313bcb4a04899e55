//! Kubernetes mode: IP pools, the allocator, the IPAM controller and the agent's source.
//!
//! Newcomers start with [`allocator`] (pure: who holds which address and why), then
//! [`reconcile`] (pure: what the controller writes for a Service), then [`controller`] (the
//! thin kube driver with leader election) and [`source`] (the agent side: Services and
//! EndpointSlices into a [`model::Desired`]).

pub mod allocator;
pub mod announce;
pub mod controller;
pub mod crd;
pub mod entry;
pub mod intent;
pub mod lease;
pub mod metrics;
pub mod outage;
pub mod rbac;
pub mod reconcile;
pub mod selector;
pub mod source;

#[cfg(test)]
pub mod fixtures;
#[cfg(test)]
mod manifests;
