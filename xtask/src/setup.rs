//! `cargo xtask setup`: the toolchain pieces the eBPF build needs, and the host checks.
//!
//! Idempotent: what is already in place is reported and left alone.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

/// bpf-linker version known to work with the pinned aya crates.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Oldest kernel portgate supports (see `portgate::host::kernel::MIN_VERSION`).
const MIN_KERNEL: (u32, u32) = (5, 15);

/// Options of `cargo xtask setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only check; install nothing.
    #[arg(long)]
    pub check: bool,
    /// Also what the opt-in podman tests need: the distribution's podman, runc and
    /// busybox-static.
    #[arg(long)]
    pub podman: bool,
}

/// Runs `cargo xtask setup`.
pub fn run(args: &SetupArgs) -> Result<()> {
    toolchain(args.check)?;
    let mut problems = host_checks(!args.check);
    problems.extend(test_tools(!args.check));
    if args.podman {
        problems.extend(podman_tools(!args.check));
    }
    if problems.is_empty() {
        println!("setup: everything is in place");
        Ok(())
    } else {
        bail!(
            "the host cannot run portgate's kernel parts:\n  - {}",
            problems.join("\n  - ")
        )
    }
}

/// rust-src for the nightly toolchain, protoc (the distribution's protobuf-compiler), and
/// bpf-linker built against the nightly's LLVM.
pub fn toolchain(check_only: bool) -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context(
        "rustup must be installed, with a nightly toolchain (`rustup toolchain install nightly`)",
    )?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("ok: rust-src for nightly");
    } else if check_only {
        bail!("rust-src for nightly is missing: run `cargo xtask setup`");
    } else {
        status(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
        println!("installed: rust-src for nightly");
    }

    // The etcd client's build generates its gRPC code with protoc.
    if let Ok(version) = output("protoc", &["--version"]) {
        println!("ok: {} (the etcd client's build uses it)", version.trim());
    } else if check_only {
        bail!(
            "protoc is missing: run `cargo xtask setup` (or `apt-get install protobuf-compiler`)"
        );
    } else {
        apt_install("protobuf-compiler")?;
        println!("installed: protobuf-compiler");
    }

    if let Ok(version) = output("bpf-linker", &["--version"])
        && version.contains(BPF_LINKER_VERSION)
    {
        println!("ok: {}", version.trim());
        return Ok(());
    }
    if check_only {
        bail!("bpf-linker {BPF_LINKER_VERSION} is missing: run `cargo xtask setup`");
    }
    install_bpf_linker()
}

