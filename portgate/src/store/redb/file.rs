//! The store's file kept at its path while the store is open (see the parent module).

use std::{
    fs::File,
    io::{Seek as _, SeekFrom},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    sync::{Arc, PoisonError},
};

use super::{Shared, StoreError, open_database};

/// Checks that the store's path still names `file`, the file the store writes. A file gone
/// from its path (deleted, or its directory deleted) is put back: a copy of it, taken
/// between commits, is written beside the path and renamed onto it, and the store goes on
/// in the copy; without that, every commit would go to a file that ends with the process.
/// A path that names another file fails, and keeps failing: the daemon stops and its
/// restart reads the file found there.
pub(super) fn keep_at_path(shared: &Shared, file: &mut File) -> Result<(), StoreError> {
    let path = &shared.path;
    let failed = |message: String| StoreError::Transaction {
        op: "keeping",
        message: format!("{}: {message}", path.display()),
    };
    let ours = file
        .metadata()
        .map_err(|error| failed(format!("reading the open file's status: {error}")))?;
    match std::fs::metadata(path) {
        Ok(there) if (there.dev(), there.ino()) == (ours.dev(), ours.ino()) => Ok(()),
        Ok(_) => {
            let why = "another file took its place while the daemon ran: the daemon stops \
                       at the next change, and reads that file when it starts again"
                .to_owned();
            shared.note(format!("its path now names another file; {why}"));
            Err(failed(why))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            put_back(shared, file).map_err(|why| {
                let why = format!(
                    "deleted while the daemon ran, and it could not be put back: {why}; \
                     everything acknowledged is in the daemon's open copy until it stops: \
                     make the directory writable and it is put back within a second"
                );
                shared.note(why.clone());
                failed(why)
            })?;
            let note = format!(
                "its file was deleted while the daemon ran and was put back from the \
                 daemon's open copy at {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            log::warn!("the store {}: {note}", path.display());
            shared.note(note);
            Ok(())
        }
        Err(error) => Err(failed(format!("looking for it: {error}"))),
    }
}

/// Writes a copy of `file` (the open store, between commits) at the store's path, opens
/// the copy and makes it the store's database and `file`.
fn put_back(shared: &Shared, file: &mut File) -> Result<(), String> {
    let path = &shared.path;
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|error| format!("creating {}: {error}", parent.display()))?;
    let mut staging_name = path.file_name().unwrap_or_default().to_owned();
    staging_name.push(".restoring");
    let staging = path.with_file_name(staging_name);
    let copied = (|| -> std::io::Result<()> {
        let mut copy = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staging)?;
        file.seek(SeekFrom::Start(0))?;
        std::io::copy(file, &mut copy)?;
        copy.sync_all()?;
        std::fs::rename(&staging, path)?;
        File::open(parent)?.sync_all()
    })();
    copied.map_err(|error| format!("copying the open file to {}: {error}", path.display()))?;
    let database = open_database(path)?;
    *file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("opening the copy: {error}"))?;
    *shared
        .database
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Arc::new(database);
    Ok(())
}
