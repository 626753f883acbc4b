//! `portgate man`: manual pages in roff, generated from the same clap definitions as
//! `--help` and the completions, so that they cannot say something else.
//!
//! The installable pages are committed in `dist/man/`; a unit test fails when they differ
//! from what [`pages`] makes, and says how to write them again.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use clap::{Args, CommandFactory as _};

use super::Cli;

/// `portgate man`'s options.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write every page to this directory (it must exist) instead of the main page to stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// What went wrong writing the pages.
#[derive(Debug, thiserror::Error)]
pub enum ManError {
    /// A page could not be rendered or written.
    #[error("writing the manual page {}: {reason}: check that the directory exists and is writable", path.display())]
    Write {
        /// The page (`-` for stdout).
        path: PathBuf,
        /// What the system said.
        reason: io::Error,
    },
}

/// One manual page: its file name (`portgate-alloc.1`) and its roff text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The file name, section included.
    pub name: String,
    /// The roff source.
    pub roff: Vec<u8>,
}

/// Every page: the main one first, then one per verb and per verb of a verb, in the order
/// `--help` lists them (`help` has none: the pages are the help).
pub fn pages() -> Result<Vec<Page>, ManError> {
    let mut command = Cli::command().disable_help_subcommand(true);
    // Building gives each verb its display name (`portgate-alloc`) and the global options.
    command.build();
    let mut pages = Vec::new();
    collect(command, &mut pages)?;
    Ok(pages)
}

/// Renders `command`'s page, then its verbs' pages.
fn collect(command: clap::Command, pages: &mut Vec<Page>) -> Result<(), ManError> {
    let verbs: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|verb| !verb.is_hide_set())
        .cloned()
        .collect();
    let man = clap_mangen::Man::new(command)
        // The verbs carry no version of their own; every page names the release.
        .source(format!("portgate {}", env!("CARGO_PKG_VERSION")))
        .manual("portgate manual");
    let name = man.get_filename();
    let mut roff = Vec::new();
    man.render(&mut roff).map_err(|reason| ManError::Write {
        path: PathBuf::from(&name),
        reason,
    })?;
    pages.push(Page { name, roff });
    for verb in verbs {
        collect(verb, pages)?;
    }
    Ok(())
}

/// Runs `portgate man`.
pub fn run(args: &ManArgs) -> anyhow::Result<()> {
    let pages = pages()?;
    if let Some(dir) = &args.dir {
        return Ok(write_pages(&pages, dir)?);
    }
    let main = pages
        .first()
        .map(|page| page.roff.as_slice())
        .unwrap_or_default();
    io::stdout()
        .lock()
        .write_all(main)
        .map_err(|reason| ManError::Write {
            path: PathBuf::from("-"),
            reason,
        })?;
    Ok(())
}

/// Writes each page to `dir` under its name.
fn write_pages(pages: &[Page], dir: &Path) -> Result<(), ManError> {
    for page in pages {
        let path = dir.join(&page.name);
        std::fs::write(&path, &page.roff).map_err(|reason| ManError::Write { path, reason })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::pages;

    /// How the committed pages are written again: the one way.
    const REGENERATE: &str = "cargo run -p portgate -- man --dir dist/man";

    #[test]
    fn every_verb_has_a_page() {
        let pages = pages().expect("the pages");
        let names: BTreeSet<&str> = pages.iter().map(|page| page.name.as_str()).collect();
        for name in [
            "portgate.1",
            "portgate-alloc.1",
            "portgate-top.1",
            "portgate-man.1",
            "portgate-key-add.1",
            "portgate-fleet-repair.1",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("portgate-help.1"), "{names:?}");
        assert_eq!(names.len(), pages.len(), "a page name twice");
        let main = String::from_utf8(pages[0].roff.clone()).expect("UTF-8 roff");
        assert!(main.starts_with(".ie \\n(.g .ds Aq"), "{main}");
        assert!(main.contains("PORTGATE_SOCKET"), "{main}");
    }

    /// The committed pages in dist/man are what the code makes now.
    #[test]
    fn the_committed_pages_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/man");
        let pages = pages().expect("the pages");
        for page in &pages {
            let committed = std::fs::read(dir.join(&page.name)).unwrap_or_default();
            assert!(
                committed == page.roff,
                "dist/man/{} is missing or out of date: run `{REGENERATE}` from the workspace's root and commit the result",
                page.name
            );
        }
        let made: BTreeSet<String> = pages.into_iter().map(|page| page.name).collect();
        let stale: Vec<String> = std::fs::read_dir(&dir)
            .expect("dist/man")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| !made.contains(name))
            .collect();
        assert!(
            stale.is_empty(),
            "dist/man holds pages of no command: {stale:?}: delete them, run `{REGENERATE}` and commit the result"
        );
    }
}
