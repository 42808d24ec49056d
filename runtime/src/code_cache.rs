//! On-disk cache of compiled code.
//!
//! Compiling a program is the expensive part of starting it (a 99 MB CPython takes ~40 s),
//! so the compiled artifact is kept on disk, keyed by the blake3 hash of the wasm bytes
//! and a hash of everything in the engine configuration that affects code generation.
//! A later start maps the artifact from the file (`deserialize_file`) and compiles nothing.
//!
//! Trust: loading an artifact runs its machine code, so the cache directory must be
//! writable only by the host (it lives in the data directory, which guests never see).
//! Artifacts are written under a temporary name and renamed into place, so a crash never
//! leaves a half-written file under a real name; one that fails to load is recompiled.
//!
//! Compiling itself happens in a child process under a budget when the host has a
//! [`CompileWorker`] (see `compile_worker`), else in this process.

use crate::compile_worker::{self, CompileBudget, CompileFailure, CompileWorker, EngineSettings};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Which of the two kinds of wasm binary the bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramFormat {
    /// A core module (wasip1).
    Module,
    /// A component (wasip2).
    Component,
}

pub(crate) enum Compiled {
    Module(Module),
    Component(Component),
}

pub(crate) struct CodeCache {
    dir: Option<PathBuf>,
    /// Hex digest of the engine's compatibility hash.
    engine_key: String,
    /// Where compilations run: in a child under a budget, or (`None`) here.
    isolated: Option<Isolated>,
    /// Bytes the directory may hold; past it the least recently used artifacts go.
    max_bytes: Option<u64>,
}

/// A child process compiles, for an engine configured with `settings`.
#[derive(Clone)]
pub(crate) struct Isolated {
    pub worker: CompileWorker,
    pub budget: CompileBudget,
    pub settings: EngineSettings,
}

