//! The shape `cargo xtask lint` holds the product code to, beside rustfmt and clippy:
//!
//! - **Layers**: no module of the `portgate` crate imports one above it (see [`LAYERS`] and
//!   `docs/ARCHITECTURE.md`). Each source file is parsed with `syn`, and every path that
//!   starts at the crate root (`crate::x`, or enough `super::` to reach it) names the
//!   top-level module it uses.
//! - **Size**: no product source file has more than [`MAX_LINES`] lines.
//! - **No `too_many_lines` exception** in product code: a function that long is split.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use syn::visit::Visit;

/// The `portgate` crate's top-level modules from the bottom layer up. A module may use
/// modules of lower layers, never one of its own layer or above.
pub const LAYERS: [&[&str]; 8] = [
    // Constants and how errors read: no other module.
    &["paths", "text"],
    // The records every layer shares, and the configuration file.
    &["model", "config"],
    // Facts of the host: sockets, sysctls, cgroups, mounts, the kernel.
    &["host"],
    // The kernel gate, the durable store, the fleet's store (etcd), the userspace verdict,
    // the knock datagram.
    &["gate", "store", "fleet", "verdict", "knock"],
    // The port manager.
    &["manager"],
    // The local API's wire types.
    &["api"],
    // The daemon serving the API, and the client speaking it.
    &["daemon", "client"],
    // The command line.
    &["cli"],
];

/// The most lines a product source file may have.
pub const MAX_LINES: usize = 700;

/// The crates whose sources count as product code.
const PRODUCT_CRATES: [&str; 3] = ["portgate", "portgate-common", "portgate-ebpf"];

/// Runs every check on the workspace at `root`; fails with every problem found.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for krate in PRODUCT_CRATES {
        for file in rust_files(&root.join(krate).join("src"))? {
            let text =
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let shown = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            let lines = text.lines().count();
            if lines > MAX_LINES {
                problems.push(format!(
                    "{shown}: {lines} lines, more than {MAX_LINES}: split it by concern"
                ));
            }
            if text.contains("too_many_lines") {
                problems.push(format!(
                    "{shown}: a too_many_lines exception: split the function instead"
                ));
            }
            if krate == "portgate" {
                problems.extend(layer_problems(&root.join(krate).join("src"), &file, &text)?);
            }
        }
    }
    if problems.is_empty() {
        println!("shape: layers, file sizes and function lengths hold");
        return Ok(());
    }
    bail!("the code's shape:\n  - {}", problems.join("\n  - "))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The layer of a top-level module; `None` for the binary's `main.rs` and `lib.rs`.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Where `file` (under `src`) uses a module of its own layer or above.
fn layer_problems(src: &Path, file: &Path, text: &str) -> Result<Vec<String>> {
    let module_path = module_path(src, file);
    let Some(own) = module_path.first() else {
        return Ok(Vec::new());
    };
    let Some(own_layer) = layer_of(own) else {
        bail!(
            "{}: module `{own}` is in no layer: add it to xtask's shape::LAYERS and to docs/ARCHITECTURE.md",
            file.display()
        );
    };
    let syntax = syn::parse_file(text).with_context(|| format!("parsing {}", file.display()))?;
    let mut uses = CrateUses {
        module_path: &module_path,
        used: BTreeSet::new(),
    };
    uses.visit_file(&syntax);
    let shown = file.display();
    Ok(uses
        .used
        .into_iter()
        .filter(|used| used != own)
        .filter_map(|used| match layer_of(&used) {
            Some(layer) if layer < own_layer => None,
            Some(layer) => Some(format!(
                "{shown}: `{own}` (layer {own_layer}) uses `{used}` (layer {layer}): a lower layer never uses a higher one or a sibling; move the shared part down (usually into `model`)"
            )),
            None => None,
        })
        .collect())
}

/// The module path of `file` under `src`: `["manager", "transaction"]` for
/// `manager/transaction.rs`, `["manager"]` for `manager/mod.rs`, `[]` for `lib.rs`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|last| last == "mod" || last == "lib" || last == "main")
    {
        parts.pop();
    }
    parts
}

/// The top-level modules a file's paths reach from the crate root.
struct CrateUses<'a> {
    /// The file's own module path (where `super` starts from).
    module_path: &'a [String],
    used: BTreeSet<String>,
}

impl CrateUses<'_> {
    /// Records the top-level module that a path made of `segments` reaches from the crate
    /// root, if it starts there (`crate::`, or `super::` up to the root).
    fn record(&mut self, segments: &[String]) {
        let supers = segments
            .iter()
            .take_while(|segment| *segment == "super")
            .count();
        let first = if segments.first().is_some_and(|first| first == "crate") {
            segments.get(1)
        } else if supers > 0 && supers >= self.module_path.len() {
            segments.get(supers)
        } else {
            None
        };
        if let Some(module) = first {
            self.used.insert(module.clone());
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => {
                prefix.push(name.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(rename) => {
                prefix.push(rename.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => {
                prefix.push("*".to_owned());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Group(group) => {
                for item in &group.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for CrateUses<'_> {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path
            .segments
            .iter()
            .map(|segment| segment.ident.to_string())
            .collect();
        self.record(&segments);
        syn::visit::visit_path(self, path);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{layer_problems, module_path};

    #[test]
    fn module_paths_follow_the_files() {
        let src = Path::new("/x/src");
        assert_eq!(
            module_path(src, Path::new("/x/src/lib.rs")),
            Vec::<String>::new()
        );
        assert_eq!(module_path(src, Path::new("/x/src/api.rs")), ["api"]);
        assert_eq!(module_path(src, Path::new("/x/src/gate/mod.rs")), ["gate"]);
        assert_eq!(
            module_path(src, Path::new("/x/src/manager/transaction.rs")),
            ["manager", "transaction"]
        );
    }

    #[test]
    fn a_use_of_a_higher_layer_is_found_however_it_is_written() {
        let src = Path::new("/x/src");
        let store = Path::new("/x/src/store/redb.rs");
        for text in [
            "use crate::manager::PortError;",
            "use crate::{model::PortId, manager::{self, PortError}};",
            "fn f() { let _ = crate::manager::now(); }",
            "use super::super::manager::PortError;",
        ] {
            let problems = layer_problems(src, store, text).unwrap();
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert!(
                problems[0].contains("`store` (layer 3) uses `manager`"),
                "{problems:?}"
            );
        }
        for text in [
            "use crate::model::PortId;",
            "use super::Store;",
            "use crate::store::Change;",
            "// crate::manager in a comment\nfn f() {}",
        ] {
            assert!(
                layer_problems(src, store, text).unwrap().is_empty(),
                "{text}"
            );
        }
        // Siblings of one layer do not use each other either.
        let gate = Path::new("/x/src/gate/maps.rs");
        assert_eq!(
            layer_problems(src, gate, "use crate::store::Store;")
                .unwrap()
                .len(),
            1
        );
    }
}
