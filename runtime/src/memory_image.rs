//! The memory-snapshot image: every process of a sandbox, frozen, in one file.
//!
//! # Byte layout
//!
//! ```text
//!  offset  size  field
//! +------+------+---------------------------------------------------------------+
//! |    0 |    8 | magic: b"STASISMI" (Stasis Memory Image)                      |
//! |    8 |    2 | format version, major (u16, little-endian)                    |
//! |   10 |    2 | format version, minor (u16, little-endian)                    |
//! |   12 |    8 | header length H (u64, little-endian), <= MAX_HEADER_LEN       |
//! |   20 |   32 | blake3 of the version (4 bytes, from 1.1) and the header      |
//! +------+------+---------------------------------------------------------------+
//! |   52 |    H | header: bincode 2 (standard config) of [`ImageHeader`]:       |
//! |      |      |   engine fingerprint, creation time, filesystem snapshot id,  |
//! |      |      |   processes (program hash, argv, env, exit status or the      |
//! |      |      |   instance: memory page runs, globals, tables, descriptors,   |
//! |      |      |   clock), and the table of parts                              |
//! +------+------+---------------------------------------------------------------+
//! | 52+H |  ... | parts, back to back: one per memory, its non-zero 4 KiB pages |
//! |      |      | in run order as zstd frames (one per core for large parts,    |
//! |      |      | concatenated); each part's offset, length,                    |
//! |      |      | decompressed length and blake3 are in the header              |
//! +------+------+---------------------------------------------------------------+
//! ```
//! Nothing may follow the last part. Programs are not in the image: each process names
//! its program by blake3 hash, and the module store keeps each program once.
//!
//! # Version rule
//! As the filesystem manifest's: same major, minor not newer than this build's.
//!
//! # Decoding
//! Magic, version, header length (bounded, and checked against the bytes present), the
//! header's checksum, then the header is parsed with a bincode allocation limit and
//! validated as a whole ([`ImageHeader::validate`]): page runs sorted, inside their memory
//! and covering exactly their part's decompressed length; parts inside the file, not
//! overlapping, each covered by a checksum that is verified before it is decompressed
//! (into a buffer of the declared size, never more, and a size zstd could not reach from the
//! part's length is refused first). A crafted image is an error, never a panic, an
//! out-of-bounds write or an allocation out of proportion to the file.

pub use crate::component_handles::{DescriptorRecipe, HandleImage, OpenAt, Recipe};
use crate::wasi_state::FdTableImage;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

pub const MAGIC: [u8; 8] = *b"STASISMI";
pub const VERSION: (u16, u16) = (1, 4);
pub const PREFIX_LEN: usize = 52;
/// Largest header accepted: descriptors, globals and run lists of many processes fit in a
/// fraction of this.
pub const MAX_HEADER_LEN: u64 = 64 << 20;
/// Granularity of the non-zero page map.
pub const IMAGE_PAGE: u64 = 4096;
/// Largest memory an image may describe (a 64-bit memory could claim more).
pub const MAX_MEMORY_BYTES: u64 = 16 << 30;
/// Largest table an image may describe.
pub const MAX_TABLE_ELEMENTS: u64 = 10_000_000;
/// Most a zstd frame can expand: an RLE block turns 4 bytes into at most 128 KiB. A part
/// claiming more than this many times its length is corrupt; decompressing one therefore
/// never reserves more than this many times the bytes present.
pub const MAX_ZSTD_RATIO: u64 = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageHeader {
    /// The engine configuration the image was taken with: compiled code and the instance
    /// layout depend on it.
    pub engine: String,
    pub created_unix_ms: u64,
    /// The filesystem snapshot holding the sandbox tree, if the sandbox has one.
    pub fs_snapshot: Option<String>,
    pub processes: Vec<ProcessImage>,
    pub parts: Vec<PartInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessImage {
    pub pid: u64,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// blake3 of the program's original bytes (its name in the module store).
    pub program: [u8; 32],
    pub program_name: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub state: ProcessStateImage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "wire::ProcessState", into = "wire::ProcessState")]
