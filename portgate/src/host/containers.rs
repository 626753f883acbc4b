//! Containers and Kubernetes pods, found by id in the cgroup2 tree: each runtime names the
//! cgroup of a container after its id, and kubelet names a pod's after its uid. A process in
//! that cgroup ([`any_pid`]) leads to the container's network namespace
//! ([`super::netns::of_pid`]).

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use crate::paths;

/// How many levels below the cgroup root a container's directory is looked for.
const MAX_DEPTH: usize = 12;
/// The fewest hex digits of a container id prefix, as in docker's short ids.
const MIN_PREFIX: usize = 12;
/// The hex digits of a full container id.
const FULL_ID: usize = 64;
/// The runtimes that name a container's cgroup `PREFIX<id>`, with `.scope` appended under
/// the systemd cgroup driver. Their conmon cgroups (`libpod-conmon-<id>.scope`,
/// `crio-conmon-<id>.scope`) do not match, as `conmon-<id>` is not an id.
const PREFIXES: [(&str, Runtime); 4] = [
    ("docker-", Runtime::Docker),
    ("libpod-", Runtime::Podman),
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
];

/// What made a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// Docker (`docker-<id>.scope`, `/docker/<id>`).
    Docker,
    /// Podman (`libpod-<id>.scope`, `libpod-<id>`).
    Podman,
    /// containerd (`cri-containerd-<id>.scope`, `<id>` under `k8s.io` or a pod).
    Containerd,
    /// CRI-O (`crio-<id>.scope`, `crio-<id>`).
    CriO,
    /// A Kubernetes pod, made by kubelet (`kubepods-…-pod<uid>.slice`, `/kubepods/…/pod<uid>`):
    /// the cgroup holding all the pod's containers.
    KubernetesPod,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::KubernetesPod => "kubernetes pod",
        })
    }
}

/// A container or pod found in the cgroup tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The full container id (64 hex digits), or the pod uid (with dashes), in lower case.
    pub id: String,
    /// What made it.
    pub runtime: Runtime,
    /// Its cgroup directory, under the cgroup root searched.
    pub cgroup: PathBuf,
}

/// Why no single container was found.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The id is neither a container id (prefix) nor a pod uid.
    #[error(
        "{id:?} is not a container id or pod uid: {reason}; copy it from `docker ps \
         --no-trunc`, `podman ps --no-trunc`, `crictl ps` or `crictl pods`"
    )]
    BadId {
        /// The id given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No cgroup under the root is the container's or pod's.
    #[error(
        "no container or pod {id} in the cgroup tree under {}: check that it is running \
         (`docker ps`, `podman ps`, `crictl ps`, `crictl pods`) and that this is the host's \
         cgroup2 mount (in a container with its own cgroup namespace portgate sees only its \
         own subtree)",
        cgroup_root.display()
    )]
    NotFound {
        /// The id given.
        id: String,
        /// The root searched.
        cgroup_root: PathBuf,
    },
    /// The id is the start of more than one container's id.
    #[error(
        "{id} matches {} cgroups ({}): give a longer id",
        matches.len(),
        list(matches)
    )]
    Ambiguous {
        /// The id given.
        id: String,
        /// The cgroups it matches.
        matches: Vec<PathBuf>,
    },
    /// A cgroup directory or file could not be read.
    #[error(transparent)]
    Host(#[from] super::HostError),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The container or pod `id` names, from the cgroup2 tree under `cgroup_root`.
///
/// `id` is a container id (in full, or a prefix of at least 12 hex digits) or a pod uid (in
/// full, with `-` or `_`), in either case. A pod's uid names the pod's cgroup, which holds the
/// ports of all its containers; a container id names the container's own cgroup. Directories
/// that cannot be read are skipped, symlinks are not followed.
pub fn find(cgroup_root: &Path, id: &str) -> Result<Container, ContainerError> {
    let wanted = normalise_id(id)?;
    let mut matches: Vec<Container> = tree(cgroup_root)?
        .into_iter()
        .filter_map(|cgroup| {
            let (runtime, found) = classify(&cgroup)?;
            let hit = if runtime == Runtime::KubernetesPod {
                found == wanted
            } else {
                found.starts_with(&wanted)
            };
            hit.then_some(Container {
                id: found,
                runtime,
                cgroup,
            })
        })
        .collect();
    match matches.len() {
        0 => Err(ContainerError::NotFound {
            id: id.to_owned(),
            cgroup_root: cgroup_root.to_owned(),
        }),
        1 => Ok(matches.remove(0)),
        _ => {
            let mut paths: Vec<PathBuf> = matches.into_iter().map(|found| found.cgroup).collect();
            paths.sort();
            Err(ContainerError::Ambiguous {
                id: id.to_owned(),
                matches: paths,
            })
        }
    }
}

/// A process in `cgroup` or in a cgroup below it; `None` when all are empty. Its
/// `/proc/PID/ns/net` is the container's network namespace.
pub fn any_pid(cgroup: &Path) -> Result<Option<u32>, ContainerError> {
    let procs = cgroup.join(paths::CGROUP_PROCS);
    let text = fs::read_to_string(&procs).map_err(super::HostError::io("reading", &procs))?;
    if let Some(pid) = first_pid(&text) {
        return Ok(Some(pid));
    }
    // cgroup2 keeps processes in the leaves, so a pod's or a scope's own list is often empty.
    Ok(tree(cgroup)?.into_iter().find_map(|dir| {
        fs::read_to_string(dir.join(paths::CGROUP_PROCS))
            .ok()
            .and_then(|text| first_pid(&text))
    }))
}

fn first_pid(procs: &str) -> Option<u32> {
    procs.lines().find_map(|line| line.trim().parse().ok())
}

/// Every directory below `root`, down to [`MAX_DEPTH`] levels, parents before children;
/// unreadable directories below the root are skipped, symlinks not followed.
fn tree(root: &Path) -> Result<Vec<PathBuf>, ContainerError> {
    let mut dirs = Vec::new();
    let mut stack = vec![(root.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(source) if depth == 0 => {
                return Err(super::HostError::io("reading", &dir)(source).into());
            }
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            // `DirEntry::file_type` does not follow symlinks.
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                let path = entry.path();
                if depth + 1 < MAX_DEPTH {
                    stack.push((path.clone(), depth + 1));
                }
                dirs.push(path);
            }
        }
    }
    Ok(dirs)
}

