//! Fuzzes the memory-image decoder: `decode`, then `part` for every part.
//!
//! The header and the parts are blake3-checksummed, so random mutations would almost never
//! get past the checksums. Besides the input as it is, the target therefore also decodes a
//! copy with the header checksum recomputed and, when that header parses, a re-encoded copy
//! whose part checksums are recomputed too: the bincode parser, `ImageHeader::validate` and
//! the zstd decompression all see fuzzed bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_runtime::memory_image::{self, Image, ImageHeader, PREFIX_LEN, ProcessStateImage};

#[path = "../src/seeds.rs"]
mod seeds;

fuzz_target!(init: seeds::write_if_asked(seeds::memory_images), |data: &[u8]| {
    let _ = exercise(data);
    let Some(resealed) = reseal_header(data) else { return };
    let Ok(image) = exercise(&resealed) else { return };
    // Recompute every part's checksum and re-encode, so that `part` decompresses.
    let header_len = u64::from_le_bytes(resealed[12..20].try_into().unwrap()) as usize;
    let parts_area = &resealed[PREFIX_LEN + header_len..];
    let mut header = image.header.clone();
    let mut parts = Vec::new();
    for info in &mut header.parts {
        let bytes = &parts_area[info.offset as usize..(info.offset + info.len) as usize];
        info.blake3 = *blake3::hash(bytes).as_bytes();
        parts.push(bytes.to_vec());
    }
    let reencoded = memory_image::encode(&header, &parts);
    let image = memory_image::decode(&reencoded).expect("a re-encoded valid header decodes");
    for i in 0..image.header.parts.len() as u32 {
        let _ = image.part(i);
    }
});

/// Decodes, walks the header and decompresses every part.
fn exercise(data: &[u8]) -> Result<Image<'_>, memory_image::ImageError> {
    let image = memory_image::decode(data)?;
    walk(&image.header);
    for i in 0..image.header.parts.len() as u32 {
        if let Ok(raw) = image.part(i) {
            assert_eq!(raw.len() as u64, image.header.parts[i as usize].raw_len);
        }
    }
    Ok(image)
}

/// What a restore does with a validated header: sum the runs, index the parts.
fn walk(header: &ImageHeader) {
    for process in &header.processes {
        let states: Vec<(&[memory_image::MemoryImage], &[memory_image::TableImage])> = match &process.state {
            ProcessStateImage::Idle(instance) => vec![(&instance.memories, &instance.tables)],
            ProcessStateImage::Suspended(suspended) => {
                if let Some(part) = suspended.program_part {
                    assert!((part as usize) < header.parts.len());
                }
                vec![(&suspended.instance.memories, &suspended.instance.tables)]
            }
            ProcessStateImage::IdleComponent(component) => {
                component.instances.iter().map(|i| (&i.memories[..], &i.tables[..])).collect()
            }
            ProcessStateImage::Exited(_) => continue,
        };
        for (memories, tables) in states {
            walk_state(header, memories, tables);
        }
    }
}

fn walk_state(header: &ImageHeader, memories: &[memory_image::MemoryImage], tables: &[memory_image::TableImage]) {
    for memory in memories {
        let pages = memory.stored_pages();
        assert!(pages <= memory.size_bytes / memory_image::IMAGE_PAGE);
        let part = header.parts[memory.part as usize];
        assert_eq!(part.raw_len, pages * memory_image::IMAGE_PAGE);
        for &(start, count) in &memory.runs {
            assert!(start + count <= memory.size_bytes / memory_image::IMAGE_PAGE);
        }
    }
    for table in tables {
        assert!(table.elements.iter().all(|&(i, _)| i < table.size));
    }
}

/// The input with its header checksum (bytes 20..52) recomputed, if it has a prefix and a
/// header of the length it claims.
fn reseal_header(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < PREFIX_LEN {
        return None;
    }
    let header_len = u64::from_le_bytes(data[12..20].try_into().unwrap());
    if header_len > (data.len() - PREFIX_LEN) as u64 {
        return None;
    }
    let body = &data[PREFIX_LEN..PREFIX_LEN + header_len as usize];
    let minor = u16::from_le_bytes([data[10], data[11]]);
    let hash = memory_image::header_checksum(minor, body);
    if hash.as_bytes() == &data[20..52] {
        return None; // already decoded as it is
    }
    let mut out = data.to_vec();
    out[20..52].copy_from_slice(hash.as_bytes());
    Some(out)
}
