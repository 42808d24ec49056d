//! Export to and import from standard tar archives (GNU format, with PAX records for
//! nanosecond mtimes).
//!
//! Export streams chunk by chunk (verifying each hash) and never holds a file in memory.
//! Import streams each file through the same chunker as capture, then validates the resulting
//! manifest exactly like one read from disk: no `..`, no absolute paths, no duplicates, nothing
//! below a symlink. Directories an archive leaves implicit (`tar -cf x.tar a/b/c` stores no
//! `a/`) are added with mode 0755 and a warning.

use super::chunks::{ChunkStore, ChunkWriter, Encoder, ReadTimes};
use super::manifest::{Chunk, Entry, EntryKind, ManifestParts, check_path, display_bytes, ns_from_time};
use super::restore::chunk_error;
use super::{SnapshotError, io_error};
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

/// A PAX time value: seconds since the epoch with a nanosecond fraction, e.g. `-1.500000000`.
fn pax_time(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

fn parse_pax_time(value: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(value).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    let abs = secs.checked_mul(1_000_000_000)?.checked_add(nanos)?;
    Some(if neg { -abs } else { abs })
}

fn base_header(kind: tar::EntryType, mode: u32, mtime_ns: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(mtime_ns.max(0) as u64 / 1_000_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h
}

/// Streams one file's chunks, verified, as a `Read` for the tar builder.
struct ChunkStream<'a> {
    store: &'a ChunkStore,
    chunks: &'a [Chunk],
    size: u64,
    chunk_size: u64,
    path: &'a [u8],
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    scratch: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    error: Option<SnapshotError>,
}

impl Read for ChunkStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next == self.chunks.len() {
                return Ok(0);
            }
            let chunk = self.chunks[self.next];
            let len = (self.size - self.next as u64 * self.chunk_size).min(self.chunk_size) as usize;
            let mut times = ReadTimes::default();
            if let Err(e) = self.store.read_verified(
                &chunk,
                len,
                &mut self.buf,
                &mut self.scratch,
                &mut self.decompressor,
                &mut times,
            ) {
                let e = chunk_error(e, &chunk, self.path);
                let msg = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(msg));
            }
            self.next += 1;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

