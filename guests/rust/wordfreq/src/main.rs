//! A wasip2 command that does what real programs do between blocking calls: reads its
//! input line by line from stdin, counts words, keeps state on the heap, spins the CPU,
//! writes files and prints a report. Tests stop it at blocking reads and at random moments
//! and compare the continued run with an uninterrupted one.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

fn checksum(rounds: u64) -> u64 {
    // A CPU-bound stretch with no calls: only a loop check can stop it.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: u64 = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1_000_000);
    let out_dir = args.get(1).cloned().unwrap_or_else(|| "/".into());
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let stdin = std::io::stdin();
    let mut lines = 0u64;
    for line in stdin.lock().lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("wordfreq: reading stdin: {e}");
                std::process::exit(2);
            }
        };
        lines += 1;
        for word in line.split_whitespace() {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        println!("line {lines}: {} words so far, mix {:016x}", counts.len(), checksum(rounds));
        std::io::stdout().flush().unwrap();
    }
    let path = format!("{}/wordfreq.txt", out_dir.trim_end_matches('/'));
    let mut file = std::fs::File::create(&path).unwrap_or_else(|e| {
        eprintln!("wordfreq: creating {path}: {e}");
        std::process::exit(3);
    });
    for (word, n) in &counts {
        writeln!(file, "{n} {word}").unwrap();
    }
    file.sync_all().ok();
    eprintln!("wordfreq: {lines} lines, {} distinct words, wrote {path}", counts.len());
    std::process::exit(if counts.is_empty() { 1 } else { 0 });
}