/// Builds bpf-linker against the nightly toolchain's own LLVM, so that the two agree on the
/// bitcode format: a prefix directory whose `lib/` links `libLLVM.so` and its soname to
/// the library in the nightly sysroot.
fn install_bpf_linker() -> Result<()> {
    let version = output("rustc", &["+nightly", "-vV"])?;
    let llvm = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` reports no LLVM version")?
        .trim()
        .to_owned();
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let sysroot_lib = sysroot.join("lib");
    let soname_prefix = format!("libLLVM.so.{major}.");
    let library = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("listing {}", sysroot_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with(&soname_prefix))
        .with_context(|| {
            format!(
                "no {soname_prefix}* in {}: the nightly toolchain lacks its LLVM library",
                sysroot_lib.display()
            )
        })?;
    let prefix = cache_dir()?.join("portgate").join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link_name in ["libLLVM.so", library.as_str()] {
        let link = prefix_lib.join(link_name);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(sysroot_lib.join(&library), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "installing: bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} ({})",
        prefix.display()
    );
    let built = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !built.success() {
        bail!("cargo install bpf-linker failed ({built})");
    }
    println!("installed: bpf-linker {BPF_LINKER_VERSION}");
    Ok(())
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache"))
}

/// Checks what the kernel parts need; returns one line per problem (with what to do).
/// With `fix`, mounts bpffs when it is missing and installs iproute2 when `ip` is.
pub fn host_checks(fix: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();

    match missing_capabilities() {
        None => println!("ok: privileges (root or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN)"),
        Some(missing) => problems.push(format!(
            "missing {missing}: run as root (or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        )),
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("ok: kernel BTF at /sys/kernel/btf/vmlinux");
    } else {
        problems.push(
            "no BTF at /sys/kernel/btf/vmlinux: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
                .to_owned(),
        );
    }
    match mount_point(&mounts, "cgroup2") {
        Some(point) => println!("ok: cgroup2 mounted at {point}"),
        None => problems.push("no cgroup2 mount in /proc/self/mounts: mount cgroup v2 (`mount -t cgroup2 none /sys/fs/cgroup`)".to_owned()),
    }
    if mounts_at(&mounts, "bpf", "/sys/fs/bpf") {
        println!("ok: bpffs mounted at /sys/fs/bpf");
    } else if fix && mount_bpffs().is_ok() {
        println!("mounted: bpffs at /sys/fs/bpf");
    } else {
        problems.push(
            "bpffs is not mounted at /sys/fs/bpf: `mount -t bpf bpffs /sys/fs/bpf`".to_owned(),
        );
    }
    match kernel_version() {
        Some((release, version)) if version >= MIN_KERNEL => {
            println!(
                "ok: kernel {release} (>= {}.{})",
                MIN_KERNEL.0, MIN_KERNEL.1
            );
        }
        Some((release, _)) => problems.push(format!(
            "kernel {release} is older than {}.{}: upgrade the kernel",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        None => problems
            .push("cannot read the kernel release from /proc/sys/kernel/osrelease".to_owned()),
    }
    if output("ip", &["-V"]).is_ok() {
        println!("ok: iproute2 (the kernel tests make namespaces and veth pairs with it)");
    } else if fix && install_iproute2().is_ok() {
        println!("installed: iproute2");
    } else {
        problems.push("iproute2's `ip` is missing: `apt-get install iproute2`".to_owned());
    }
    if let Ok(version) = output("nft", &["--version"]) {
        println!(
            "ok: {} (the kernel tests hold packets back with it in their namespaces)",
            version.trim()
        );
    } else if fix && apt_install("nftables").is_ok() {
        println!("installed: nftables");
    } else {
        problems.push("nftables' `nft` is missing: `apt-get install nftables`".to_owned());
    }
    problems.extend(fleet_tools(fix));
    problems
}

/// What single tests run beside the kernel: faketime, tmux and promtool from the
/// distribution, schemathesis from the Python Package Index. Installed (when `fix`) when missing; returns the
/// problems left. Not needed to run portgate, so `cargo xtask run` leaves them alone.
pub fn test_tools(fix: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (program, package, why) in [
        (
            "/usr/bin/faketime",
            "faketime",
            "the lifecycle tests step the daemon's wall clock with it",
        ),
        (
            "/usr/bin/tmux",
            "tmux",
            "the `portgate top` test drives the live view in it",
        ),
        (
            "/usr/bin/promtool",
            "prometheus",
            "the monitoring tests check dist/prometheus with its promtool",
        ),
    ] {
        if Path::new(program).exists() {
            println!("ok: {package} ({why})");
        } else if fix && apt_install(package).is_ok() {
            println!("installed: {package} ({why})");
        } else {
            problems.push(format!("{program} is missing: `apt-get install {package}`"));
        }
    }
    problems.extend(schemathesis(fix).err());
    problems
}

/// schemathesis version the API test checks the daemon with (from `PyPI`, in its own venv).
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Where `cargo xtask setup` installs schemathesis: a Python venv under the user's cache, so
/// that nothing of the system's Python changes.
pub fn schemathesis_path() -> Result<PathBuf> {
    Ok(cache_dir()?
        .join("portgate")
        .join("schemathesis")
        .join("bin")
        .join("schemathesis"))
}

/// schemathesis for the API test (`tests/tests/kernel/openapi.rs`), installed (when `fix`)
/// with pip into its venv. Returns the problem left when it cannot be had.
fn schemathesis(fix: bool) -> Result<(), String> {
    let path = schemathesis_path().map_err(|err| format!("{err:#}"))?;
    let program = path.to_string_lossy().into_owned();
    if let Ok(version) = output(&program, &["--version"])
        && version.contains(SCHEMATHESIS_VERSION)
    {
        println!(
            "ok: {} (the API test checks the daemon with it)",
            version.trim()
        );
        return Ok(());
    }
    let advice = format!(
        "schemathesis {SCHEMATHESIS_VERSION} is missing at {}: run `cargo xtask setup` (it needs python3 with its venv module, and PyPI)",
        path.display()
    );
    if !fix {
        return Err(advice);
    }
    let venv = path
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| advice.clone())?;
    if output("python3", &["-m", "venv", "--help"]).is_err() && apt_install("python3-venv").is_err()
    {
        return Err(advice);
    }
    let pip = venv.join("bin").join("pip");
    let installed = status("python3", &["-m", "venv", &venv.to_string_lossy()]).and_then(|()| {
        status(
            &pip.to_string_lossy(),
            &[
                "install",
                "-q",
                &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
            ],
        )
    });
    match installed {
        Ok(()) => {
            println!(
                "installed: schemathesis {SCHEMATHESIS_VERSION} in {}",
                venv.display()
            );
            Ok(())
        }
        Err(err) => Err(format!("{advice} ({err:#})")),
    }
}

/// What fleet mode's tests need: the distribution's etcd server (the tests start it as a
/// plain process on loopback). Installed, when `fix`, when missing; returns the problems left.
pub fn fleet_tools(fix: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Ok(version) = output("etcd", &["--version"]) {
        let first = version.lines().next().unwrap_or_default().trim().to_owned();
        println!("ok: {first} (the fleet tests run it on loopback)");
    } else if fix && apt_install("etcd-server").is_ok() {
        println!("installed: etcd-server");
    } else {
        problems.push("etcd is missing: `apt-get install etcd-server`".to_owned());
    }
    problems
}

/// The same check as `portgate::host::kernel::missing_capabilities`, which xtask cannot call:
/// building portgate needs the bpf-linker this module installs.
fn missing_capabilities() -> Option<String> {
    const NEEDED: [(u32, &str); 3] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn mount_point<'a>(mounts: &'a str, fstype: &str) -> Option<&'a str> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then_some(point)
    })
}

fn mounts_at(mounts: &str, fstype: &str, at: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        matches!((fields.next(), fields.next(), fields.next()), (Some(_), Some(point), Some(kind)) if point == at && kind == fstype)
    })
}

fn mount_bpffs() -> Result<()> {
    fs::create_dir_all("/sys/fs/bpf")?;
    status("mount", &["-t", "bpf", "bpffs", "/sys/fs/bpf"])
}

fn install_iproute2() -> Result<()> {
    apt_install("iproute2")
}

/// The podman tests' packages, installed (when `fix`) when missing: podman, runc (crun
/// refuses hybrid cgroup hosts) and busybox-static (the test image's one binary). Returns
/// the problems left.
pub fn podman_tools(fix: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (present, package) in [
        (output("podman", &["--version"]).is_ok(), "podman"),
        (output("runc", &["--version"]).is_ok(), "runc"),
        (Path::new("/bin/busybox").exists(), "busybox-static"),
    ] {
        if present {
            println!("ok: {package}");
        } else if fix && apt_install(package).is_ok() {
            println!("installed: {package}");
        } else {
            problems.push(format!("{package} is missing: `apt-get install {package}`"));
        }
    }
    problems
}

/// What the benchmarks need beyond the tests: the distribution's nftables (the baseline
/// they measure portgate against), installed when `nft` is missing. Returns the problem
/// when it cannot be had; the benchmarks then report the nftables figures as failed.
pub fn bench_tools() -> Option<String> {
    if let Ok(version) = output("nft", &["--version"]) {
        println!("ok: {}", version.trim());
        return None;
    }
    match apt_install("nftables") {
        Ok(()) => {
            println!("installed: nftables");
            None
        }
        Err(err) => Some(format!(
            "nftables is missing and could not be installed ({err:#}): `apt-get install nftables`"
        )),
    }
}

fn apt_install(package: &str) -> Result<()> {
    status("apt-get", &["update", "-q"])?;
    status("apt-get", &["install", "-y", "-q", package])
}

/// The kernel release and its (major, minor).
pub fn kernel_version() -> Option<(String, (u32, u32))> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next()?, numbers.next()?);
    Some((release, version))
}

/// Runs a program and returns its standard output; fails when it fails.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a program with its output shown; fails when it fails.
pub fn status(program: &str, args: &[&str]) -> Result<()> {
    let result = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !result.success() {
        bail!("{program} {} failed ({result})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{mount_point, mounts_at};

    const MOUNTS: &str =
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";

    #[test]
    fn finds_mounts_by_type() {
        assert_eq!(
            mount_point(MOUNTS, "cgroup2"),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(mount_point(MOUNTS, "tmpfs"), None);
        assert!(mounts_at(MOUNTS, "bpf", "/sys/fs/bpf"));
        assert!(!mounts_at(MOUNTS, "bpf", "/sys/fs/bpf/portgate"));
    }
}
