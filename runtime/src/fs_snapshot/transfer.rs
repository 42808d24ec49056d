//! Moving committed snapshots between stores: what another store needs to hold a snapshot
//! (its manifest's bytes and the stored bytes of its chunks), and the import that verifies
//! every chunk before it names it.
//!
//! A snapshot keeps its id wherever it goes (ids are unique: time plus 64 random bits), and
//! chunks travel as stored (raw or one zstd frame), so nothing is recompressed on the way
//! and the receiving store holds byte-identical chunk files.

use super::chunks::{ChunkReadError, Marker};
use super::manifest::{Chunk, ChunkHash, EntryKind, Manifest};
use super::restore::chunk_error;
use super::{FsSnapshotStore, PendingGuard, Result, SnapshotError, SnapshotId, io_error};
use std::collections::HashSet;
use std::io;

/// One chunk a snapshot needs, as its manifest describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub chunk: Chunk,
    /// Raw bytes the chunk holds (the last chunk of a file is shorter).
    pub logical_len: u32,
}

impl StoredChunk {
    pub fn hash(&self) -> ChunkHash {
        self.chunk.hash().expect("zero chunks are never listed")
    }

    /// Length of the chunk file: the zstd frame, or the raw bytes.
    pub fn stored_len(&self) -> u64 {
        self.chunk.stored_len(u64::from(self.logical_len))
    }
}

/// What an [`FsSnapshotStore::import`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Chunks this store already held (another snapshot shares them).
    pub chunks_present: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Chunks that failed verification once and were fetched again.
    pub chunks_refetched: u64,
    /// The snapshot was already here: nothing was fetched.
    pub already_present: bool,
}

/// Chunks are asked for in batches of this many (at most 32 MiB in flight).
const FETCH_BATCH: usize = 32;

impl FsSnapshotStore {
    /// Whether snapshot `id` is committed in this store.
    pub fn contains(&self, id: &SnapshotId) -> Result<bool> {
        match self.snapshots.symlink_metadata(id.file_name()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(format!("cannot check {id}"), e)),
        }
    }

    /// The manifest file of a committed snapshot, byte for byte, after checking that it
    /// decodes.
    pub fn manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let bytes = match self.snapshots.read(id.file_name()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SnapshotError::NotFound(id.clone())),
            Err(e) => return Err(io_error(format!("cannot read the manifest of {id}"), e)),
        };
        Manifest::decode(&bytes).map_err(|e| SnapshotError::Manifest { id: id.to_string(), source: e })?;
        Ok(bytes)
    }

    /// Every distinct stored chunk `manifest` names, in the order files name them.
    pub fn stored_chunks(manifest: &Manifest) -> Vec<StoredChunk> {
        let chunk_size = u64::from(manifest.parts().chunk_size);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for entry in manifest.entries() {
            let EntryKind::File { size, chunks } = &entry.kind else { continue };
            for (i, chunk) in chunks.iter().enumerate() {
                let Some(hash) = chunk.hash() else { continue };
                if seen.insert(hash) {
                    let logical_len = (size - i as u64 * chunk_size).min(chunk_size) as u32;
                    out.push(StoredChunk { chunk: *chunk, logical_len });
                }
            }
        }
        out
    }

    /// A chunk file's bytes, as stored (for a store elsewhere to import).
    pub fn read_stored_chunk(&self, chunk: &StoredChunk) -> Result<Vec<u8>> {
        let hash = chunk.hash();
        let bytes = self.chunks.read_stored(&hash).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                SnapshotError::ChunkMissing { hash: hash.to_hex(), path: "(chunk transfer)".into() }
            }
            _ => io_error(format!("cannot read chunk {hash}"), e),
        })?;
        if bytes.len() as u64 != chunk.stored_len() {
            return Err(SnapshotError::ChunkCorrupt {
                hash: hash.to_hex(),
                path: "(chunk transfer)".into(),
                reason: format!("{} bytes stored, expected {}", bytes.len(), chunk.stored_len()),
            });
        }
        Ok(bytes)
    }

    /// Makes snapshot `id`, whose manifest is `manifest_bytes`, a committed snapshot of this
    /// store. The chunks this store lacks are asked of `fetch` in batches (it answers with
    /// their stored bytes, in order); each is verified (length, zstd frame, blake3 of the
    /// raw bytes) before it is written, and one that fails is asked for once more before the
    /// import fails. The manifest is written last, durably, as by a capture's commit: a
    /// failure or a crash leaves no snapshot, and only unreferenced chunks that the next
    /// sweep removes.
    pub fn import(
        &self,
        id: &SnapshotId,
        manifest_bytes: &[u8],
        mut fetch: impl FnMut(&[StoredChunk]) -> std::result::Result<Vec<Vec<u8>>, String>,
    ) -> Result<ImportStats> {
        let manifest =
            Manifest::decode(manifest_bytes).map_err(|e| SnapshotError::Manifest { id: id.to_string(), source: e })?;
        let _lock = self.shared_lock()?;
        let _pending = PendingGuard::new(&self.pending);
        if self.contains(id)? {
            return Ok(ImportStats { already_present: true, ..ImportStats::default() });
        }
        let mut stats = ImportStats::default();
        let mut missing = Vec::new();
        for wanted in Self::stored_chunks(&manifest) {
            let held = self.chunks.stored_len(&wanted.hash()).map_err(|e| io_error("cannot check a chunk", e))?;
            if held == Some(wanted.stored_len()) {
                stats.chunks_present += 1;
            } else {
                missing.push(wanted);
            }
        }
        let marker = Marker::new(self.chunks.tmp(), self.nonce);
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| io_error("cannot start a zstd decompressor", e))?;
        // `fetch`, held to its word: one answer per chunk asked for.
        let mut ask = |batch: &[StoredChunk]| {
            let got = fetch(batch).map_err(SnapshotError::Transfer)?;
            if got.len() != batch.len() {
                return Err(SnapshotError::Transfer(format!("asked for {} chunks, got {}", batch.len(), got.len())));
            }
            Ok(got)
        };
        let result = (|| {
            for batch in missing.chunks(FETCH_BATCH) {
                let got = ask(batch)?;
                for (wanted, bytes) in batch.iter().zip(got) {
                    stats.chunks_fetched += 1;
                    stats.bytes_fetched += bytes.len() as u64;
                    let put = |bytes: &[u8], d: &mut zstd::bulk::Decompressor<'static>| {
                        self.chunks.put_verified(&wanted.chunk, wanted.logical_len as usize, bytes, &marker, d)
                    };
                    match put(&bytes, &mut decompressor) {
                        Ok(()) => {}
                        Err(ChunkReadError::Io(e)) => return Err(io_error("cannot write a fetched chunk", e)),
                        Err(first) => {
                            tracing::warn!(
                                "chunk {} failed verification ({first:?}); fetching it again",
                                wanted.hash()
                            );
                            stats.chunks_refetched += 1;
                            let again = ask(std::slice::from_ref(wanted))?;
                            stats.bytes_fetched += again[0].len() as u64;
                            put(&again[0], &mut decompressor)
                                .map_err(|e| chunk_error(e, &wanted.chunk, b"(fetched twice)"))?;
                        }
                    }
                }
            }
            self.write_manifest(id, manifest_bytes)
        })();
        // On failure the marker stays: the next sweep removes what was written.
        if result.is_ok()
            && let Some(name) = marker.take()
        {
            let _ = self.chunks.tmp().remove_file(name);
        }
        result.map(|()| stats)
    }
}
