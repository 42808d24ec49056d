//! The filesystem-snapshot manifest: what a snapshot of a directory tree contains, and its
//! on-disk format.
//!
//! # Byte layout
//!
//! ```text
//!  offset  size  field
//! +------+------+--------------------------------------------------------------+
//! |    0 |    8 | magic: b"STASISFM" (Stasis FileSystem Manifest)              |
//! |    8 |    2 | format version, major (u16, little-endian)                   |
//! |   10 |    2 | format version, minor (u16, little-endian)                   |
//! |   12 |    8 | body length N in bytes (u64, little-endian), <= MAX_BODY_LEN |
//! |   20 |   32 | blake3 hash of the body                                      |
//! +------+------+--------------------------------------------------------------+
//! |   52 |    N | body: bincode 2 (standard config: little-endian, varints)    |
//! |      |      |   created, capture start (ns since the Unix epoch)           |
//! |      |      |   source label, chunk size, root directory mode + mtime      |
//! |      |      |   entries: path bytes, kind (dir / file: size + chunk list / |
//! |      |      |            symlink: target bytes), mode, mtime, ctime, inode |
//! |      |      |   warnings, stored bytes added by this snapshot              |
//! +------+------+--------------------------------------------------------------+
//! ```
//! Nothing may follow the body.
//!
//! Unlike Firecracker's snapshot magic, ours is not tied to the CPU architecture: a manifest
//! describes files, not machine state, and bincode's standard configuration fixes the byte
//! order, so a manifest written on x86-64 restores on aarch64.
//!
//! # Version rule
//!
//! A reader accepts a manifest whose **major** version equals its own and whose **minor**
//! version is not newer than its own ([`check_version`]). A minor bump may only add things an
//! older reader of the same major never needs to see (e.g. a new trailing field it ignores is
//! *not* allowed, because bincode has no field tags: a reader refuses data it cannot account
//! for). Any change an older reader would misread is a major bump.
//!
//! # Decoding order
//!
//! Length of the input, magic, version, body length (checked against [`MAX_BODY_LEN`] and
//! against the bytes actually present, before anything is allocated for it), then the checksum
//! over the body, and only then is a single body field parsed. Every path and chunk list is
//! then validated ([`ManifestParts::validate`]): a crafted or corrupted manifest is an
//! [`ManifestError`], never a panic, an allocation bomb or a path outside the restore target.
//!
//! The body is encoded through private "wire" types whose byte strings are serde sequences:
//! serde caps what a sequence may preallocate, so a length field that lies costs at most one
//! step of growth before the input runs out.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first 8 bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"STASISFM";
/// The format version this build writes, and the newest it reads.
pub const VERSION: Version = Version { major: 1, minor: 0 };
/// Bytes before the body.
pub const HEADER_LEN: usize = 52;
/// The largest body a reader accepts (about 4 million entries).
pub const MAX_BODY_LEN: u64 = 512 << 20;
/// Smallest and largest chunk size a manifest may declare.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Longest path (in bytes) and longest single name Linux accepts.
pub const MAX_PATH_LEN: usize = 4095;
pub const MAX_NAME_LEN: usize = 255;

/// A format version, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version rule: same major, minor not newer than `ours`.
pub fn check_version(found: Version, ours: Version) -> Result<(), ManifestError> {
    if found.major != ours.major {
        return Err(ManifestError::DifferentMajor { found, ours });
    }
    if found.minor > ours.minor {
        return Err(ManifestError::NewerMinor { found, ours });
    }
    Ok(())
}