pub enum ProcessStateImage {
    /// Ended: kept for its status and output.
    Exited(ExitRecord),
    /// A live instance with no frames on its stack (a reactor between calls).
    Idle(InstanceImage),
    /// A reactor component between calls: every core instance inside it, in the order
    /// `Store::debug_all_instances` lists them.
    IdleComponent(ComponentImage),
    /// A command stopped mid-run by the unwind transform (format 1.1): its frames are in
    /// the transform's stack memory, part of the instance.
    Suspended(SuspendedImage),
    /// A reactor component between calls, run checkpointable (format 1.4): its memories
    /// hold everything, its modules' globals pushed onto the unwind stack
    /// (`component_checkpoint`).
    IdleComponentMemories(ComponentMemoriesImage),
}

/// An idle checkpointable component (see [`ProcessStateImage::IdleComponentMemories`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentMemoriesImage {
    /// Every linear memory, in the order its instantiation creates them.
    pub memories: Vec<MemoryImage>,
    /// Bytes each memory grew by while it was instantiated (see
    /// [`SuspendedImage::instantiation_growth`]).
    pub instantiation_growth: Vec<u64>,
    /// The host resources it holds, by resource-table slot.
    pub handles: Vec<HandleImage>,
    pub monotonic_ns: u64,
}

/// A running command, unwound (see `checkpoint`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuspendedImage {
    pub instance: InstanceImage,
    /// Deadlines (monotonic ns) of the sleep it was in, per `poll_oneoff` subscription.
    pub sleep_deadlines: Vec<u64>,
    /// Stdin written but not yet read, and whether it was closed.
    pub stdin: Vec<u8>,
    pub stdin_closed: bool,
    /// A standalone image carries the program itself in this part (otherwise the module
    /// store has it).
    pub program_part: Option<u32>,
    /// `(host directory, guest path)` the process had (standalone images).
    pub preopens: Vec<(String, String)>,
    /// A component's host resources, by resource-table slot (format 1.3; a core
    /// module's descriptors are in `instance.fds`). Its memories are in `instance`, in the
    /// order its instantiation creates them; it has no globals or tables there (its
    /// modules keep their globals on the unwind stack).
    pub handles: Vec<HandleImage>,
    /// A component's: bytes each memory grew by while it was instantiated (start code,
    /// such as the preview1 adapter's stack allocation, grows memories; a restore makes
    /// each memory that much smaller, so that it has its captured size once started).
    pub instantiation_growth: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentImage {
    pub instances: Vec<CoreStateImage>,
    pub monotonic_ns: u64,
    /// The host resources it holds (format 1.2), by resource-table slot.
    pub handles: Vec<HandleImage>,
}

/// How process states are encoded: 1.1 images have components without handles, under
/// the variant index `IdleComponent` had then; 1.2 adds a variant at the end; 1.3 adds
/// suspended components (with handles) at the end, core modules keep the 1.1 record; 1.4
/// adds idle checkpointable components at the end.
mod wire {
    use super::*;

    /// A suspended process as 1.1 and 1.2 encode it.
    #[derive(Serialize, Deserialize)]
    pub(super) struct SuspendedWithoutHandles {
        instance: InstanceImage,
        sleep_deadlines: Vec<u64>,
        stdin: Vec<u8>,
        stdin_closed: bool,
        program_part: Option<u32>,
        preopens: Vec<(String, String)>,
    }

    impl From<SuspendedWithoutHandles> for SuspendedImage {
        fn from(s: SuspendedWithoutHandles) -> Self {
            let SuspendedWithoutHandles { instance, sleep_deadlines, stdin, stdin_closed, program_part, preopens } = s;
            SuspendedImage {
                instance,
                sleep_deadlines,
                stdin,
                stdin_closed,
                program_part,
                preopens,
                handles: Vec::new(),
                instantiation_growth: Vec::new(),
            }
        }
    }

    impl From<SuspendedImage> for SuspendedWithoutHandles {
        fn from(s: SuspendedImage) -> Self {
            let SuspendedImage {
                instance,
                sleep_deadlines,
                stdin,
                stdin_closed,
                program_part,
                preopens,
                handles: _,
                instantiation_growth: _,
            } = s;
            SuspendedWithoutHandles { instance, sleep_deadlines, stdin, stdin_closed, program_part, preopens }
        }
    }

    #[derive(Serialize, Deserialize)]
    pub(super) enum ProcessState {
        Exited(ExitRecord),
        Idle(InstanceImage),
        IdleComponentWithoutHandles { instances: Vec<CoreStateImage>, monotonic_ns: u64 },
        Suspended(SuspendedWithoutHandles),
        IdleComponent(ComponentImage),
        SuspendedWithHandles(SuspendedImage),
        IdleComponentMemories(ComponentMemoriesImage),
    }