/// Feeds `std::hash::Hash` into blake3, so the key is stable across runs and builds.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        u64::from_le_bytes(self.0.finalize().as_bytes()[..8].try_into().unwrap())
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl CodeCache {
    pub(crate) fn new(
        engine: &Engine,
        dir: Option<PathBuf>,
        checkpoints: bool,
        isolated: Option<Isolated>,
        max_bytes: Option<u64>,
    ) -> Self {
        let mut hasher = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        // Core modules are compiled as rewritten by `state_export`: a new rewrite is new code.
        hasher.write(crate::state_export::REWRITE_VERSION.as_bytes());
        // Modules compiled through the unwind transform differ, and so do their images.
        if checkpoints {
            hasher.write(crate::unwind::TRANSFORM_VERSION.as_bytes());
        }
        let engine_key = hasher.0.finalize().to_hex()[..16].to_string();
        CodeCache { dir, engine_key, isolated, max_bytes }
    }

    /// A short fingerprint of the engine configuration; images record it.
    pub(crate) fn engine_key(&self) -> &str {
        &self.engine_key
    }

    fn artifact_path(&self, hash: &blake3::Hash, format: ProgramFormat) -> Option<PathBuf> {
        let ext = match format {
            ProgramFormat::Module => "cwasm",
            ProgramFormat::Component => "ccwasm",
        };
        self.dir.as_ref().map(|dir| dir.join(format!("{}-{}.{ext}", hash.to_hex(), self.engine_key)))
    }

    /// Maps the stored artifact at `path`.
    fn load_artifact(engine: &Engine, path: &Path, format: ProgramFormat) -> wasmtime::Result<Compiled> {
        // SAFETY: the artifact was produced by this engine configuration (the key is
        // in its name) and the cache directory is host-private; see the module docs.
        unsafe {
            match format {
                ProgramFormat::Module => Module::deserialize_file(engine, path).map(Compiled::Module),
                ProgramFormat::Component => Component::deserialize_file(engine, path).map(Compiled::Component),
            }
        }
    }

    /// The compiled artifact of program `hash`, if the cache has a loadable one.
    pub(crate) fn cached(&self, engine: &Engine, hash: &blake3::Hash, format: ProgramFormat) -> Option<Compiled> {
        let path = self.artifact_path(hash, format).filter(|p| p.exists())?;
        let compiled = Self::load_artifact(engine, &path, format).ok()?;
        touch(&path);
        Some(compiled)
    }

    /// Deletes the least recently used files (by modification time, which a load
    /// refreshes) until the directory is within `max_bytes`, sparing `keep`. An artifact
    /// in use stays mapped: deleting its file frees the space once nothing maps it.
    fn enforce_bound(&self, keep: &Path) {
        let (Some(dir), Some(max)) = (&self.dir, self.max_bytes) else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= max {
                break;
            }
            // A program's note goes with its artifact (same stem), so neither outlives the other.
            if path == keep || path.with_extension("cwasm") == keep {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::debug!(path = %path.display(), "code cache over its bound: removed");
                total -= len;
            }
        }
    }

    /// Where the note of a core module's artifact lives (see [`CodeCache::note`]).
    fn note_path(&self, hash: &blake3::Hash) -> Option<PathBuf> {
        self.artifact_path(hash, ProgramFormat::Module).map(|p| p.with_extension("note"))
    }

    /// Reads what was stored next to program `hash`'s artifact with [`CodeCache::store_note`]
    /// (e.g. the layouts the load-time rewrites produced, so a cached load skips them).
    pub(crate) fn note<T: serde::de::DeserializeOwned>(&self, hash: &blake3::Hash) -> Option<T> {
        let bytes = std::fs::read(self.note_path(hash)?).ok()?;
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).ok().map(|(value, _)| value)
    }

    pub(crate) fn store_note<T: serde::Serialize>(&self, hash: &blake3::Hash, value: &T) {
        let Some(path) = self.note_path(hash) else { return };
        let Ok(bytes) = bincode::serde::encode_to_vec(value, bincode::config::standard()) else { return };
        if let Err(err) = write_atomically(&path, &bytes) {
            tracing::warn!(path = %path.display(), "cannot store the program's layout: {err}");
        }
    }

    /// One of the host's own helper modules (WAT written here, so trusted and tiny): from
    /// the cache when it is there, else compiled in this process and stored. Compiling
    /// them at every start was most of `stasis run`'s own start-up work.
    pub(crate) fn internal_module(&self, engine: &Engine, wat: &str) -> wasmtime::Result<Module> {
        let hash = blake3::Hasher::new().update(b"stasis-internal:").update(wat.as_bytes()).finalize();
        if let Some(Compiled::Module(module)) = self.cached(engine, &hash, ProgramFormat::Module) {
            return Ok(module);
        }
        let module = Module::new(engine, wat)?;
        if let Some(path) = self.artifact_path(&hash, ProgramFormat::Module) {
            // A cache that cannot be written costs speed, not correctness.
            match module.serialize().map_err(std::io::Error::other).and_then(|s| write_atomically(&path, &s)) {
                Ok(()) => self.enforce_bound(&path),
                Err(err) => tracing::warn!(path = %path.display(), "cannot store a helper module: {err}"),
            }
        }
        Ok(module)
    }

    /// Loads the compiled artifact for `bytes`, compiling and storing it on a miss.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &blake3::Hash,
        format: ProgramFormat,
    ) -> Result<Compiled, CompileFailure> {
        let path = self.artifact_path(hash, format);
        if let Some(path) = &path
            && path.exists()
        {
            match Self::load_artifact(engine, path, format) {
                Ok(compiled) => {
                    touch(path);
                    return Ok(compiled);
                }
                Err(err) => tracing::warn!(path = %path.display(), "discarding unloadable compiled artifact: {err}"),
            }
        }
        if let Some(isolated) = &self.isolated {
            return self.compile_isolated(isolated, engine, bytes, format, path);
        }
        let invalid = |e: wasmtime::Error| CompileFailure::Invalid(format!("{e:#}"));
        let compiled = match format {
            ProgramFormat::Module => Compiled::Module(Module::new(engine, bytes).map_err(invalid)?),
            ProgramFormat::Component => Compiled::Component(Component::new(engine, bytes).map_err(invalid)?),
        };
        if let Some(path) = path {
            let serialized = match &compiled {
                Compiled::Module(m) => m.serialize(),
                Compiled::Component(c) => c.serialize(),
            };
            match serialized.map_err(std::io::Error::other).and_then(|s| write_atomically(&path, &s)) {
                Ok(()) => self.enforce_bound(&path),
                // A cache that cannot be written costs speed, not correctness.
                Err(err) => tracing::warn!(path = %path.display(), "cannot store compiled artifact: {err}"),
            }
        }
        Ok(compiled)
    }

    /// Compiles in a child straight into the cache (or, without a cache directory, into a
    /// temporary one), then maps the artifact as a cache hit does.
    fn compile_isolated(
        &self,
        isolated: &Isolated,
        engine: &Engine,
        bytes: &[u8],
        format: ProgramFormat,
        path: Option<PathBuf>,
    ) -> Result<Compiled, CompileFailure> {
        let scratch;
        let path = match path {
            Some(path) => path,
            None => {
                scratch =
                    tempfile::tempdir().map_err(|e| CompileFailure::Worker(format!("temporary directory: {e}")))?;
                scratch.path().join("artifact")
            }
        };
        let stats =
            compile_worker::compile(&isolated.worker, isolated.budget, isolated.settings, bytes, format, &path)?;
        tracing::info!(
            bytes = bytes.len(),
            seconds = stats.wall.as_secs_f64(),
            peak_rss_mib = stats.peak_rss >> 20,
            "compiled in a worker"
        );
        self.enforce_bound(&path);
        // A mapped artifact stays valid once its file is gone (the temporary case).
        Self::load_artifact(engine, &path, format)
            .map_err(|e| CompileFailure::Worker(format!("loading what the worker compiled: {e:#}")))
    }
}

/// Marks `path` as just used, for the least-recently-used bound.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced and
/// renamed, so `path` either does not exist or holds all of `bytes`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (func (export "f") (result i32) i32.const 7))"#;

    fn call_f(engine: &Engine, module: &Module) -> i32 {
        let mut store = wasmtime::Store::new(engine, ());
        let instance = wasmtime::Instance::new(&mut store, module, &[]).unwrap();
        instance.get_typed_func::<(), i32>(&mut store, "f").unwrap().call(&mut store, ()).unwrap()
    }

    #[test]
    fn helper_modules_are_compiled_once_and_a_corrupt_artifact_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CodeCache::new(&engine, Some(dir.path().into()), false, None, None);
        let first = cache.internal_module(&engine, WAT).unwrap();
        assert_eq!(call_f(&engine, &first), 7);
        let files: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let stored = std::fs::read(&files[0]).unwrap();
        // The next start maps the stored artifact: the file is left as it was.
        let second = cache.internal_module(&engine, WAT).unwrap();
        assert_eq!(call_f(&engine, &second), 7);
        assert_eq!(std::fs::read(&files[0]).unwrap(), stored);
        // A torn or foreign file is compiled over, not trusted. (Written in place only once
        // nothing maps it: the cache itself only ever renames new files into place.)
        drop(second);
        std::fs::write(&files[0], b"not an artifact").unwrap();
        let third = cache.internal_module(&engine, WAT).unwrap();
        assert_eq!(call_f(&engine, &third), 7);
        assert_eq!(std::fs::read(&files[0]).unwrap(), stored);
    }
}