/// Everything that can be wrong with a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is too short: {len} bytes, but the header alone is {HEADER_LEN}")]
    TooShort { len: u64 },
    #[error("not a Stasis filesystem manifest: the first 8 bytes are {found:02x?}, expected \"STASISFM\"")]
    BadMagic { found: [u8; 8] },
    #[error("manifest format {found} is newer than this build of Stasis understands ({ours}); upgrade Stasis")]
    NewerMinor { found: Version, ours: Version },
    #[error("manifest format {found} has a different major version than this build of Stasis ({ours})")]
    DifferentMajor { found: Version, ours: Version },
    #[error("manifest body length {len} exceeds the limit of {max} bytes")]
    BodyTooLarge { len: u64, max: u64 },
    #[error("manifest is truncated: the header announces a {expected}-byte body, only {found} bytes follow")]
    Truncated { expected: u64, found: u64 },
    #[error("manifest has {extra} unexpected byte(s) after its body")]
    TrailingData { extra: u64 },
    #[error("manifest checksum mismatch: the header says {expected}, the body hashes to {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("manifest body cannot be decoded: {0}")]
    Decode(String),
    #[error("manifest entry {index} `{path}`: {reason}")]
    InvalidEntry { index: usize, path: String, reason: String },
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("cannot read the manifest: {0}")]
    Io(#[from] std::io::Error),
}

/// The blake3 hash of a chunk's raw (uncompressed) bytes: its address in the chunk store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(ChunkHash(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Lowercase hex only: ids and chunk names have exactly one spelling.
pub(crate) fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// One fixed-size piece of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// All zero bytes: not stored at all, restored as a hole.
    Zero,
    /// Stored uncompressed (compression did not help): the chunk file is the raw bytes.
    Raw(ChunkHash),
    /// Stored as one zstd frame of `stored_len` bytes (always fewer than the raw length).
    Zstd { hash: ChunkHash, stored_len: u32 },
}

impl Chunk {
    pub fn hash(&self) -> Option<ChunkHash> {
        match self {
            Chunk::Zero => None,
            Chunk::Raw(h) | Chunk::Zstd { hash: h, .. } => Some(*h),
        }
    }

    /// Length of the chunk file for a chunk of `logical_len` raw bytes (0: none is stored).
    pub fn stored_len(&self, logical_len: u64) -> u64 {
        match self {
            Chunk::Zero => 0,
            Chunk::Raw(_) => logical_len,
            Chunk::Zstd { stored_len, .. } => u64::from(*stored_len),
        }
    }
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// `chunks[i]` holds bytes `i * chunk_size .. min(size, (i + 1) * chunk_size)`.
    File {
        size: u64,
        chunks: Vec<Chunk>,
    },
    /// The link's target, byte for byte; never followed.
    Symlink {
        target: Vec<u8>,
    },
}

/// One directory, file or symlink below the snapshot's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the root, components separated by `/`, raw bytes (Unix names need not be
    /// UTF-8). Never empty, absolute, `.`, `..` or containing NUL.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most); symlinks carry what `lstat` said.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Status-change time and inode number at capture, used only to decide whether the next
    /// incremental capture may reuse this entry's chunks without reading the file (0 where
    /// unknown, e.g. after a tar import, which forces a read).
    pub ctime_ns: i64,
    pub inode: u64,
}

impl Entry {
    /// The path for messages (lossy UTF-8, control characters escaped).
    pub fn display_path(&self) -> String {
        display_bytes(&self.path)
    }
}

pub(crate) fn display_bytes(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// The contents of a manifest, all fields public: for building one by hand (tests, importers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestParts {
    /// When the snapshot was committed (ns since the Unix epoch).
    pub created_unix_ns: i64,
    /// When its capture started: the reference point of the "racy clean" rule.
    pub capture_started_unix_ns: i64,
    /// Where it came from, e.g. the captured directory's path.
    pub source: String,
    pub chunk_size: u32,
    pub root_mode: u32,
    pub root_mtime_ns: i64,
    /// Every entry, each after its parent directory.
    pub entries: Vec<Entry>,
    /// What the capture skipped or noticed (special files, files that vanished).
    pub warnings: Vec<String>,
    /// Bytes of chunk files this snapshot's capture added to the store.
    pub stored_bytes_new: u64,
}

/// Where a [`Manifest`] value came from: decides whether a capture may trust it as a parent
/// without checking that its chunks still exist (see `FsSnapshotStore::capture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Decoded from bytes, built by hand, or cloned: nothing is known.
    Detached,
    /// Read from (or committed to) the store with this nonce under this id.
    Committed { store: u64, id: [u8; 33] },
    /// Owned by a live pending capture of the store with this nonce.
    Pending { store: u64 },
}

