//! Kubernetes subcommands (`controller`, `agent`, `crds`): owned by the Kubernetes work.
