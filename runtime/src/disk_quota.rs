//! A sandbox's disk quota: the bytes its tree may hold, across every writer (its
//! processes through WASI, the files API).
//!
//! Usage is the tree's apparent size (what `du --apparent-size` counts: file lengths, so
//! a sparse file costs its length) plus [`ENTRY_BYTES`] per file, directory or link, so
//! a guest cannot exhaust the host's inodes with empty files. It is measured by walking
//! the tree once, then kept by the writers: each reserves the most its write can add
//! before it runs, is refused (`ENOSPC`) when that would cross the limit, and settles
//! for what it really added after. Whatever may free space (unlink, rename, truncate) only
//! marks the count as possibly high; a refusal then walks the tree again before it
//! stands, so freed space is found without every delete paying for a walk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What each entry of the tree costs besides its length.
pub const ENTRY_BYTES: u64 = 512;

/// One sandbox's quota; clones share the account.
#[derive(Clone)]
pub struct DiskQuota {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    limit: u64,
    usage: Mutex<Usage>,
    /// Counts what may have shrunk a file (a truncation, a delete): a writer that knew its
    /// position was within its file knows it no longer.
    shrinks: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Usage {
    /// `None` until the tree is first walked.
    bytes: Option<u64>,
    /// The count may be above the tree's usage (an overwrite, a free) since the last walk.
    may_be_high: bool,
    /// Something freed space since the last walk (a delete, a truncation).
    freed: bool,
    /// When the last walk ended, and how long it took.
    last_walk: Option<(Instant, Duration)>,
}

/// A walk too quick to be worth spacing after a delete.
const CHEAP_WALK: Duration = Duration::from_micros(200);

impl Usage {
    /// Walks are spaced so they take at most 1/20 of the time, or 1/3 after a delete (a
    /// guest hovering at its limit, writing and being refused by turns, cannot keep a host
    /// thread walking a big tree); until the next one is due, a refusal stands on the count.
    /// After a delete, a tree that walks in under [`CHEAP_WALK`] is walked at once.
    fn walk_due(&self) -> bool {
        self.last_walk.is_none_or(|(at, took)| {
            if self.freed { took < CHEAP_WALK || at.elapsed() >= took * 2 } else { at.elapsed() >= took * 20 }
        })
    }

