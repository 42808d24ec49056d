//! `stasis snapshot`: filesystem snapshots from the command line (create, list, restore,
//! delete, export, import). Machine-readable output (ids) goes to stdout, everything else to
//! stderr; failures print one `stasis: error: ...` line and exit with 125, as `stasis run`.

use clap::{Args, Subcommand};
use stasis_runtime::fs_snapshot::{
    CaptureOptions, CaptureStats, FsSnapshotStore, SnapshotError, SnapshotId, format_utc,
};
use stasis_runtime::process::exit_codes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Data directory (default: `$STASIS_DATA_DIR`, else `./.stasis`); snapshots are kept in
    /// `<data-dir>/snapshots/fs`.
    #[arg(long, global = true, value_name = "PATH", env = "STASIS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Snapshot a directory tree and print the new snapshot's id. Files unchanged since the
    /// latest snapshot of the same directory are not read again.
    Create {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// List snapshots, oldest first.
    List,
    /// Restore a snapshot as a new directory (which must not exist, or be empty).
    Restore {
        id: String,
        #[arg(long, value_name = "DIR")]
        into: PathBuf,
    },
    /// Delete a snapshot and free the stored data no other snapshot uses.
    Delete { id: String },
    /// Write a snapshot as a standard tar archive.
    Export {
        id: String,
        #[arg(short = 'o', long = "output", value_name = "FILE.tar")]
        output: PathBuf,
    },
    /// Import a tar archive as a new snapshot and print its id.
    Import {
        #[arg(value_name = "FILE.tar")]
        file: PathBuf,
    },
}

/// Runs the subcommand; returns the process exit code.
pub fn main(args: SnapshotArgs) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("stasis: error: {message}");
            exit_codes::STASIS_ERROR as u8
        }
    }
}

fn run(args: SnapshotArgs) -> Result<(), String> {
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from(".stasis"));
    let store_dir = data_dir.join("snapshots").join("fs");
    let store = FsSnapshotStore::open(&store_dir).map_err(|e| e.to_string())?;
    match args.command {
        SnapshotCommand::Create { dir } => create(&store, &dir),
        SnapshotCommand::List => list(&store),
        SnapshotCommand::Restore { id, into } => {
            let id = parse_id(&id)?;
            let started = Instant::now();
            let stats = store.restore(&id, &into).map_err(|e| e.to_string())?;
            eprintln!(
                "stasis: restored {id} into {} ({} files, {} directories, {} symlinks, {}) in {:.2} s",
                into.display(),
                stats.files,
                stats.dirs,
                stats.symlinks,
                human_bytes(stats.bytes),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        SnapshotCommand::Delete { id } => {
            let id = parse_id(&id)?;
            let stats = store.delete(&id).map_err(|e| e.to_string())?;
            eprintln!(
                "stasis: deleted {id} (freed {} in {} chunks)",
                human_bytes(stats.bytes_freed),
                stats.chunks_deleted
            );
            Ok(())
        }
        SnapshotCommand::Export { id, output } => export(&store, &parse_id(&id)?, &output),
        SnapshotCommand::Import { file } => {
            let f = std::fs::File::open(&file).map_err(|e| format!("cannot open `{}`: {e}", file.display()))?;
            let source = format!("import:{}", file.display());
            let id =
                store.import_tar(std::io::BufReader::with_capacity(1 << 20, f), source).map_err(|e| e.to_string())?;
            for w in store.get(&id).map(|m| m.warnings().to_vec()).unwrap_or_default() {
                eprintln!("stasis: warning: {w}");
            }
            println!("{id}");
            Ok(())
        }
    }
}

fn parse_id(s: &str) -> Result<SnapshotId, String> {
    SnapshotId::parse(s).map_err(|e| e.to_string())
}

fn create(store: &FsSnapshotStore, dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    let canonical = std::fs::canonicalize(dir).map_err(|e| format!("cannot open `{}`: {e}", dir.display()))?;
    if !canonical.is_dir() {
        return Err(format!("`{}` is not a directory", dir.display()));
    }
    let source = canonical.to_string_lossy().into_owned();
    let tree = cap_std::fs::Dir::open_ambient_dir(&canonical, cap_std::ambient_authority())
        .map_err(|e| format!("cannot open `{}`: {e}", dir.display()))?;
    let parent = match store.latest_with_manifest(&source) {
        Ok(Some((_, manifest))) => Some(manifest),
        _ => None,
    };
    let options = CaptureOptions::new(source.clone());
    let pending = match parent.as_ref() {
        Some(p) => match store.capture(&tree, options.clone().parent(p)) {
            Err(SnapshotError::ParentGone(_)) => store.capture(&tree, options),
            other => other,
        },
        None => store.capture(&tree, options),
    }
    .map_err(|e| e.to_string())?;
    for w in pending.manifest().warnings() {
        eprintln!("stasis: warning: {w}");
    }
    let stats: CaptureStats = pending.stats().clone();
    let logical = pending.manifest().logical_bytes();
    let id = store.commit(pending).map_err(|e| e.to_string())?;
    eprintln!(
        "stasis: snapshot of {source}: {} entries, {} ({} files read, {} unchanged), {} new data stored, {:.2} s",
        stats.entries,
        human_bytes(logical),
        stats.files_read,
        stats.files_reused,
        human_bytes(stats.stored_bytes_new),
        started.elapsed().as_secs_f64()
    );
    println!("{id}");
    Ok(())
}

fn list(store: &FsSnapshotStore) -> Result<(), String> {
    let snapshots = store.list().map_err(|e| e.to_string())?;
    let rows: Vec<[String; 5]> = snapshots
        .iter()
        .map(|s| {
            [s.id.to_string(), format_utc(s.created), s.source.clone(), human_bytes(s.bytes), s.entries.to_string()]
        })
        .collect();
    let header = ["ID", "CREATED (UTC)", "SOURCE", "SIZE", "ENTRIES"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |out: &mut std::io::StdoutLock, cells: [&str; 5]| {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        )
    };
    let io = |e: std::io::Error| format!("cannot write the listing: {e}");
    line(&mut out, header).map_err(io)?;
    for row in &rows {
        line(&mut out, [&row[0], &row[1], &row[2], &row[3], &row[4]]).map_err(io)?;
    }
    Ok(())
}

/// Exports to a temporary file beside `output`, renamed into place when complete.
fn export(store: &FsSnapshotStore, id: &SnapshotId, output: &Path) -> Result<(), String> {
    let name = output.file_name().ok_or_else(|| format!("`{}` is not a file name", output.display()))?;
    let tmp = output.with_file_name(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| format!("cannot create `{}`: {e}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        store.export_tar(id, &mut w).map_err(|e| e.to_string())?;
        let file = w.into_inner().map_err(|e| format!("cannot write `{}`: {}", output.display(), e.error()))?;
        file.sync_all().map_err(|e| format!("cannot write `{}`: {e}", output.display()))?;
        std::fs::rename(&tmp, output).map_err(|e| format!("cannot write `{}`: {e}", output.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}