/// The runtime and the id (lower case; a pod uid with dashes) that a cgroup directory's name
/// and place say it belongs to.
fn classify(cgroup: &Path) -> Option<(Runtime, String)> {
    let name = cgroup.file_name()?.to_str()?.to_ascii_lowercase();
    let stem = name.strip_suffix(".scope").unwrap_or(&name);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix)
            && is_full_id(id)
        {
            return Some((runtime, id.to_owned()));
        }
    }
    // The cgroupfs drivers: the bare id under the runtime's directory, or the pod's.
    if is_full_id(&name) {
        let parent = cgroup.parent()?;
        let parent_name = parent.file_name()?.to_str()?.to_ascii_lowercase();
        let runtime = match parent_name.as_str() {
            "docker" => Runtime::Docker,
            "k8s.io" | "containerd" => Runtime::Containerd,
            _ if classify(parent).is_some_and(|(runtime, _)| runtime == Runtime::KubernetesPod) => {
                Runtime::Containerd
            }
            _ => return None,
        };
        return Some((runtime, name));
    }
    // kubelet: `kubepods-besteffort-pod<uid_>.slice` (systemd driver, the uid's dashes as
    // underscores, as systemd reads a dash as a parent slice), `kubepods/…/pod<uid>`.
    let last = match name.strip_suffix(".slice") {
        Some(slice) => slice.rsplit('-').next()?,
        None => &name,
    };
    let uid = last.strip_prefix("pod")?.replace('_', "-");
    let in_kubepods = cgroup
        .iter()
        .any(|part| part.to_str().is_some_and(|part| part.contains("kubepods")));
    (in_kubepods && is_pod_uid(&uid)).then_some((Runtime::KubernetesPod, uid))
}

/// `id` in the form directory names are compared in: lower case, a pod uid with dashes.
fn normalise_id(id: &str) -> Result<String, ContainerError> {
    let bad = |reason| ContainerError::BadId {
        id: id.to_owned(),
        reason,
    };
    if !id
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
    {
        return Err(bad("it has characters other than hex digits, '-' and '_'"));
    }
    let id = id.to_ascii_lowercase().replace('_', "-");
    if id.contains('-') {
        if !is_pod_uid(&id) {
            return Err(bad("a pod uid has 36 characters, 8-4-4-4-12 hex digits"));
        }
    } else if id.len() < MIN_PREFIX {
        return Err(bad("a container id needs at least 12 hex digits"));
    } else if id.len() > FULL_ID {
        return Err(bad("a container id has 64 hex digits"));
    }
    Ok(id)
}