    impl From<ProcessState> for ProcessStateImage {
        fn from(state: ProcessState) -> Self {
            match state {
                ProcessState::Exited(e) => ProcessStateImage::Exited(e),
                ProcessState::Idle(i) => ProcessStateImage::Idle(i),
                ProcessState::IdleComponentWithoutHandles { instances, monotonic_ns } => {
                    ProcessStateImage::IdleComponent(ComponentImage { instances, monotonic_ns, handles: Vec::new() })
                }
                ProcessState::Suspended(s) => ProcessStateImage::Suspended(s.into()),
                ProcessState::IdleComponent(c) => ProcessStateImage::IdleComponent(c),
                ProcessState::SuspendedWithHandles(s) => ProcessStateImage::Suspended(s),
                ProcessState::IdleComponentMemories(c) => ProcessStateImage::IdleComponentMemories(c),
            }
        }
    }

    impl From<ProcessStateImage> for ProcessState {
        fn from(state: ProcessStateImage) -> Self {
            match state {
                ProcessStateImage::Exited(e) => ProcessState::Exited(e),
                ProcessStateImage::Idle(i) => ProcessState::Idle(i),
                ProcessStateImage::Suspended(s) if s.handles.is_empty() && s.instantiation_growth.is_empty() => {
                    ProcessState::Suspended(s.into())
                }
                ProcessStateImage::Suspended(s) => ProcessState::SuspendedWithHandles(s),
                ProcessStateImage::IdleComponent(c) => ProcessState::IdleComponent(c),
                ProcessStateImage::IdleComponentMemories(c) => ProcessState::IdleComponentMemories(c),
            }
        }
    }
}

/// One core instance of a component. Function references are numbered across the whole
/// component: every function index space of every instance, in instance order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreStateImage {
    pub memories: Vec<MemoryImage>,
    pub globals: Vec<GlobalValue>,
    pub tables: Vec<TableImage>,
}

/// An [`crate::ExitStatus`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitRecord {
    Exited(i32),
    Trapped {
        trap: String,
        backtrace: String,
    },
    MemoryLimit {
        requested: u64,
        limit: u64,
    },
    TimedOut {
        limit_ms: u64,
        cpu: bool,
    },
    Killed,
    StartFailed(String),
    /// Stopped for a checkpoint (format 1.1).
    Checkpointed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceImage {
    pub memories: Vec<MemoryImage>,
    pub globals: Vec<GlobalValue>,
    pub tables: Vec<TableImage>,
    pub fds: FdTableImage,
    /// The monotonic clock's reading when captured, in ns.
    pub monotonic_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    pub size_bytes: u64,
    /// Non-zero pages, as (first page, page count), ascending and not touching.
    pub runs: Vec<(u64, u64)>,
    /// Index into [`ImageHeader::parts`].
    pub part: u32,
}

impl MemoryImage {
    pub fn stored_pages(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    V128(u128),
    NullRef,
    /// A function of the same module, by index.
    Func(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableImage {
    pub size: u64,
    /// Non-null elements: (index, function index in the module).
    pub elements: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// From the end of the header.
    pub offset: u64,
    pub len: u64,
    pub raw_len: u64,
    pub blake3: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not a Stasis memory image: {0}")]
    NotAnImage(String),
    #[error("memory image format {0}.{1} is not supported by this build (reads {major}.0 to {major}.{minor})", major = VERSION.0, minor = VERSION.1)]
    Version(u16, u16),
    #[error("memory image is truncated: {0}")]
    Truncated(String),
    #[error("memory image is corrupt: {0}")]
    Corrupt(String),
}

/// Compresses `raw_parts` and encodes them with a header listing `processes`.
pub fn encode_with_parts(
    engine: &str,
    fs_snapshot: Option<String>,
    processes: Vec<ProcessImage>,
    raw_parts: &[Vec<u8>],
) -> Vec<u8> {
    let mut parts = Vec::with_capacity(raw_parts.len());
    let mut infos: Vec<PartInfo> = Vec::with_capacity(raw_parts.len());
    let mut offset = 0;
    for raw in raw_parts {
        let (info, compressed) = make_part(raw, offset);
        offset += info.len;
        infos.push(info);
        parts.push(compressed);
    }
    let header = ImageHeader {
        engine: engine.to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        fs_snapshot,
        processes,
        parts: infos,
    };
    encode(&header, &parts)
}

/// Encodes a header and its parts (already compressed, in header order) into a file.
pub fn encode(header: &ImageHeader, parts: &[Vec<u8>]) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(header, bincode_config()).expect("encoding to memory cannot fail");
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.0.to_le_bytes());
    out.extend_from_slice(&VERSION.1.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(header_checksum(VERSION.1, &body).as_bytes());
    out.extend_from_slice(&body);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// The header's checksum. From format 1.1 it covers the version too, so that a flipped
/// minor version cannot pass for an older format.
pub fn header_checksum(minor: u16, body: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    if minor >= 1 {
        hasher.update(&VERSION.0.to_le_bytes()).update(&minor.to_le_bytes());
    }
    hasher.update(body).finalize()
}

/// A decoded image: the header, validated, and the bytes its parts live in.
pub struct Image<'a> {
    pub header: ImageHeader,
    parts: &'a [u8],
}

impl fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image").field("header", &self.header).field("parts_len", &self.parts.len()).finish()
    }
}