/// A decoded, validated manifest.
#[derive(Debug)]
pub struct Manifest {
    parts: ManifestParts,
    pub(crate) origin: Origin,
    /// For a pending capture's manifest: its crash marker, which a capture using it as parent
    /// shares instead of creating (and fsyncing) its own.
    pub(crate) marker: Option<std::sync::Arc<str>>,
}

impl Clone for Manifest {
    /// A clone is detached: it no longer proves that its chunks are held by the store.
    fn clone(&self) -> Self {
        Manifest { parts: self.parts.clone(), origin: Origin::Detached, marker: None }
    }
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}

impl Manifest {
    /// Validates `parts` ([`ManifestParts::validate`]) and wraps them.
    pub fn from_parts(parts: ManifestParts) -> Result<Self, ManifestError> {
        parts.validate()?;
        Ok(Manifest { parts, origin: Origin::Detached, marker: None })
    }

    pub(crate) fn new_unchecked(parts: ManifestParts, origin: Origin) -> Self {
        Manifest { parts, origin, marker: None }
    }

    pub fn parts(&self) -> &ManifestParts {
        &self.parts
    }

    pub fn into_parts(self) -> ManifestParts {
        self.parts
    }

    pub(crate) fn parts_mut(&mut self) -> &mut ManifestParts {
        &mut self.parts
    }

    pub fn entries(&self) -> &[Entry] {
        &self.parts.entries
    }

    pub fn source(&self) -> &str {
        &self.parts.source
    }

    pub fn warnings(&self) -> &[String] {
        &self.parts.warnings
    }

    pub fn created(&self) -> SystemTime {
        time_from_ns(self.parts.created_unix_ns)
    }

    pub fn capture_started(&self) -> SystemTime {
        time_from_ns(self.parts.capture_started_unix_ns)
    }

    /// Sum of file sizes.
    pub fn logical_bytes(&self) -> u64 {
        self.parts.logical_bytes()
    }

    /// Header + body, ready to be written to a file.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(&self.parts)
    }

    /// Decodes and validates a whole manifest held in memory.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::TooShort { len: bytes.len() as u64 });
        }
        let header = parse_header(bytes[..HEADER_LEN].try_into().expect("HEADER_LEN bytes"))?;
        let rest = &bytes[HEADER_LEN..];
        if (rest.len() as u64) < header.body_len {
            return Err(ManifestError::Truncated { expected: header.body_len, found: rest.len() as u64 });
        }
        if rest.len() as u64 > header.body_len {
            return Err(ManifestError::TrailingData { extra: rest.len() as u64 - header.body_len });
        }
        decode_body(&header, rest)
    }

    /// Reads a whole manifest from `reader`, never allocating more than the bytes that are
    /// actually there (a length field that lies cannot make it allocate).
    pub fn read_from(reader: impl Read) -> Result<Self, ManifestError> {
        let mut reader = reader;
        let mut head = [0u8; HEADER_LEN];
        let got = read_full(&mut reader, &mut head)?;
        if got < HEADER_LEN {
            return Err(ManifestError::TooShort { len: got as u64 });
        }
        let header = parse_header(&head)?;
        // Grows as bytes arrive; the initial reservation is capped.
        let mut body = Vec::with_capacity(header.body_len.min(1 << 20) as usize);
        (&mut reader).take(header.body_len).read_to_end(&mut body)?;
        if (body.len() as u64) < header.body_len {
            return Err(ManifestError::Truncated { expected: header.body_len, found: body.len() as u64 });
        }
        let mut extra = [0u8; 4096];
        let mut trailing = 0u64;
        loop {
            let n = match reader.read(&mut extra) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            trailing += n as u64;
            if trailing >= 1 << 20 {
                break;
            }
        }
        if trailing > 0 {
            return Err(ManifestError::TrailingData { extra: trailing });
        }
        decode_body(&header, &body)
    }
}

