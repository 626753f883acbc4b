//! portgate's kernel programs are the `portgate-ebpf` binary of this crate (`src/main.rs`),
//! built for the BPF target by `portgate/build.rs`. This library target exists so that the
//! build script can depend on the crate and be rebuilt when it changes.
#![no_std]
