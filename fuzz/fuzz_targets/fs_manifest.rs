//! Fuzzes the filesystem-manifest decoder: `Manifest::decode` and `Manifest::read_from`,
//! on the input as it is and with its body checksum recomputed (bytes 20..52 of the
//! header), so that mutations reach the bincode parser and `ManifestParts::validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_runtime::fs_snapshot::manifest::HEADER_LEN;
use stasis_runtime::fs_snapshot::{EntryKind, Manifest};

#[path = "../src/seeds.rs"]
mod seeds;

fuzz_target!(init: seeds::write_if_asked(seeds::manifests), |data: &[u8]| {
    check(data);
    if data.len() >= HEADER_LEN {
        let hash = blake3::hash(&data[HEADER_LEN..]);
        if hash.as_bytes() != &data[20..52] {
            let mut resealed = data.to_vec();
            resealed[20..52].copy_from_slice(hash.as_bytes());
            check(&resealed);
        }
    }
});

fn check(data: &[u8]) {
    let decoded = Manifest::decode(data);
    let read = Manifest::read_from(data);
    assert_eq!(decoded.is_ok(), read.is_ok(), "decode and read_from disagree");
    let Ok(manifest) = decoded else { return };
    assert_eq!(Some(&manifest), read.as_ref().ok());
    let _ = manifest.logical_bytes();
    for entry in manifest.entries() {
        let _ = entry.display_path();
        if let EntryKind::File { chunks, .. } = &entry.kind {
            for chunk in chunks {
                let _ = chunk.hash();
            }
        }
    }
    // A valid manifest survives a round trip.
    let again = Manifest::decode(&manifest.encode()).expect("a re-encoded valid manifest decodes");
    assert_eq!(again, manifest);
}