pub fn decode(bytes: &[u8]) -> Result<Image<'_>, ImageError> {
    if bytes.len() < PREFIX_LEN {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(ImageError::NotAnImage("wrong magic number".into()));
        }
        return Err(ImageError::Truncated(format!("{} bytes, the fixed header alone is {PREFIX_LEN}", bytes.len())));
    }
    if bytes[..8] != MAGIC {
        return Err(ImageError::NotAnImage("wrong magic number".into()));
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    if major != VERSION.0 || minor > VERSION.1 {
        return Err(ImageError::Version(major, minor));
    }
    let header_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    if header_len > MAX_HEADER_LEN {
        return Err(ImageError::Corrupt(format!("header length {header_len} is over the {MAX_HEADER_LEN} limit")));
    }
    let rest = &bytes[PREFIX_LEN..];
    if header_len > rest.len() as u64 {
        return Err(ImageError::Truncated(format!("header of {header_len} bytes, {} present", rest.len())));
    }
    let (body, parts) = rest.split_at(header_len as usize);
    if header_checksum(minor, body).as_bytes() != &bytes[20..52] {
        return Err(ImageError::Corrupt("header checksum mismatch".into()));
    }
    let (header, used): (ImageHeader, usize) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| ImageError::Corrupt(format!("header: {e}")))?;
    if used != body.len() {
        return Err(ImageError::Corrupt(format!("{} stray bytes after the header", body.len() - used)));
    }
    header.validate(parts.len() as u64)?;
    Ok(Image { header, parts })
}

impl ImageHeader {
    /// Checks everything a restore relies on, given the length of the parts area.
    pub fn validate(&self, parts_len: u64) -> Result<(), ImageError> {
        let corrupt = |m: String| Err(ImageError::Corrupt(m));
        let mut end = 0u64;
        for (i, part) in self.parts.iter().enumerate() {
            if part.offset != end {
                return corrupt(format!("part {i} starts at {} instead of {end}", part.offset));
            }
            end = match part.offset.checked_add(part.len) {
                Some(e) if e <= parts_len => e,
                _ => return Err(ImageError::Truncated(format!("part {i} runs past the end of the file"))),
            };
            if part.raw_len > part.len.saturating_mul(MAX_ZSTD_RATIO) {
                return corrupt(format!("part {i}: {} bytes cannot decompress to {}", part.len, part.raw_len));
            }
        }
        if end != parts_len {
            return corrupt(format!("{} stray bytes after the last part", parts_len - end));
        }
        let mut used_parts = vec![false; self.parts.len()];
        for process in &self.processes {
            let states: Vec<(Cow<[MemoryImage]>, &[TableImage])> = match &process.state {
                ProcessStateImage::Exited(_) => continue,
                ProcessStateImage::Idle(instance) => {
                    vec![(Cow::Borrowed(&instance.memories[..]), &instance.tables[..])]
                }
                ProcessStateImage::Suspended(suspended) => {
                    if let Some(part) = suspended.program_part {
                        match used_parts.get_mut(part as usize) {
                            Some(used) if !*used => *used = true,
                            _ => {
                                return corrupt(format!(
                                    "process {}: program part {part} is missing or shared",
                                    process.pid
                                ));
                            }
                        }
                    }
                    vec![(Cow::Borrowed(&suspended.instance.memories[..]), &suspended.instance.tables[..])]
                }
                ProcessStateImage::IdleComponentMemories(component) => {
                    if component.instantiation_growth.len() != component.memories.len() {
                        return corrupt(format!(
                            "process {}: {} memories, growth recorded for {}",
                            process.pid,
                            component.memories.len(),
                            component.instantiation_growth.len()
                        ));
                    }
                    vec![(Cow::Borrowed(&component.memories[..]), &[][..])]
                }
                ProcessStateImage::IdleComponent(component) => {
                    // A memory seen through several instances (exported by one, imported by
                    // others) is stored once: its images name the same part and must agree.
                    let mut first: Vec<Option<&MemoryImage>> = vec![None; self.parts.len()];
                    let mut states = Vec::with_capacity(component.instances.len());
                    for instance in &component.instances {
                        let mut own = Vec::new();
                        for memory in &instance.memories {
                            match first.get_mut(memory.part as usize) {
                                Some(Some(seen)) if *seen == memory => {}
                                Some(Some(_)) => {
                                    return corrupt(format!(
                                        "process {}: part {} is shared by different memories",
                                        process.pid, memory.part
                                    ));
                                }
                                Some(slot) => {
                                    *slot = Some(memory);
                                    own.push(memory.clone());
                                }
                                // Not a part: `validate_state` says so.
                                None => own.push(memory.clone()),
                            }
                        }
                        states.push((Cow::Owned(own), &instance.tables[..]));
                    }
                    states
                }
            };
            for (memories, tables) in states {
                self.validate_state(process.pid, &memories, tables, parts_len, &mut used_parts)?;
            }
        }
        if let Some(unused) = used_parts.iter().position(|used| !used) {
            return corrupt(format!("part {unused} belongs to no memory"));
        }
        Ok(())
    }

