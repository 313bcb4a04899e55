//! Helpers shared by the binary's integration tests.

pub mod bgplab;
pub mod k8s;
