//! Builds the kernel programs (portgate-ebpf) for the BPF target; `src/gate` embeds them.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("portgate has no parent directory"))?
        .join("portgate-ebpf");
    let root_dir = metadata_path
        .to_str()
        .context("the portgate-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "portgate-ebpf",
            root_dir,
            ..Package::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the kernel programs failed: run `cargo xtask setup` (rust-src and bpf-linker)",
    )
}
