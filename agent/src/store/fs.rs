//! File helpers the backends share: a private store directory, and writes that
//! are on stable storage (file and directory entry) when they return.

use std::path::Path;

use tracing::warn;

use super::StoreError;

pub fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub fn remove_any(path: &Path) -> Result<(), StoreError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(io_error)
}

pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_error)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_error)?;
    std::fs::rename(&tmp, path).map_err(io_error)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error)
}

/// Creates the store directory readable by its owner only: readings can be private.
/// The entries of the directories it made are synced too, so the store in them
/// cannot vanish at a power cut.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.exists() {
        return Ok(());
    }
    let made: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
    for d in made {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Not ours, and perhaps not readable: the store works without it, only a
        // power cut right after this first start could take the new directory.
        if let Err(error) = sync_dir(parent) {
            warn!(dir = %parent.display(), %error, "cannot sync the directory the store directory was created in");
        }
    }
    Ok(())
}
