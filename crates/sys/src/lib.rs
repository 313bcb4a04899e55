//! The one crate allowed `unsafe`: raw packet sockets, socket options and sysctls.