impl ManifestParts {
    /// Encodes these parts as they are, without validating them (decoding validates). For
    /// tools and tests that need to produce a manifest file, valid or deliberately not.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(self)
    }

    /// Sum of file sizes (saturating: validated manifests cannot overflow).
    pub fn logical_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .fold(0u64, |a, b| a.saturating_add(b))
    }

    /// Checks everything restore relies on: every path relative and normal (no `..`, `.`,
    /// empty or absolute components, no NUL, within Linux's length limits), no duplicates,
    /// every entry's parent a directory entry that comes earlier (so nothing is ever written
    /// through a symlink), chunk lists that match the sizes, modes within `0o7777`.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !self.chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::Invalid(format!(
                "chunk size {} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.root_mode > 0o7777 {
            return Err(ManifestError::Invalid(format!("root mode {:o} has bits above 0o7777", self.root_mode)));
        }
        let chunk_size = u64::from(self.chunk_size);
        // path -> is a directory
        let mut seen: HashMap<&[u8], bool> = HashMap::with_capacity(self.entries.len());
        let mut total: u64 = 0;
        for (index, entry) in self.entries.iter().enumerate() {
            let bad = |reason: String| ManifestError::InvalidEntry { index, path: entry.display_path(), reason };
            check_path(&entry.path).map_err(|r| bad(r.to_string()))?;
            if entry.mode > 0o7777 {
                return Err(bad(format!("mode {:o} has bits above 0o7777", entry.mode)));
            }
            if let Some(slash) = entry.path.iter().rposition(|&b| b == b'/') {
                match seen.get(&entry.path[..slash]) {
                    Some(true) => {}
                    Some(false) => return Err(bad("its parent is not a directory".into())),
                    None => return Err(bad("its parent directory is not an earlier entry".into())),
                }
            }
            match &entry.kind {
                EntryKind::Dir => {}
                EntryKind::File { size, chunks } => {
                    total = total.checked_add(*size).ok_or_else(|| bad("file sizes overflow 64 bits".into()))?;
                    let expected = size.div_ceil(chunk_size);
                    if chunks.len() as u64 != expected {
                        return Err(bad(format!(
                            "{} chunk(s) for {size} bytes, expected {expected} of {chunk_size} bytes",
                            chunks.len()
                        )));
                    }
                    for (i, chunk) in chunks.iter().enumerate() {
                        if let Chunk::Zstd { stored_len, .. } = chunk {
                            let logical = (size - i as u64 * chunk_size).min(chunk_size);
                            if *stored_len == 0 || u64::from(*stored_len) >= logical {
                                return Err(bad(format!(
                                    "chunk {i} is compressed to {stored_len} bytes, not between 1 and its {logical} raw bytes"
                                )));
                            }
                        }
                    }
                }
                EntryKind::Symlink { target } => {
                    if target.is_empty() {
                        return Err(bad("symlink with an empty target".into()));
                    }
                    if target.len() > MAX_PATH_LEN {
                        return Err(bad(format!("symlink target of {} bytes is too long", target.len())));
                    }
                    if target.contains(&0) {
                        return Err(bad("symlink target contains a NUL byte".into()));
                    }
                }
            }
            if seen.insert(&entry.path, matches!(entry.kind, EntryKind::Dir)).is_some() {
                return Err(bad("duplicate path".into()));
            }
        }
        Ok(())
    }
}

/// Why a path is not a normal relative path.
pub(crate) fn check_path(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.len() > MAX_PATH_LEN {
        return Err("path longer than 4095 bytes");
    }
    if path[0] == b'/' {
        return Err("absolute path");
    }
    if path.contains(&0) {
        return Err("path contains a NUL byte");
    }
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" => return Err("empty path component (`//` or a trailing `/`)"),
            b"." => return Err("`.` path component"),
            b".." => return Err("`..` path component"),
            c if c.len() > MAX_NAME_LEN => return Err("path component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn time_from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

pub(crate) fn ns_from_time(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map(|n| -n).unwrap_or(i64::MIN),
    }
}

struct Header {
    body_len: u64,
    checksum: [u8; 32],
}

fn parse_header(head: &[u8; HEADER_LEN]) -> Result<Header, ManifestError> {
    let magic: [u8; 8] = head[0..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(ManifestError::BadMagic { found: magic });
    }
    let found =
        Version { major: u16::from_le_bytes([head[8], head[9]]), minor: u16::from_le_bytes([head[10], head[11]]) };
    check_version(found, VERSION)?;
    let body_len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    if body_len > MAX_BODY_LEN {
        return Err(ManifestError::BodyTooLarge { len: body_len, max: MAX_BODY_LEN });
    }
    Ok(Header { body_len, checksum: head[20..52].try_into().expect("32 bytes") })
}

fn decode_body(header: &Header, body: &[u8]) -> Result<Manifest, ManifestError> {
    let actual = blake3::hash(body);
    if actual.as_bytes() != &header.checksum {
        return Err(ManifestError::ChecksumMismatch {
            expected: hex(&header.checksum),
            actual: actual.to_hex().to_string(),
        });
    }
    let (wire, used): (WireBody, usize) =
        bincode::serde::decode_from_slice(body, bincode_config()).map_err(|e| ManifestError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ManifestError::Decode(format!("{} byte(s) left over after the body", body.len() - used)));
    }
    let parts = wire.into_parts()?;
    parts.validate()?;
    Ok(Manifest { parts, origin: Origin::Detached, marker: None })
}