    fn validate_state(
        &self,
        pid: u64,
        memories: &[MemoryImage],
        tables: &[TableImage],
        _parts_len: u64,
        used_parts: &mut [bool],
    ) -> Result<(), ImageError> {
        let corrupt = |m: String| Err(ImageError::Corrupt(m));
        let process = Pid(pid);
        {
            for (m, memory) in memories.iter().enumerate() {
                let what = format!("process {} memory {m}", process);
                if memory.size_bytes > MAX_MEMORY_BYTES || !memory.size_bytes.is_multiple_of(IMAGE_PAGE) {
                    return corrupt(format!("{what}: size {} is not a supported memory size", memory.size_bytes));
                }
                let pages = memory.size_bytes / IMAGE_PAGE;
                let mut next_free = 0u64;
                for &(start, count) in &memory.runs {
                    let run_end = start.checked_add(count).filter(|&e| e <= pages);
                    if count == 0 || start < next_free || run_end.is_none() || (start == next_free && start != 0) {
                        return corrupt(format!(
                            "{what}: page run ({start}, {count}) is out of order or out of bounds"
                        ));
                    }
                    next_free = run_end.unwrap_or(pages);
                }
                let part = self.parts.get(memory.part as usize);
                let Some(part) = part else { return corrupt(format!("{what}: part {} does not exist", memory.part)) };
                if std::mem::replace(&mut used_parts[memory.part as usize], true) {
                    return corrupt(format!("{what}: part {} is shared", memory.part));
                }
                if part.raw_len != memory.stored_pages() * IMAGE_PAGE {
                    return corrupt(format!(
                        "{what}: part holds {} bytes, the runs need {}",
                        part.raw_len,
                        memory.stored_pages() * IMAGE_PAGE
                    ));
                }
            }
            for (t, table) in tables.iter().enumerate() {
                if table.size > MAX_TABLE_ELEMENTS {
                    return corrupt(format!("process {} table {t}: {} elements", process, table.size));
                }
                if table.elements.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return corrupt(format!("process {} table {t}: elements out of order", process));
                }
                if let Some(&(index, _)) = table.elements.iter().find(|&&(index, _)| index >= table.size) {
                    return corrupt(format!(
                        "process {} table {t}: element {index} past its size {}",
                        process, table.size
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Formats like a process record's `pid` field in the messages above.
struct Pid(u64);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Image<'_> {
    /// The decompressed bytes of a part, checksum verified first.
    pub fn part(&self, index: u32) -> Result<Vec<u8>, ImageError> {
        let info =
            self.header.parts.get(index as usize).ok_or_else(|| ImageError::Corrupt(format!("no part {index}")))?;
        let bytes = &self.parts[info.offset as usize..(info.offset + info.len) as usize];
        if blake3::hash(bytes).as_bytes() != &info.blake3 {
            return Err(ImageError::Corrupt(format!("part {index} checksum mismatch")));
        }
        if info.raw_len == 0 {
            return Ok(Vec::new());
        }
        let raw = zstd::bulk::decompress(bytes, info.raw_len as usize)
            .map_err(|e| ImageError::Corrupt(format!("part {index}: zstd: {e}")))?;
        if raw.len() as u64 != info.raw_len {
            return Err(ImageError::Corrupt(format!("part {index}: {} bytes instead of {}", raw.len(), info.raw_len)));
        }
        Ok(raw)
    }
}

/// Splits a memory into its non-zero pages: the run list and the pages' bytes.
pub fn nonzero_pages(memory: &[u8]) -> (Vec<(u64, u64)>, Vec<u8>) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut data = Vec::new();
    for (i, page) in memory.chunks(IMAGE_PAGE as usize).enumerate() {
        if is_zero(page) {
            continue;
        }
        let i = i as u64;
        match runs.last_mut() {
            Some((start, count)) if *start + *count == i => *count += 1,
            _ => runs.push((i, 1)),
        }
        data.extend_from_slice(page);
    }
    (runs, data)
}

fn is_zero(bytes: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { bytes.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

/// Parts at least this large are compressed as several frames on all cores.
const PARALLEL_PART: usize = 512 << 10;

/// Compresses a part and describes it, at `offset` in the parts area. A large part is
/// split into one zstd frame per core, compressed in parallel and concatenated (a zstd
/// decoder reads concatenated frames as one stream).
pub fn make_part(raw: &[u8], offset: u64) -> (PartInfo, Vec<u8>) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let compress = |bytes: &[u8]| zstd::bulk::compress(bytes, 1).expect("zstd into memory");
    let compressed = if raw.is_empty() {
        Vec::new()
    } else if raw.len() < PARALLEL_PART || threads == 1 {
        compress(raw)
    } else {
        let frame = raw.len().div_ceil(threads).next_multiple_of(IMAGE_PAGE as usize);
        let frames: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let workers: Vec<_> = raw.chunks(frame).map(|chunk| scope.spawn(move || compress(chunk))).collect();
            workers.into_iter().map(|w| w.join().expect("compression thread")).collect()
        });
        frames.concat()
    };
    let info = PartInfo {
        offset,
        len: compressed.len() as u64,
        raw_len: raw.len() as u64,
        blake3: *blake3::hash(&compressed).as_bytes(),
    };
    (info, compressed)
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_HEADER_LEN as usize }>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut memory = vec![0u8; 64 * 1024];
        memory[5000] = 7;
        memory[9000] = 9;
        memory[40000] = 1;
        let (runs, raw) = nonzero_pages(&memory);
        assert_eq!(runs, vec![(1, 2), (9, 1)]);
        let (info, part) = make_part(&raw, 0);
        let header = one_process(
            ProcessStateImage::Idle(InstanceImage {
                memories: vec![MemoryImage { size_bytes: memory.len() as u64, runs, part: 0 }],
                globals: vec![GlobalValue::I32(5)],
                tables: vec![TableImage { size: 2, elements: vec![(1, 0)] }],
                fds: FdTableImage::default(),
                monotonic_ns: 10,
            }),
            info,
        );
        encode(&header, &[part])
    }

    /// A header with one process in `state`, whose memory is `part`.
    fn one_process(state: ProcessStateImage, part: PartInfo) -> ImageHeader {
        ImageHeader {
            engine: "e".into(),
            created_unix_ms: 1,
            fs_snapshot: None,
            processes: vec![ProcessImage {
                pid: 1,
                argv: vec!["r".into()],
                env: vec![],
                cwd: None,
                program: [0; 32],
                program_name: "r".into(),
                stdout: vec![],
                stderr: vec![],
                state,
            }],
            parts: vec![part],
        }
    }

    /// A 1.1 component state (before handles) is read as one holding none, and 1.2 states
    /// round-trip with their handles.
    #[test]
    fn component_states_of_both_formats_decode() {
        let old = wire::ProcessState::IdleComponentWithoutHandles { instances: vec![], monotonic_ns: 7 };
        let bytes = bincode::serde::encode_to_vec(old, bincode_config()).unwrap();
        let (state, _): (ProcessStateImage, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
        assert_eq!(
            state,
            ProcessStateImage::IdleComponent(ComponentImage { instances: vec![], monotonic_ns: 7, handles: vec![] })
        );
        let new = ProcessStateImage::IdleComponent(ComponentImage {
            instances: vec![],
            monotonic_ns: 8,
            handles: vec![HandleImage { slot: 3, recipe: Recipe::Stdout }],
        });
        let bytes = bincode::serde::encode_to_vec(&new, bincode_config()).unwrap();
        let (state, _): (ProcessStateImage, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
        assert_eq!(state, new);
    }

    #[test]
    fn round_trips() {
        let bytes = sample();
        let image = decode(&bytes).unwrap();
        assert_eq!(image.part(0).unwrap().len(), 3 * IMAGE_PAGE as usize);
    }

    #[test]
    fn large_parts_are_several_frames_that_decode_as_one() {
        let raw: Vec<u8> = (0..3 * PARALLEL_PART as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (info, compressed) = make_part(&raw, 0);
        assert_eq!(info.raw_len, raw.len() as u64);
        assert_eq!(zstd::bulk::decompress(&compressed, raw.len()).unwrap(), raw);
    }

    /// A component image holding host resources (format 1.2): every byte of its header
    /// changed, with the checksum recomputed so that the parser sees it, decodes or fails
    /// cleanly; never a panic.
    #[test]
    fn mutated_component_headers_with_valid_checksums_never_panic() {
        let mut memory = vec![0u8; 128 * 1024];
        memory[70000] = 3;
        let (runs, raw) = nonzero_pages(&memory);
        let (info, part) = make_part(&raw, 0);
        let file = DescriptorRecipe {
            preopen: 0,
            open: Some(OpenAt { path: "a/b.txt".into(), path_flags: 1, open_flags: 0, flags: 1 }),
        };
        let header = one_process(
            ProcessStateImage::IdleComponent(ComponentImage {
                instances: vec![CoreStateImage {
                    memories: vec![MemoryImage { size_bytes: memory.len() as u64, runs, part: 0 }],
                    globals: vec![GlobalValue::I32(5), GlobalValue::Func(2)],
                    tables: vec![TableImage { size: 2, elements: vec![(1, 0)] }],
                }],
                monotonic_ns: 10,
                handles: vec![
                    HandleImage { slot: 0, recipe: Recipe::Stdin },
                    HandleImage { slot: 3, recipe: Recipe::Descriptor(file.clone()) },
                    HandleImage { slot: 4, recipe: Recipe::Read { file, position: 7 } },
                ],
            }),
            info,
        );
        // A second instance seeing the same memory names the same part; a different
        // memory may not.
        let mut shared = header.clone();
        let ProcessStateImage::IdleComponent(c) = &mut shared.processes[0].state else { unreachable!() };
        let view = c.instances[0].clone();
        c.instances.push(view);
        assert!(decode(&encode(&shared, std::slice::from_ref(&part))).is_ok());
        let ProcessStateImage::IdleComponent(c) = &mut shared.processes[0].state else { unreachable!() };
        c.instances[1].memories[0].size_bytes *= 2;
        let err = decode(&encode(&shared, std::slice::from_ref(&part))).err().unwrap().to_string();
        assert!(err.contains("shared by different memories"), "{err}");

        let bytes = encode(&header, &[part]);
        assert_eq!(decode(&bytes).unwrap().header, header);
        let header_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
        let mut decoded = 0;
        for i in PREFIX_LEN..PREFIX_LEN + header_len {
            for value in [0x00u8, 0x01, 0x7f, 0x80, 0xff, bytes[i] ^ 0x04] {
                let mut mutated = bytes.clone();
                mutated[i] = value;
                let hash = header_checksum(VERSION.1, &mutated[PREFIX_LEN..PREFIX_LEN + header_len]);
                mutated[20..52].copy_from_slice(hash.as_bytes());
                if let Ok(image) = decode(&mutated) {
                    decoded += 1;
                    let _ = image.part(0);
                }
            }
        }
        assert!(decoded > 0, "some mutations (a global's value, a path byte) still decode");
    }

    #[test]
    fn idle_checkpointable_components_round_trip_and_their_growth_must_match_their_memories() {
        let mut memory = vec![0u8; 128 * 1024];
        memory[9000] = 1;
        let (runs, raw) = nonzero_pages(&memory);
        let (info, part) = make_part(&raw, 0);
        let image = ComponentMemoriesImage {
            memories: vec![MemoryImage { size_bytes: memory.len() as u64, runs, part: 0 }],
            instantiation_growth: vec![65536],
            handles: vec![HandleImage { slot: 1, recipe: Recipe::Stdout }],
            monotonic_ns: 3,
        };
        let header = one_process(ProcessStateImage::IdleComponentMemories(image.clone()), info);
        let bytes = encode(&header, std::slice::from_ref(&part));
        assert_eq!(decode(&bytes).unwrap().header, header);
        let crafted = one_process(
            ProcessStateImage::IdleComponentMemories(ComponentMemoriesImage { instantiation_growth: vec![], ..image }),
            info,
        );
        let err = decode(&encode(&crafted, &[part])).err().unwrap().to_string();
        assert!(err.contains("growth recorded for 0"), "{err}");
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).and_then(|i| i.part(0)).is_err(), "truncated to {len} was accepted");
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut flipped = bytes.clone();
                flipped[i] ^= bit;
                // Header fields are checksummed and parts are checksummed: any flip is caught.
                assert!(decode(&flipped).and_then(|img| img.part(0)).is_err(), "flip at {i} accepted");
            }
        }
    }

