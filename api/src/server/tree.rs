//! Host-side changes to a sandbox tree. A tree is the guest's: anything in it may be a
//! symlink a guest planted (`/home` pointing at `../../../snapshots/fs/tmp`, say). So the
//! host touches it only through the tree's cap-std `Dir`, one component at a time, and
//! never follows a symlink: what a guest put in the way is left as it is.

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;
use std::io;
use std::path::Path;

/// The directories every sandbox has (the working directory and a scratch space).
pub const STANDARD_DIRS: [&str; 2] = ["home/user", "tmp"];

/// Makes [`STANDARD_DIRS`] in `root` where they are missing. One the guest replaced with
/// something else (a file, a symlink) is left alone, with a note in the log: the guest
/// chose its tree, and the host must not act through its links.
pub fn ensure_standard_dirs(root: &Dir) -> io::Result<()> {
    for rel in STANDARD_DIRS {
        if !ensure_dir(root, Path::new(rel))? {
            tracing::info!("`/{rel}` is not a directory in this sandbox tree; left as the guest made it");
        }
    }
    Ok(())
}

/// Makes `rel` (plain components, relative) a directory under `root`, creating what is
/// missing, without following any symlink. `Ok(false)` if a component exists and is not
/// a directory.
pub fn ensure_dir(root: &Dir, rel: &Path) -> io::Result<bool> {
    let mut dir = root.try_clone()?;
    for component in rel.components() {
        let std::path::Component::Normal(name) = component else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a plain relative path: {rel:?}")));
        };
        match dir.create_dir(name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // O_NOFOLLOW: a symlink (planted, or swapped in since the mkdir) is not entered.
        dir = match dir.open_dir_nofollow(name) {
            Ok(d) => d,
            // ELOOP (a symlink) or ENOTDIR (a file): something else is in the way.
            Err(e) if dir.symlink_metadata(name).is_ok_and(|m| !m.is_dir()) => {
                tracing::debug!("not entering {name:?}: {e}");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_links_and_files_are_not_followed_or_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("home")).unwrap();
        std::fs::write(root.join("tmp"), b"a file").unwrap();
        let dir = Dir::open_ambient_dir(&root, cap_std::ambient_authority()).unwrap();
        ensure_standard_dirs(&dir).unwrap();
        assert!(!outside.join("user").exists(), "followed the link out");
        assert!(std::fs::symlink_metadata(root.join("home")).unwrap().is_symlink());
        assert_eq!(std::fs::read(root.join("tmp")).unwrap(), b"a file");
        // An in-tree link is not followed either.
        std::fs::remove_file(root.join("home")).unwrap();
        std::fs::create_dir(root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink("elsewhere", root.join("home")).unwrap();
        assert!(!ensure_dir(&dir, Path::new("home/user")).unwrap());
        assert!(!root.join("elsewhere/user").exists());
        // A fresh tree gets both.
        std::fs::remove_file(root.join("home")).unwrap();
        std::fs::remove_file(root.join("tmp")).unwrap();
        ensure_standard_dirs(&dir).unwrap();
        assert!(root.join("home/user").is_dir() && root.join("tmp").is_dir());
        assert!(ensure_dir(&dir, Path::new("../x")).is_err());
    }
}