fn encode_parts(parts: &ManifestParts) -> Vec<u8> {
    let wire = WireBody::from_parts(parts);
    let body = bincode::serde::encode_to_vec(&wire, bincode_config()).expect("encoding to memory cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.major.to_le_bytes());
    out.extend_from_slice(&VERSION.minor.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

fn bincode_config() -> impl bincode::config::Config {
    // The limit is a second fence: the wire types never ask bincode itself to allocate.
    bincode::config::standard().with_limit::<{ MAX_BODY_LEN as usize }>()
}

/// Fills `buf` as far as the reader goes; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

// ---- wire types: the body exactly as bincode sees it --------------------------------------
// Byte strings are `Vec<u8>` (a serde sequence, whose preallocation serde caps) rather than
// `String` or serde_bytes, which bincode would allocate at the claimed length up front.

#[derive(Serialize, Deserialize)]
struct WireBody {
    created_unix_ns: i64,
    capture_started_unix_ns: i64,
    source: Vec<u8>,
    chunk_size: u32,
    root_mode: u32,
    root_mtime_ns: i64,
    entries: Vec<WireEntry>,
    warnings: Vec<Vec<u8>>,
    stored_bytes_new: u64,
}

#[derive(Serialize, Deserialize)]
struct WireEntry {
    path: Vec<u8>,
    kind: WireKind,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
}

#[derive(Serialize, Deserialize)]
enum WireKind {
    Dir,
    File { size: u64, chunks: Vec<WireChunk> },
    Symlink { target: Vec<u8> },
}

#[derive(Serialize, Deserialize)]
enum WireChunk {
    Zero,
    Raw([u8; 32]),
    Zstd([u8; 32], u32),
}

impl WireBody {
    fn from_parts(p: &ManifestParts) -> Self {
        WireBody {
            created_unix_ns: p.created_unix_ns,
            capture_started_unix_ns: p.capture_started_unix_ns,
            source: p.source.as_bytes().to_vec(),
            chunk_size: p.chunk_size,
            root_mode: p.root_mode,
            root_mtime_ns: p.root_mtime_ns,
            entries: p
                .entries
                .iter()
                .map(|e| WireEntry {
                    path: e.path.clone(),
                    kind: match &e.kind {
                        EntryKind::Dir => WireKind::Dir,
                        EntryKind::File { size, chunks } => WireKind::File {
                            size: *size,
                            chunks: chunks
                                .iter()
                                .map(|c| match c {
                                    Chunk::Zero => WireChunk::Zero,
                                    Chunk::Raw(h) => WireChunk::Raw(h.0),
                                    Chunk::Zstd { hash, stored_len } => WireChunk::Zstd(hash.0, *stored_len),
                                })
                                .collect(),
                        },
                        EntryKind::Symlink { target } => WireKind::Symlink { target: target.clone() },
                    },
                    mode: e.mode,
                    mtime_ns: e.mtime_ns,
                    ctime_ns: e.ctime_ns,
                    inode: e.inode,
                })
                .collect(),
            warnings: p.warnings.iter().map(|w| w.as_bytes().to_vec()).collect(),
            stored_bytes_new: p.stored_bytes_new,
        }
    }

    fn into_parts(self) -> Result<ManifestParts, ManifestError> {
        let utf8 = |bytes: Vec<u8>, what: &str| {
            String::from_utf8(bytes).map_err(|_| ManifestError::Invalid(format!("{what} is not UTF-8")))
        };
        Ok(ManifestParts {
            created_unix_ns: self.created_unix_ns,
            capture_started_unix_ns: self.capture_started_unix_ns,
            source: utf8(self.source, "the source label")?,
            chunk_size: self.chunk_size,
            root_mode: self.root_mode,
            root_mtime_ns: self.root_mtime_ns,
            entries: self
                .entries
                .into_iter()
                .map(|e| Entry {
                    path: e.path,
                    kind: match e.kind {
                        WireKind::Dir => EntryKind::Dir,
                        WireKind::File { size, chunks } => EntryKind::File {
                            size,
                            chunks: chunks
                                .into_iter()
                                .map(|c| match c {
                                    WireChunk::Zero => Chunk::Zero,
                                    WireChunk::Raw(h) => Chunk::Raw(ChunkHash(h)),
                                    WireChunk::Zstd(h, stored_len) => Chunk::Zstd { hash: ChunkHash(h), stored_len },
                                })
                                .collect(),
                        },
                        WireKind::Symlink { target } => EntryKind::Symlink { target },
                    },
                    mode: e.mode,
                    mtime_ns: e.mtime_ns,
                    ctime_ns: e.ctime_ns,
                    inode: e.inode,
                })
                .collect(),
            warnings: self.warnings.into_iter().map(|w| utf8(w, "a warning")).collect::<Result<_, _>>()?,
            stored_bytes_new: self.stored_bytes_new,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ManifestParts {
        let h = ChunkHash::of(b"hello");
        ManifestParts {
            created_unix_ns: 1_700_000_000_123_456_789,
            capture_started_unix_ns: 1_700_000_000_000_000_000,
            source: "/srv/sandbox".into(),
            chunk_size: 1 << 20,
            root_mode: 0o755,
            root_mtime_ns: 42,
            entries: vec![
                Entry { path: b"dir".to_vec(), kind: EntryKind::Dir, mode: 0o700, mtime_ns: 1, ctime_ns: 2, inode: 3 },
                Entry {
                    path: b"dir/f\nwith newline \xff".to_vec(),
                    kind: EntryKind::File { size: 5, chunks: vec![Chunk::Raw(h)] },
                    mode: 0o644,
                    mtime_ns: -5,
                    ctime_ns: 6,
                    inode: 7,
                },
                Entry {
                    path: b"big".to_vec(),
                    kind: EntryKind::File {
                        size: (2 << 20) + 1,
                        chunks: vec![Chunk::Zero, Chunk::Zstd { hash: h, stored_len: 100 }, Chunk::Zero],
                    },
                    mode: 0o600,
                    mtime_ns: 8,
                    ctime_ns: 9,
                    inode: 10,
                },
                Entry {
                    path: b"link".to_vec(),
                    kind: EntryKind::Symlink { target: b"../../etc/passwd".to_vec() },
                    mode: 0o777,
                    mtime_ns: 11,
                    ctime_ns: 12,
                    inode: 13,
                },
            ],
            warnings: vec!["skipped fifo `p`".into()],
            stored_bytes_new: 1234,
        }
    }

    fn encoded() -> Vec<u8> {
        Manifest::from_parts(sample()).unwrap().encode()
    }

    /// Re-seals a body edited in place so that only the intended defect remains.
    fn reseal(bytes: &mut [u8]) {
        let sum = blake3::hash(&bytes[HEADER_LEN..]);
        bytes[20..52].copy_from_slice(sum.as_bytes());
    }

    #[test]
    fn round_trip_through_bytes_and_reader() {
        let bytes = encoded();
        assert_eq!(&bytes[..8], b"STASISFM");
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m.parts(), &sample());
        let m2 = Manifest::read_from(&bytes[..]).unwrap();
        assert_eq!(m2.parts(), &sample());
        assert_eq!(m.logical_bytes(), 5 + (2 << 20) + 1);
    }

    #[test]
    fn too_short() {
        let bytes = encoded();
        for len in [0, 1, 8, HEADER_LEN - 1] {
            assert!(
                matches!(Manifest::decode(&bytes[..len]), Err(ManifestError::TooShort { len: l }) if l == len as u64)
            );
            assert!(matches!(Manifest::read_from(&bytes[..len]), Err(ManifestError::TooShort { .. })));
        }
    }

    #[test]
    fn wrong_magic() {
        let mut bytes = encoded();
        bytes[0] = b'X';
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(matches!(err, ManifestError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not a Stasis filesystem manifest"));
    }

    #[test]
    fn wrong_checksum() {
        let mut bytes = encoded();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::ChecksumMismatch { .. })));
        let mut bytes = encoded();
        bytes[25] ^= 0xff; // in the stored checksum itself
        assert!(matches!(Manifest::read_from(&bytes[..]), Err(ManifestError::ChecksumMismatch { .. })));
    }

    #[test]
    fn version_rule() {
        let v = |major, minor| Version { major, minor };
        // Same major, minor not newer than ours: accepted.
        assert!(check_version(v(1, 0), v(1, 0)).is_ok());
        assert!(check_version(v(1, 2), v(1, 3)).is_ok());
        assert!(check_version(v(1, 0), v(1, 3)).is_ok());
        // Newer minor, or any other major: refused, with the right variant.
        assert!(matches!(check_version(v(1, 4), v(1, 3)), Err(ManifestError::NewerMinor { .. })));
        assert!(matches!(check_version(v(2, 0), v(1, 3)), Err(ManifestError::DifferentMajor { .. })));
        assert!(matches!(check_version(v(0, 9), v(1, 3)), Err(ManifestError::DifferentMajor { .. })));
    }

    #[test]
    fn newer_minor_version() {
        let mut bytes = encoded();
        bytes[10..12].copy_from_slice(&(VERSION.minor + 1).to_le_bytes());
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(matches!(err, ManifestError::NewerMinor { .. }), "{err}");
        assert!(err.to_string().contains("upgrade Stasis"), "{err}");
    }

    #[test]
    fn different_major_version() {
        for major in [VERSION.major + 1, VERSION.major - 1] {
            let mut bytes = encoded();
            bytes[8..10].copy_from_slice(&major.to_le_bytes());
            assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::DifferentMajor { .. })));
        }
    }

    #[test]
    fn truncated_body() {
        let bytes = encoded();
        for cut in [HEADER_LEN, HEADER_LEN + 1, bytes.len() - 1] {
            let err = Manifest::decode(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, ManifestError::Truncated { .. }), "{err}");
            let err = Manifest::read_from(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, ManifestError::Truncated { .. }), "{err}");
        }
    }

    #[test]
    fn trailing_data() {
        let mut bytes = encoded();
        bytes.push(0);
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::TrailingData { extra: 1 })));
        assert!(matches!(Manifest::read_from(&bytes[..]), Err(ManifestError::TrailingData { extra: 1 })));
    }

    #[test]
    fn body_length_bomb_is_refused_without_allocating() {
        let mut bytes = encoded();
        bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::BodyTooLarge { .. })));
        // Within the limit but far beyond the input: truncated, read incrementally.
        bytes[12..20].copy_from_slice(&(MAX_BODY_LEN).to_le_bytes());
        assert!(matches!(Manifest::read_from(&bytes[..]), Err(ManifestError::Truncated { .. })));
    }

    #[test]
    fn lying_length_inside_the_body_is_a_decode_error() {
        // A body whose first sequence claims 2^60 entries, correctly checksummed: the decoder
        // must fail on the missing bytes, not try to reserve room for them.
        let mut body = Vec::new();
        for v in [1u8, 1, 0] {
            body.push(v); // created, capture start, empty source (varints)
        }
        body.extend_from_slice(&[0xfc, 0, 0, 16, 0]); // chunk size 1 MiB as a u32 varint
        body.extend_from_slice(&[0xfb, 0xed, 1]); // root mode 0o755 (u32 varint)
        body.push(0); // root mtime
        body.push(0xfd); // entries length: u64 varint...
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.major.to_le_bytes());
        bytes.extend_from_slice(&VERSION.minor.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(blake3::hash(&body).as_bytes());
        bytes.extend_from_slice(&body);
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::Decode(_))));
    }

    #[test]
    fn garbage_body_with_valid_checksum_is_a_decode_error() {
        let mut bytes = encoded();
        for b in &mut bytes[HEADER_LEN..] {
            *b = 0xff;
        }
        reseal(&mut bytes);
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::Decode(_))));
    }

    #[test]
    fn every_prefix_and_every_bit_flip_is_an_error_never_a_panic() {
        let bytes = encoded();
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Manifest::decode(&b).is_err(), "flip at {i} accepted");
            reseal(&mut b); // and with the checksum fixed up, it must still never panic
            let _ = Manifest::decode(&b);
        }
    }

    struct FailingReader {
        good: Vec<u8>,
        at: usize,
    }
    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at >= self.good.len() {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.good.len() - self.at).min(7);
            buf[..n].copy_from_slice(&self.good[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn reader_that_fails() {
        let bytes = encoded();
        for cut in [0, 10, HEADER_LEN + 3] {
            let err = Manifest::read_from(FailingReader { good: bytes[..cut].to_vec(), at: 0 }).unwrap_err();
            assert!(matches!(&err, ManifestError::Io(e) if e.to_string() == "disk on fire"), "{err}");
        }
    }

    fn invalid(mut f: impl FnMut(&mut ManifestParts)) -> String {
        let mut p = sample();
        f(&mut p);
        let err = Manifest::from_parts(p.clone()).unwrap_err().to_string();
        // The same defect sealed into bytes is refused by the decoder too.
        let bytes = encode_parts(&p);
        assert_eq!(Manifest::decode(&bytes).unwrap_err().to_string(), err);
        err
    }

    #[test]
    fn invalid_paths_are_refused() {
        for (path, why) in [
            (&b"../x"[..], "`..`"),
            (b"dir/../../x", "`..`"),
            (b"/etc/passwd", "absolute"),
            (b"./x", "`.`"),
            (b"dir//x", "empty path component"),
            (b"dir/", "empty path component"),
            (b"", "empty path"),
            (b"a\0b", "NUL"),
        ] {
            let err = invalid(|p| p.entries[1].path = path.to_vec());
            assert!(err.contains(why), "{path:?}: {err}");
        }
    }

    #[test]
    fn structure_errors_are_refused() {
        let err = invalid(|p| p.entries[2].path = b"dir".to_vec());
        assert!(err.contains("duplicate path"), "{err}");
        let err = invalid(|p| p.entries.swap(0, 1));
        assert!(err.contains("parent directory is not an earlier entry"), "{err}");
        // A file under a symlink: restoring it would write through the link.
        let err = invalid(|p| {
            p.entries.push(Entry { path: b"link/evil".to_vec(), ..p.entries[1].clone() });
        });
        assert!(err.contains("parent is not a directory"), "{err}");
        let err = invalid(|p| p.entries[1].kind = EntryKind::File { size: 5, chunks: vec![] });
        assert!(err.contains("expected 1"), "{err}");
        let err = invalid(|p| p.entries[0].mode = 0o10000);
        assert!(err.contains("mode"), "{err}");
        let err = invalid(|p| p.entries[3].kind = EntryKind::Symlink { target: vec![] });
        assert!(err.contains("empty target"), "{err}");
        let err = invalid(|p| p.chunk_size = 1000);
        assert!(err.contains("chunk size"), "{err}");
        let err = invalid(|p| {
            p.entries[2].kind =
                EntryKind::File { size: 10, chunks: vec![Chunk::Zstd { hash: ChunkHash([0; 32]), stored_len: 10 }] }
        });
        assert!(err.contains("compressed"), "{err}");
    }

    #[test]
    fn chunk_hash_hex_round_trips() {
        let h = ChunkHash::of(b"x");
        assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ChunkHash::from_hex(&h.to_hex().to_uppercase()), None);
        assert_eq!(ChunkHash::from_hex("00"), None);
    }

    #[test]
    fn times_convert_both_ways() {
        for ns in [0, 1, -1, 1_700_000_000_123_456_789, -10_000_000_005] {
            assert_eq!(ns_from_time(time_from_ns(ns)), ns);
        }
    }
}
