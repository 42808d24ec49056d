#![allow(dead_code)] // each target uses one of the seed sets
//! Seed inputs, written by a fuzz target's init hook when `STASIS_FUZZ_WRITE_SEEDS` names a
//! directory (the target then exits without fuzzing):
//!
//! ```text
//! STASIS_FUZZ_WRITE_SEEDS=corpus/memory_image target/x86_64-unknown-linux-gnu/release/memory_image
//! ```
//! Built through the runtime's own encoders, so each seed is a valid file of the current
//! format: mutations of it start past the magic, version, lengths and checksums.

use stasis_runtime::fs_snapshot::{Chunk, ChunkHash, Entry, EntryKind, Manifest, ManifestParts};
use stasis_runtime::memory_image::{
    self, ComponentImage, ComponentMemoriesImage, CoreStateImage, DescriptorRecipe, ExitRecord, GlobalValue,
    HandleImage, ImageHeader, InstanceImage, MemoryImage, OpenAt, ProcessImage, ProcessStateImage, Recipe, TableImage,
};
use stasis_runtime::wasi_state::{FdImage, FdTableImage, OpenRecord};
use std::path::Path;

/// Writes seeds if asked to, then exits.
pub fn write_if_asked(which: fn() -> Vec<(&'static str, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("STASIS_FUZZ_WRITE_SEEDS") else { return };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).expect("create the seed directory");
    for (name, bytes) in which() {
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
    std::process::exit(0);
}

fn process(pid: u64, state: ProcessStateImage) -> ProcessImage {
    ProcessImage {
        pid,
        argv: vec!["reactor.wasm".into(), "--flag".into()],
        env: vec![("HOME".into(), "/".into())],
        cwd: Some("/".into()),
        program: *blake3::hash(b"program").as_bytes(),
        program_name: "reactor.wasm".into(),
        stdout: b"hello\n".to_vec(),
        stderr: vec![],
        state,
    }
}

/// A memory of `pages` image pages with the listed pages non-zero, its part at `offset`.
fn memory(pages: u64, nonzero: &[u64], part: u32, offset: u64) -> (MemoryImage, memory_image::PartInfo, Vec<u8>) {
    let mut bytes = vec![0u8; (pages * memory_image::IMAGE_PAGE) as usize];
    for &p in nonzero {
        let at = (p * memory_image::IMAGE_PAGE) as usize;
        bytes[at..at + 16].copy_from_slice(&p.to_le_bytes().repeat(2));
    }
    let (runs, raw) = memory_image::nonzero_pages(&bytes);
    let (info, compressed) = memory_image::make_part(&raw, offset);
    (MemoryImage { size_bytes: bytes.len() as u64, runs, part }, info, compressed)
}

fn instance(memories: Vec<MemoryImage>) -> InstanceImage {
    InstanceImage {
        memories,
        globals: vec![
            GlobalValue::I32(66560),
            GlobalValue::I64(-1),
            GlobalValue::F32(1.5f32.to_bits()),
            GlobalValue::F64(2.5f64.to_bits()),
            GlobalValue::V128(7),
            GlobalValue::NullRef,
            GlobalValue::Func(3),
        ],
        tables: vec![TableImage { size: 4, elements: vec![(1, 2), (3, 0)] }],
        fds: FdTableImage {
            fds: vec![FdImage {
                fd: 4,
                open: OpenRecord {
                    base_fd: 3,
                    path: "data/file.txt".into(),
                    dirflags: 1,
                    oflags: 1,
                    rights_base: u64::MAX,
                    rights_inheriting: 0,
                    fdflags: 0,
                },
                offset: Some(12),
            }],
            closed_initial: vec![2],
            high_water: 4,
        },
        monotonic_ns: 123_456_789,
    }
}

fn header(processes: Vec<ProcessImage>, parts: Vec<memory_image::PartInfo>) -> ImageHeader {
    ImageHeader {
        engine: "wasmtime-48/x86_64/cranelift".into(),
        created_unix_ms: 1_764_000_000_000,
        fs_snapshot: Some("0123456789abcdef".into()),
        processes,
        parts,
    }
}

pub fn memory_images() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    // A reactor with one 1 MiB memory (16 wasm pages), a few non-zero runs.
    let (m, info, part) = memory(256, &[0, 1, 2, 17, 200, 255], 0, 0);
    let h = header(vec![process(1, ProcessStateImage::Idle(instance(vec![m])))], vec![info]);
    seeds.push(("reactor", memory_image::encode(&h, &[part])));
    // Two live processes (one with two memories, one all zero) and exited ones.
    let (m0, i0, p0) = memory(32, &[3, 4, 9], 0, 0);
    let (m1, i1, p1) = memory(16, &[15], 1, i0.len);
    let (m2, i2, p2) = memory(16, &[], 2, i0.len + i1.len);
    let h = header(
        vec![
            process(1, ProcessStateImage::Idle(instance(vec![m0, m1]))),
            process(2, ProcessStateImage::Exited(ExitRecord::Exited(3))),
            process(3, ProcessStateImage::Idle(instance(vec![m2]))),
            process(
                4,
                ProcessStateImage::Exited(ExitRecord::Trapped { trap: "unreachable".into(), backtrace: "0: f".into() }),
            ),
            process(5, ProcessStateImage::Exited(ExitRecord::MemoryLimit { requested: 1 << 30, limit: 1 << 20 })),
            process(6, ProcessStateImage::Exited(ExitRecord::TimedOut { limit_ms: 10, cpu: true })),
            process(7, ProcessStateImage::Exited(ExitRecord::Killed)),
            process(8, ProcessStateImage::Exited(ExitRecord::StartFailed("no _start".into()))),
        ],
        vec![i0, i1, i2],
    );
    seeds.push(("processes", memory_image::encode(&h, &[p0, p1, p2])));
    // A reactor component holding host resources (format 1.2): two core instances sharing
    // one memory, stdio streams, a preopen, an opened file and its streams.
    let (m0, i0, p0) = memory(64, &[0, 5, 63], 0, 0);
    let (m1, i1, p1) = memory(64, &[0, 5, 63], 1, i0.len);
    let file = DescriptorRecipe {
        preopen: 0,
        open: Some(OpenAt { path: "dir/log.txt".into(), path_flags: 1, open_flags: 1, flags: 3 }),
    };
    let core = |memories: Vec<MemoryImage>| CoreStateImage {
        memories,
        globals: vec![GlobalValue::I32(1024), GlobalValue::Func(1)],
        tables: vec![TableImage { size: 2, elements: vec![(0, 1)] }],
    };
    let component = ComponentImage {
        instances: vec![core(vec![m0]), core(vec![m1])],
        monotonic_ns: 5,
        handles: vec![
            HandleImage { slot: 0, recipe: Recipe::Stdin },
            HandleImage { slot: 1, recipe: Recipe::Stdout },
            HandleImage { slot: 2, recipe: Recipe::Stderr },
            HandleImage { slot: 3, recipe: Recipe::Descriptor(DescriptorRecipe { preopen: 0, open: None }) },
            HandleImage { slot: 5, recipe: Recipe::Descriptor(file.clone()) },
            HandleImage { slot: 6, recipe: Recipe::Read { file: file.clone(), position: 9 } },
            HandleImage { slot: 7, recipe: Recipe::Write { file: file.clone(), position: 2 } },
            HandleImage { slot: 8, recipe: Recipe::Append { file } },
        ],
    };
    let h = header(vec![process(1, ProcessStateImage::IdleComponent(component))], vec![i0, i1]);
    seeds.push(("component", memory_image::encode(&h, &[p0, p1])));
    // A checkpointable reactor component (format 1.4): its memories in creation order (the
    // program's, the unwind stack), how start code grew them, its handles.
    let (m0, i0, p0) = memory(64, &[0, 5, 63], 0, 0);
    let (m1, i1, p1) = memory(16, &[0], 1, i0.len);
    let component = ComponentMemoriesImage {
        memories: vec![m0, m1],
        instantiation_growth: vec![65536, 0],
        handles: vec![
            HandleImage { slot: 1, recipe: Recipe::Stdout },
            HandleImage { slot: 3, recipe: Recipe::Descriptor(DescriptorRecipe { preopen: 0, open: None }) },
        ],
        monotonic_ns: 9,
    };
    let h = header(vec![process(1, ProcessStateImage::IdleComponentMemories(component))], vec![i0, i1]);
    seeds.push(("checkpointable_component", memory_image::encode(&h, &[p0, p1])));
    // Only exited processes, no parts.
    let h = header(vec![process(9, ProcessStateImage::Exited(ExitRecord::Exited(0)))], vec![]);
    seeds.push(("exited", memory_image::encode(&h, &[])));
    seeds
}

pub fn manifests() -> Vec<(&'static str, Vec<u8>)> {
    let h = ChunkHash::of(b"hello");
    let parts = ManifestParts {
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
    };
    let empty = ManifestParts { entries: vec![], warnings: vec![], chunk_size: 4096, ..parts.clone() };
    let full = Manifest::from_parts(parts).expect("valid sample manifest").encode();
    let empty = Manifest::from_parts(empty).expect("valid empty manifest").encode();
    vec![("tree", full), ("empty", empty)]
}