    /// Counts the tree afresh; an unreadable one counts as full rather than as empty.
    fn walk(&mut self, root: &Path) -> std::io::Result<()> {
        let started = Instant::now();
        let walked = tree_bytes(root);
        self.bytes = Some(*walked.as_ref().unwrap_or(&u64::MAX));
        self.may_be_high = false;
        self.freed = false;
        self.last_walk = Some((Instant::now(), started.elapsed()));
        walked.map(drop)
    }
}

/// A write past the quota.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("out of disk: the sandbox's tree would be {wanted} bytes, its limit is {limit} bytes ({used} in use)")]
pub struct NoSpace {
    pub used: u64,
    pub wanted: u64,
    pub limit: u64,
}

/// Room taken before a write; [`DiskQuota::settle`] it with what the write added.
#[must_use]
#[derive(Debug)]
pub struct Reserved(u64);

impl DiskQuota {
    /// A quota of `limit` bytes for the tree at `root`.
    pub fn new(root: impl Into<PathBuf>, limit: u64) -> DiskQuota {
        DiskQuota {
            inner: Arc::new(Inner { root: root.into(), limit, usage: Mutex::default(), shrinks: Default::default() }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes in use (walks the tree the first time, or if space may have been freed).
    pub fn used(&self) -> std::io::Result<u64> {
        let mut usage = self.inner.usage.lock().expect("disk quota lock");
        if usage.bytes.is_none() || usage.may_be_high {
            usage.walk(&self.inner.root)?;
        }
        Ok(usage.bytes.unwrap_or(0))
    }

    /// Takes room for a write that may add up to `bytes`. Walks the tree (blocking) the
    /// first time and before refusing on a count that may be high.
    pub fn reserve(&self, bytes: u64) -> Result<Reserved, NoSpace> {
        let mut usage = self.inner.usage.lock().expect("disk quota lock");
        if usage.bytes.is_none() {
            let _ = usage.walk(&self.inner.root);
        }
        loop {
            let used = usage.bytes.unwrap_or(u64::MAX);
            let wanted = used.saturating_add(bytes);
            if wanted <= self.inner.limit {
                usage.bytes = Some(wanted);
                return Ok(Reserved(bytes));
            }
            if !(usage.may_be_high && usage.walk_due()) {
                return Err(NoSpace { used, wanted, limit: self.inner.limit });
            }
            let _ = usage.walk(&self.inner.root);
        }
    }

    /// Gives back what a write reserved but did not add (`added`: what it really added).
    /// (It counts what was added even past the reservation: the count must not drift.)
    pub fn settle(&self, reserved: Reserved, added: u64) {
        let mut usage = self.inner.usage.lock().expect("disk quota lock");
        if let Some(bytes) = usage.bytes.as_mut() {
            *bytes = bytes.saturating_sub(reserved.0).saturating_add(added);
        }
    }

    /// Space may have been freed (a delete, a rename over a file, a truncation): the next
    /// refusal walks the tree first.
    pub fn note_may_have_freed(&self) {
        self.inner.shrinks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut usage = self.inner.usage.lock().expect("disk quota lock");
        usage.may_be_high = true;
        usage.freed = true;
    }

    /// How many times something may have shrunk a file of the tree.
    pub fn shrink_epoch(&self) -> u64 {
        self.inner.shrinks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The count may be above the usage (a write charged in full may have overwritten):
    /// a refusal walks the tree first, when a walk is due.
    pub fn note_may_be_high(&self) {
        self.inner.usage.lock().expect("disk quota lock").may_be_high = true;
    }
}

impl std::fmt::Debug for DiskQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskQuota({} bytes at {})", self.inner.limit, self.inner.root.display())
    }
}

/// Two quotas are the same when they are one account (a sandbox's).
impl PartialEq for DiskQuota {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for DiskQuota {}

/// The usage of the tree at `root`, as the quota counts it. Symlinks are not followed.
pub fn tree_bytes(root: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total = total.saturating_add(ENTRY_BYTES);
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_refused_past_the_limit_and_freed_space_is_found_again() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), vec![0u8; 1000]).unwrap();
        let quota = DiskQuota::new(tmp.path(), 4000);
        assert_eq!(quota.used().unwrap(), 1000 + ENTRY_BYTES);
        let r = quota.reserve(1000).unwrap();
        std::fs::write(tmp.path().join("b"), vec![0u8; 1500]).unwrap();
        quota.settle(r, 1500 + ENTRY_BYTES);
        assert_eq!(quota.used().unwrap(), 2500 + 2 * ENTRY_BYTES);
        let refused = quota.reserve(2000).unwrap_err();
        assert_eq!(refused, NoSpace { used: 2500 + 2 * ENTRY_BYTES, wanted: 4500 + 2 * ENTRY_BYTES, limit: 4000 });
        std::fs::remove_file(tmp.path().join("b")).unwrap();
        quota.note_may_have_freed();
        let r = quota.reserve(2000).expect("the walk finds the freed space");
        quota.settle(r, 0);
        assert_eq!(quota.used().unwrap(), 1000 + ENTRY_BYTES);
    }

    #[test]
    fn an_overwrite_count_is_corrected_by_a_walk_when_one_is_due() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), vec![0u8; 1000]).unwrap();
        let quota = DiskQuota::new(tmp.path(), 4000);
        // Two overwrites of the same 1000 bytes, each charged in full.
        for _ in 0..2 {
            let r = quota.reserve(1000).unwrap();
            quota.settle(r, 1000);
            quota.note_may_be_high();
        }
        std::thread::sleep(Duration::from_millis(50));
        let r = quota.reserve(2000).expect("the walk finds the count high");
        quota.settle(r, 0);
        assert_eq!(quota.used().unwrap(), 1000 + ENTRY_BYTES);
    }

    #[test]
    fn the_walk_counts_nested_entries_and_does_not_follow_links() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("d/e")).unwrap();
        std::fs::write(tmp.path().join("d/e/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("/usr", tmp.path().join("d/usr")).unwrap();
        assert_eq!(tree_bytes(tmp.path()).unwrap(), 5 + 4 * ENTRY_BYTES);
    }
}
