//! Images: named base trees under `<data>/images/NAME`, copied into each new sandbox.
//!
//! Images are administrator content (`stasis image add`), so they are copied with plain
//! host paths; what a sandbox does to its copy never reaches the image.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The image a sandbox starts from when the request names none. When it has not been
/// added, such sandboxes start empty.
pub const DEFAULT_IMAGE: &str = "default";

pub struct Images {
    dir: PathBuf,
}

/// `[a-z0-9][a-z0-9._-]{0,63}`: an image name is a directory name.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid image name `{name}`: use 1 to 64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        ))
    }
}

impl Images {
    pub fn new(dir: PathBuf) -> Self {
        Images { dir }
    }

    /// The tree of image `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<PathBuf> {
        validate_name(name).ok()?;
        let path = self.dir.join(name);
        path.is_dir().then_some(path)
    }

    /// Names of the images, sorted.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        match fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if validate_name(&name).is_ok() && entry.file_type()?.is_dir() {
                        names.push(name);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        names.sort();
        Ok(names)
    }

    /// Copies `source` in as image `name`, replacing an image of that name. The copy is
    /// built under a temporary name and renamed into place, so sandboxes created meanwhile
    /// see the old tree or the new one, never half of one.
    pub fn add(&self, name: &str, source: &Path) -> anyhow::Result<PathBuf> {
        validate_name(name).map_err(anyhow::Error::msg)?;
        if !source.is_dir() {
            anyhow::bail!("`{}` is not a directory", source.display());
        }
        fs::create_dir_all(&self.dir)?;
        let staging = self.dir.join(format!(".add-{name}-{}", super::ids::incident()));
        let result = copy_tree(source, &staging).and_then(|()| {
            let target = self.dir.join(name);
            let old = self.dir.join(format!(".old-{name}-{}", super::ids::incident()));
            let had_old = match fs::rename(&target, &old) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            fs::rename(&staging, &target)?;
            if had_old {
                fs::remove_dir_all(&old)?;
            }
            Ok(target)
        });
        match result {
            Ok(target) => Ok(target),
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(anyhow::Error::new(e).context(format!("cannot add image `{name}` from `{}`", source.display())))
            }
        }
    }
}

/// Copies a tree: directories, regular files (with their permission bits) and symlinks
/// (as symlinks, never followed). Other file types are skipped.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        }
    }
    let mode = fs::metadata(from)?.permissions().mode();
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_be_paths() {
        assert!(validate_name("default").is_ok());
        assert!(validate_name("py3.12-slim").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "Upper", "tensorlake/ubuntu", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn add_copies_files_and_symlinks_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/tool.wasm"), b"wasm").unwrap();
        fs::set_permissions(src.join("bin/tool.wasm"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("bin/link")).unwrap();
        let images = Images::new(tmp.path().join("images"));
        let path = images.add("default", &src).unwrap();
        assert_eq!(fs::read(path.join("bin/tool.wasm")).unwrap(), b"wasm");
        assert_eq!(fs::metadata(path.join("bin/tool.wasm")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::read_link(path.join("bin/link")).unwrap(), Path::new("/etc/passwd"));
        fs::write(src.join("bin/tool.wasm"), b"v2").unwrap();
        images.add("default", &src).unwrap();
        assert_eq!(fs::read(path.join("bin/tool.wasm")).unwrap(), b"v2");
        assert_eq!(images.list().unwrap(), vec!["default".to_string()]);
        assert!(images.get("nope").is_none());
        assert!(images.add("x", &src.join("bin/tool.wasm")).is_err());
    }
}
