#![no_std]
// The kernel programs are the `portgate` binary of this crate (src/main.rs); this library
// target exists so that `portgate/build.rs` can depend on the crate and be rebuilt when it
// changes.