fn is_full_id(text: &str) -> bool {
    text.len() == FULL_ID && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// A uid as kubelet writes it, `8-4-4-4-12` hex digits.
fn is_pod_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|group| group.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|group| group.bytes().all(|byte| byte.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const B: &str = "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    /// A fake cgroup tree: each directory made, with an empty `cgroup.procs`.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new(dirs: &[impl AsRef<str>]) -> Self {
            let tree = Self(tempfile::tempdir().expect("a temporary directory"));
            for dir in dirs {
                tree.procs(dir.as_ref(), "");
            }
            tree
        }

        fn root(&self) -> &Path {
            self.0.path()
        }

        /// Makes `dir` (and its parents) with `pids` in its `cgroup.procs`.
        fn procs(&self, dir: &str, pids: &str) {
            let path = self.root().join(dir);
            fs::create_dir_all(&path).expect("making a cgroup directory");
            fs::write(path.join(paths::CGROUP_PROCS), pids).expect("writing cgroup.procs");
        }

        fn find(&self, id: &str) -> Result<Container, ContainerError> {
            find(self.root(), id)
        }

        fn expect(&self, id: &str, runtime: Runtime, full_id: &str, dir: &str) {
            let found = self
                .find(id)
                .unwrap_or_else(|err| panic!("finding {id} in {dir}: {err}"));
            assert_eq!(
                found,
                Container {
                    id: full_id.to_owned(),
                    runtime,
                    cgroup: self.root().join(dir),
                }
            );
        }
    }

    #[test]
    fn each_runtime_layout_is_found() {
        let systemd_uid = UID.replace('-', "_");
        let layouts = [
            (Runtime::Docker, format!("system.slice/docker-{A}.scope")),
            (Runtime::Docker, format!("docker/{A}")),
            (Runtime::Podman, format!("machine.slice/libpod-{A}.scope")),
            (Runtime::Podman, format!("libpod_parent/libpod-{A}")),
            (
                Runtime::Containerd,
                format!("system.slice/cri-containerd-{A}.scope"),
            ),
            (Runtime::Containerd, format!("k8s.io/{A}")),
            (Runtime::CriO, format!("machine.slice/crio-{A}.scope")),
        ];
        for (runtime, dir) in &layouts {
            Tree::new(&[dir]).expect(A, *runtime, A, dir);
        }
        let pods = [
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"
            ),
            format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
            ),
            format!("kubepods/burstable/pod{UID}"),
            format!("kubepods/pod{UID}"),
        ];
        for dir in &pods {
            let tree = Tree::new(&[dir]);
            tree.expect(UID, Runtime::KubernetesPod, UID, dir);
            tree.expect(&systemd_uid, Runtime::KubernetesPod, UID, dir);
        }
    }

    #[test]
    fn ids_match_by_prefix_in_any_case() {
        let dir = format!("system.slice/docker-{A}.scope");
        let tree = Tree::new(&[&dir]);
        tree.expect(&A[..12], Runtime::Docker, A, &dir);
        tree.expect(&A[..12].to_ascii_uppercase(), Runtime::Docker, A, &dir);
        assert!(matches!(
            tree.find(&B[..12]),
            Err(ContainerError::NotFound { .. })
        ));
    }

    #[test]
    fn shared_prefix_is_ambiguous() {
        let other = format!("{}{}", &A[..20], &B[20..]);
        let dirs = [
            format!("system.slice/docker-{A}.scope"),
            format!("system.slice/docker-{other}.scope"),
        ];
        let tree = Tree::new(&[&dirs[0], &dirs[1]]);
        match tree.find(&A[..12]) {
            Err(err @ ContainerError::Ambiguous { .. }) => {
                let ContainerError::Ambiguous { matches, .. } = &err else {
                    unreachable!()
                };
                let mut expected: Vec<_> = dirs.iter().map(|dir| tree.root().join(dir)).collect();
                expected.sort();
                assert_eq!(matches, &expected);
                assert!(err.to_string().contains("give a longer id"), "{err}");
            }
            other => panic!("finding a shared prefix: {other:?}"),
        }
        tree.expect(&A[..21], Runtime::Docker, A, &dirs[0]);
    }

    #[test]
    fn missing_container_says_where_it_looked() {
        let tree = Tree::new(&["system.slice/sshd.service"]);
        let err = tree.find(A).expect_err("nothing to find");
        assert!(matches!(err, ContainerError::NotFound { .. }));
        let message = err.to_string();
        assert!(
            message.contains(&tree.root().display().to_string()),
            "{message}"
        );
        assert!(message.contains("docker ps"), "{message}");
    }

    #[test]
    fn conmon_cgroups_are_not_the_container() {
        let tree = Tree::new(&[
            &format!("machine.slice/libpod-conmon-{A}.scope"),
            &format!("machine.slice/crio-conmon-{A}.scope"),
        ]);
        assert!(matches!(tree.find(A), Err(ContainerError::NotFound { .. })));

        // With its own cgroup namespace a podman container's processes sit in a `container`
        // child; the match is the scope.
        let scope = format!("machine.slice/libpod-{A}.scope");
        let tree = Tree::new(&[
            &format!("machine.slice/libpod-conmon-{A}.scope"),
            &format!("{scope}/container"),
        ]);
        tree.expect(A, Runtime::Podman, A, &scope);
    }

    #[test]
    fn pod_uid_finds_the_pod_and_container_ids_its_containers() {
        let pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        );
        let first = format!("{pod}/cri-containerd-{A}.scope");
        let second = format!("{pod}/crio-{B}.scope");
        let tree = Tree::new(&[&first, &second]);
        tree.expect(UID, Runtime::KubernetesPod, UID, &pod);
        tree.expect(A, Runtime::Containerd, A, &first);
        tree.expect(&B[..12], Runtime::CriO, B, &second);

        let pod = format!("kubepods/besteffort/pod{UID}");
        let container = format!("{pod}/{A}");
        let tree = Tree::new(&[&container]);
        tree.expect(UID, Runtime::KubernetesPod, UID, &pod);
        tree.expect(A, Runtime::Containerd, A, &container);
    }

    #[test]
    fn bare_ids_elsewhere_are_not_containers() {
        let tree = Tree::new(&[&format!("system.slice/{A}"), &format!("pod{UID}")]);
        assert!(matches!(tree.find(A), Err(ContainerError::NotFound { .. })));
        assert!(matches!(
            tree.find(UID),
            Err(ContainerError::NotFound { .. })
        ));
    }

    #[test]
    fn bad_ids_are_refused() {
        let tree = Tree::new(&[&format!("docker/{A}")]);
        for id in [
            "",
            "abc",
            "a1b2c3d4e5f6;",
            "../../etc",
            "0f1e2d3c-4b5a",
            &format!("{A}0"),
        ] {
            assert!(
                matches!(tree.find(id), Err(ContainerError::BadId { .. })),
                "{id:?} was not refused"
            );
        }
        let err = tree.find("a1b2c3d4e5f6x").expect_err("a bad id");
        assert!(err.to_string().contains("characters other than"), "{err}");
    }

    #[test]
    fn symlinks_are_not_followed() {
        let tree = Tree::new(&["elsewhere"]);
        tree.procs(&format!("elsewhere/docker-{A}.scope"), "");
        let link = tree.root().join("system.slice");
        fs::create_dir(&link).expect("making a directory");
        std::os::unix::fs::symlink(tree.root().join("elsewhere"), link.join("linked"))
            .expect("making a symlink");
        // Found once, through the directory, not again through the link.
        tree.expect(
            A,
            Runtime::Docker,
            A,
            &format!("elsewhere/docker-{A}.scope"),
        );
    }

    #[test]
    fn any_pid_looks_in_the_cgroup_then_below_it() {
        let pod = format!("kubepods/pod{UID}");
        let tree = Tree::new(&[&pod]);
        let cgroup = tree.root().join(&pod);
        assert_eq!(any_pid(&cgroup).expect("reading the pod"), None);

        tree.procs(&format!("{pod}/{A}"), "4242\n4243\n");
        assert_eq!(any_pid(&cgroup).expect("reading the pod"), Some(4242));

        tree.procs(&pod, "7\n");
        assert_eq!(any_pid(&cgroup).expect("reading the pod"), Some(7));

        let missing = tree.root().join("gone");
        assert!(matches!(
            any_pid(&missing),
            Err(ContainerError::Host(super::super::HostError::Io { .. }))
        ));
    }
}