pub(crate) fn export(store: &ChunkStore, parts: &ManifestParts, out: impl Write) -> Result<(), SnapshotError> {
    let werr = |e: io::Error| io_error("cannot write the tar archive", e);
    let mut b = tar::Builder::new(out);
    let mut root = base_header(tar::EntryType::Directory, parts.root_mode, parts.root_mtime_ns);
    append_pax_mtime(&mut b, parts.root_mtime_ns).map_err(werr)?;
    b.append_data(&mut root, "./", io::empty()).map_err(werr)?;
    for entry in &parts.entries {
        let path = OsStr::from_bytes(&entry.path);
        append_pax_mtime(&mut b, entry.mtime_ns).map_err(werr)?;
        match &entry.kind {
            EntryKind::Dir => {
                let mut h = base_header(tar::EntryType::Directory, entry.mode, entry.mtime_ns);
                let mut with_slash = entry.path.clone();
                with_slash.push(b'/');
                b.append_data(&mut h, OsStr::from_bytes(&with_slash), io::empty()).map_err(werr)?;
            }
            EntryKind::Symlink { target } => {
                let mut h = base_header(tar::EntryType::Symlink, entry.mode, entry.mtime_ns);
                // Written byte for byte (the tar crate's own setter would normalize the target).
                let slot = &mut h.as_old_mut().linkname;
                if target.len() <= slot.len() {
                    slot[..target.len()].copy_from_slice(target);
                } else {
                    let mut k = tar::Header::new_gnu();
                    k.as_gnu_mut().expect("gnu header").name[..13].copy_from_slice(b"././@LongLink");
                    k.set_entry_type(tar::EntryType::GNULongLink);
                    k.set_mode(0o644);
                    k.set_size(target.len() as u64 + 1);
                    k.set_cksum();
                    b.append(&k, target.as_slice().chain(&[0u8][..])).map_err(werr)?;
                    let n = slot.len();
                    slot.copy_from_slice(&target[..n]);
                }
                b.append_data(&mut h, path, io::empty()).map_err(werr)?;
            }
            EntryKind::File { size, chunks } => {
                let mut h = base_header(tar::EntryType::Regular, entry.mode, entry.mtime_ns);
                h.set_size(*size);
                let mut stream = ChunkStream {
                    store,
                    chunks,
                    size: *size,
                    chunk_size: u64::from(parts.chunk_size),
                    path: &entry.path,
                    next: 0,
                    buf: Vec::new(),
                    pos: 0,
                    scratch: Vec::new(),
                    decompressor: zstd::bulk::Decompressor::new().map_err(|e| io_error("cannot start zstd", e))?,
                    error: None,
                };
                if let Err(e) = b.append_data(&mut h, path, &mut stream) {
                    return Err(stream.error.take().unwrap_or_else(|| werr(e)));
                }
            }
        }
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(werr)
}

fn append_pax_mtime<W: Write>(b: &mut tar::Builder<W>, mtime_ns: i64) -> io::Result<()> {
    if mtime_ns.rem_euclid(1_000_000_000) == 0 && mtime_ns >= 0 {
        return Ok(()); // the header's whole seconds say it all
    }
    let value = pax_time(mtime_ns);
    b.append_pax_extensions([("mtime", value.as_bytes())])
}

/// `./a/b/` -> `a/b`; `./` and `.` -> empty (the root).
fn normalize(mut p: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = p.strip_prefix(b"./") {
            p = rest;
        } else if p == b"." {
            p = b"";
        } else {
            break;
        }
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    p
}

pub(crate) fn import(
    writer: &ChunkWriter<'_>,
    chunk_size: u32,
    reader: impl Read,
    source: String,
    started: SystemTime,
) -> Result<ManifestParts, SnapshotError> {
    let bad = |msg: String| SnapshotError::InvalidArchive(msg);
    let now_ns = ns_from_time(SystemTime::now());
    let cs = u64::from(chunk_size);
    let mut archive = tar::Archive::new(reader);
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    let mut warnings = Vec::new();
    let (mut root_mode, mut root_mtime_ns) = (0o755, now_ns);
    let mut enc = Encoder::new().map_err(|e| io_error("cannot start zstd", e))?;
    let mut buf = vec![0u8; chunk_size as usize];
    for item in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut item = item.map_err(|e| bad(e.to_string()))?;
        let raw_path = item.path_bytes().into_owned();
        let path = normalize(&raw_path).to_vec();
        let shown = display_bytes(&raw_path);
        if !path.is_empty() {
            check_path(&path).map_err(|reason| bad(format!("`{shown}`: {reason}")))?;
        }
        let header = item.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| bad(format!("`{shown}`: {e}")))? & 0o7777;
        let mut mtime_ns =
            header.mtime().map(|s| (s.min(i64::MAX as u64 / 1_000_000_000) as i64) * 1_000_000_000).unwrap_or(0);
        if let Ok(Some(pax)) = item.pax_extensions() {
            for ext in pax.flatten() {
                if ext.key_bytes() == b"mtime"
                    && let Some(ns) = parse_pax_time(ext.value_bytes())
                {
                    mtime_ns = ns;
                }
            }
        }
        let mut entry = Entry { path: path.clone(), kind: EntryKind::Dir, mode, mtime_ns, ctime_ns: 0, inode: 0 };
        match kind {
            tar::EntryType::Directory => {
                if path.is_empty() {
                    (root_mode, root_mtime_ns) = (mode, mtime_ns);
                    continue;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = item.size();
                let mut chunks = Vec::with_capacity(size.div_ceil(cs).min(1 << 16) as usize);
                let mut left = size;
                while left > 0 {
                    let len = left.min(cs) as usize;
                    item.read_exact(&mut buf[..len]).map_err(|e| bad(format!("`{shown}`: {e}")))?;
                    chunks.push(writer.put(&buf[..len], &mut enc).map_err(|e| io_error("cannot write a chunk", e))?);
                    left -= len as u64;
                }
                entry.kind = EntryKind::File { size, chunks };
            }
            tar::EntryType::Symlink => {
                let target = item.link_name_bytes().ok_or_else(|| bad(format!("symlink `{shown}` has no target")))?;
                entry.kind = EntryKind::Symlink { target: target.into_owned() };
            }
            tar::EntryType::Link => {
                let target = item.link_name_bytes().ok_or_else(|| bad(format!("hard link `{shown}` has no target")))?;
                let target = normalize(&target).to_vec();
                match entries.get(&target).map(|e| &e.kind) {
                    Some(k @ EntryKind::File { .. }) => entry.kind = k.clone(),
                    _ => {
                        return Err(bad(format!(
                            "hard link `{shown}` points to `{}`, which is not an earlier regular file",
                            display_bytes(&target)
                        )));
                    }
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                warnings.push(format!("skipped `{shown}` (tar entry type {:?})", other));
                continue;
            }
        }
        if path.is_empty() {
            return Err(bad(format!("`{shown}` names the root but is not a directory")));
        }
        if entries.insert(path, entry).is_some() {
            return Err(bad(format!("`{shown}` appears twice")));
        }
    }
    // Directories the archive leaves implicit.
    let mut missing: HashSet<Vec<u8>> = HashSet::new();
    for path in entries.keys() {
        let mut end = path.len();
        while let Some(slash) = path[..end].iter().rposition(|&b| b == b'/') {
            let parent = &path[..slash];
            if !entries.contains_key(parent) {
                missing.insert(parent.to_vec());
            }
            end = slash;
        }
    }
    for parent in missing {
        warnings.push(format!("added missing directory `{}`", display_bytes(&parent)));
        let entry =
            Entry { path: parent.clone(), kind: EntryKind::Dir, mode: 0o755, mtime_ns: now_ns, ctime_ns: 0, inode: 0 };
        entries.insert(parent, entry);
    }
    let c = &writer.counters;
    let parts = ManifestParts {
        created_unix_ns: 0,
        capture_started_unix_ns: ns_from_time(started),
        source,
        chunk_size,
        root_mode,
        root_mtime_ns,
        // Byte order puts every directory before what it contains.
        entries: entries.into_values().collect(),
        warnings,
        stored_bytes_new: c.stored_bytes_new.load(std::sync::atomic::Ordering::Relaxed),
    };
    parts.validate().map_err(|e| SnapshotError::InvalidArchive(e.to_string()))?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_round_trip() {
        for ns in [0, 1, 1_500_000_000, -1_500_000_000, 1_700_000_000_123_456_789, -1] {
            assert_eq!(parse_pax_time(pax_time(ns).as_bytes()), Some(ns), "{}", pax_time(ns));
        }
        assert_eq!(parse_pax_time(b"12"), Some(12_000_000_000));
        assert_eq!(parse_pax_time(b"1.5"), Some(1_500_000_000));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }

    #[test]
    fn normalize_strips_dot_slash_and_trailing_slashes() {
        assert_eq!(normalize(b"./a/b/"), b"a/b");
        assert_eq!(normalize(b"./"), b"");
        assert_eq!(normalize(b"."), b"");
        assert_eq!(normalize(b"a"), b"a");
        assert_eq!(normalize(b"../a"), b"../a"); // left for validation to refuse
    }
}