    /// A one-byte part claiming the 16 GiB of a full memory used to make `part` reserve
    /// 16 GiB before zstd looked at the byte.
    #[test]
    fn part_claiming_more_than_zstd_can_expand_is_refused_before_allocating() {
        let pages = MAX_MEMORY_BYTES / IMAGE_PAGE;
        let part = vec![0x28u8];
        let header = ImageHeader {
            engine: "e".into(),
            created_unix_ms: 1,
            fs_snapshot: None,
            processes: vec![ProcessImage {
                pid: 1,
                argv: vec![],
                env: vec![],
                cwd: None,
                program: [0; 32],
                program_name: "r".into(),
                stdout: vec![],
                stderr: vec![],
                state: ProcessStateImage::Idle(InstanceImage {
                    memories: vec![MemoryImage { size_bytes: MAX_MEMORY_BYTES, runs: vec![(0, pages)], part: 0 }],
                    globals: vec![],
                    tables: vec![],
                    fds: FdTableImage::default(),
                    monotonic_ns: 0,
                }),
            }],
            parts: vec![PartInfo {
                offset: 0,
                len: 1,
                raw_len: MAX_MEMORY_BYTES,
                blake3: *blake3::hash(&part).as_bytes(),
            }],
        };
        let err = decode(&encode(&header, &[part])).unwrap_err();
        assert!(err.to_string().contains("1 bytes cannot decompress to 17179869184"), "{err}");
    }

