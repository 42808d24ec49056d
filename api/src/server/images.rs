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

    #[tokio::test]
    async fn the_pool_hands_out_copies_of_the_current_image_only() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/tool.wasm"), b"v1").unwrap();
        let images = Images::new(tmp.path().join("images"));
        let image = images.add("default", &src).unwrap();
        let pool = std::sync::Arc::new(TreePool::new(tmp.path().join("pool")).unwrap());
        let sandboxes = tmp.path().join("sandboxes");
        fs::create_dir_all(&sandboxes).unwrap();
        assert!(!pool.take(&image, &sandboxes.join("a")), "empty at first");
        pool.refill(&image);
        let ready = || pool.state.lock().unwrap().ready.get(&image).map_or(0, Vec::len);
        while ready() < pool.target || !pool.state.lock().unwrap().refilling.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(pool.take(&image, &sandboxes.join("b")));
        assert_eq!(fs::read(sandboxes.join("b/root/bin/tool.wasm")).unwrap(), b"v1");
        assert!(sandboxes.join("b/root/home/user").is_dir() && sandboxes.join("b/root/tmp").is_dir());
        // Replaced: the copies of the old tree are thrown away, not handed out.
        fs::write(src.join("bin/tool.wasm"), b"v2").unwrap();
        images.add("default", &src).unwrap();
        assert!(!pool.take(&image, &sandboxes.join("c")));
        assert_eq!(ready(), 0);
        assert_eq!(fs::read_dir(tmp.path().join("pool")).unwrap().count(), 0);
    }

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

/// Trees copied from images ahead of time, so that creating a sandbox renames a ready
/// tree into place instead of copying the image while the client waits. Each image in use
/// keeps up to [`TreePool::TARGET`] ready trees under `<data>/pool/`; a tree built from an
/// image that has since been replaced (`stasis image add` renames a new tree into place)
/// is never handed out.
pub struct TreePool {
    dir: PathBuf,
    /// Ready trees kept per image: [`TreePool::TARGET`], or `$STASIS_POOL_TREES` (0: none).
    target: usize,
    state: std::sync::Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    ready: std::collections::HashMap<PathBuf, Vec<ReadyTree>>,
    refilling: std::collections::HashSet<PathBuf>,
}

struct ReadyTree {
    /// A directory holding `root/`, the copy.
    dir: PathBuf,
    image: ImageIdentity,
}

/// Which tree an image path held: inode and change time (a rename changes both).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ImageIdentity(u64, i64, i64);

fn identity(image: &Path) -> io::Result<ImageIdentity> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(image)?;
    Ok(ImageIdentity(m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Makes a sandbox tree in `dir/root`: a copy of `image` (or empty) with `/home/user` and `/tmp`.
pub fn build_image_tree(image: Option<&Path>, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let root = dir.join("root");
    match image {
        Some(image) => copy_tree(image, &root)?,
        None => fs::create_dir(&root)?,
    }
    // An image is the operator's, but may hold links too: the same rule as for restores.
    super::tree::ensure_standard_dirs(&cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority())?)
}

impl TreePool {
    /// Ready trees kept per image.
    pub const TARGET: usize = 4;

    /// A pool under `dir`, emptied of what an earlier run left.
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&dir)?;
        let target = std::env::var("STASIS_POOL_TREES").ok().and_then(|v| v.parse().ok()).unwrap_or(Self::TARGET);
        Ok(TreePool { dir, target, state: Default::default() })
    }

    /// Moves a ready copy of `image` to `dir/root` (`dir` must not exist); false if there
    /// is none (then the caller copies the image itself).
    pub fn take(&self, image: &Path, dir: &Path) -> bool {
        let Ok(current) = identity(image) else { return false };
        loop {
            let tree = self.state.lock().unwrap().ready.get_mut(image).and_then(Vec::pop);
            let Some(tree) = tree else { return false };
            if tree.image == current && fs::rename(&tree.dir, dir).is_ok() {
                return true;
            }
            let _ = fs::remove_dir_all(&tree.dir);
        }
    }

    /// Tops up the ready copies of `image` in the background (one refill per image at a time).
    pub fn refill(self: &std::sync::Arc<Self>, image: &Path) {
        {
            let mut state = self.state.lock().unwrap();
            if state.ready.get(image).map_or(0, Vec::len) >= self.target || !state.refilling.insert(image.into()) {
                return;
            }
        }
        let (pool, image) = (self.clone(), image.to_path_buf());
        tokio::task::spawn_blocking(move || {
            loop {
                if pool.state.lock().unwrap().ready.get(&image).map_or(0, Vec::len) >= pool.target {
                    break;
                }
                // Taken before the copy: a copy that raced a replacement never matches.
                let Ok(before) = identity(&image) else { break };
                let dir = pool.dir.join(super::ids::incident());
                if let Err(e) = build_image_tree(Some(&image), &dir) {
                    tracing::warn!("cannot prepare a copy of `{}`: {e}", image.display());
                    let _ = fs::remove_dir_all(&dir);
                    break;
                }
                let mut state = pool.state.lock().unwrap();
                state.ready.entry(image.clone()).or_default().push(ReadyTree { dir, image: before });
            }
            pool.state.lock().unwrap().refilling.remove(&image);
        });
    }
}
