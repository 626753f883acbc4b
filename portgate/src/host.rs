//! The host's port facts: live sockets (procfs), the kernel's ephemeral port range and its
//! reserved ports.