    #[test]
    fn crafted_runs_and_parts_are_refused() {
        let bytes = sample();
        let image = decode(&bytes).unwrap();
        let parts_len = image.parts.len() as u64;
        let mut header = image.header.clone();
        let ProcessStateImage::Idle(instance) = &mut header.processes[0].state else { unreachable!() };
        instance.memories[0].runs = vec![(15, u64::MAX)];
        assert!(header.validate(parts_len).unwrap_err().to_string().contains("out of order or out of bounds"));
        let mut header = image.header.clone();
        let ProcessStateImage::Idle(instance) = &mut header.processes[0].state else { unreachable!() };
        instance.memories[0].size_bytes = u64::MAX - 4095;
        assert!(header.validate(parts_len).unwrap_err().to_string().contains("not a supported memory size"));
        let mut header = image.header.clone();
        header.parts[0].len = u64::MAX;
        assert!(matches!(header.validate(parts_len), Err(ImageError::Truncated(_))));
        let mut header = image.header.clone();
        let ProcessStateImage::Idle(instance) = &mut header.processes[0].state else { unreachable!() };
        instance.tables[0].elements = vec![(2, 0)];
        assert!(header.validate(parts_len).unwrap_err().to_string().contains("past its size"));
        let mut header = image.header.clone();
        header.parts[0].raw_len = header.parts[0].len * MAX_ZSTD_RATIO + 1;
        assert!(header.validate(parts_len).unwrap_err().to_string().contains("cannot decompress to"));
        assert!(matches!(
            decode(b"STASISFM rest of a manifest, not an image......................"),
            Err(ImageError::NotAnImage(_))
        ));
    }
}
