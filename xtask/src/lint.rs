//! `cargo xtask lint`: formatting and clippy for every crate, the kernel crate on nightly
//! for the BPF target (it builds for nothing else), the fuzz targets (not workspace
//! members), and the code's shape ([`crate::shape`]).

use anyhow::Result;

use crate::setup;

/// Runs `cargo xtask lint`.
pub fn run() -> Result<()> {
    setup::toolchain(false)?;
    setup::status("cargo", &["fmt", "--all", "--check"])?;
    setup::status(
        "cargo",
        &["+nightly", "fmt", "-p", "portgate-ebpf", "--check"],
    )?;
    setup::status(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    setup::status(
        "cargo",
        &[
            "+nightly",
            "clippy",
            "-p",
            "portgate-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The fuzz targets are not workspace members (cargo-fuzz builds them on nightly), so
    // they are checked here to keep them building as the parsers change.
    let fuzz_manifest = workspace_root().join("fuzz/Cargo.toml");
    setup::status(
        "cargo",
        &[
            "clippy",
            "--manifest-path",
            &fuzz_manifest.to_string_lossy(),
            "--bins",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    crate::shape::check(&workspace_root())?;
    println!("lint: clean");
    Ok(())
}

/// The workspace root: the parent of xtask's own directory.
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| ".".into(), std::path::Path::to_owned)
}
