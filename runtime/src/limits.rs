//! Resource limits of a process, and the store-side limiter that enforces the memory one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits applied to every process of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of linear memory (all memories of the process together).
    pub max_memory: Option<u64>,
    /// Wall-clock time from start to exit.
    pub timeout: Option<Duration>,
    /// Time spent executing wasm, counted in epoch ticks (host calls do not count).
    pub cpu_time: Option<Duration>,
    /// Bytes retained per output stream (stdout, stderr) of a process.
    pub output_buffer: usize,
    /// Elements across all tables of the process.
    pub max_table_elements: u64,
    /// Cores of wasm execution the sandbox's processes share (clones share the quota).
    pub cpus: Option<CpuQuota>,
    /// Descriptors a process may have open beyond those it starts with (stdio,
    /// preopens): each one is a host descriptor, and the host has a finite number.
    pub max_open_files: u32,
    /// Processes of the sandbox running at once.
    pub max_processes: u32,
    /// Bytes the sandbox's tree may hold (clones share the account), enforced on what its
    /// guests (core modules and components) write through WASI.
    pub disk: Option<crate::disk_quota::DiskQuota>,
}

/// Open descriptors per process by default: enough for compilers and interpreters, and
/// 64 processes of a sandbox at the bound stay far from a host's file limit.
pub const DEFAULT_MAX_OPEN_FILES: u32 = 256;
/// Running processes per sandbox by default.
pub const DEFAULT_MAX_PROCESSES_PER_SANDBOX: u32 = 64;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: None,
            timeout: None,
            cpu_time: None,
            output_buffer: crate::stdio::DEFAULT_OUTPUT_CAPACITY,
            max_table_elements: 1 << 20,
            cpus: None,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_processes: DEFAULT_MAX_PROCESSES_PER_SANDBOX,
            disk: None,
        }
    }
}

/// Raises this process's open-file limit to its hard limit, so the per-process bounds
/// of guests ([`Limits::max_open_files`]) are what binds, not a 1,024 soft default
/// shared by every sandbox of a server. Returns the limit now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

/// A share of the host's cores for every process of a sandbox together, enforced as
/// cgroups' `cpu.max` does: in each period of [`CPU_PERIOD`] the processes may spend
/// `cpus` x the period executing wasm (each charges the time it ran at every epoch tick);
/// past it, each one sleeps until the period in which its sandbox is back within quota.
/// So over any second they get at most `cpus` cores; host calls, blocking included, cost
/// nothing, as with `cpu_time`. (A token bucket that made each process sleep off the
/// whole debt let every sleeper pay for the others: two guests got half their share.)
#[derive(Clone)]
pub struct CpuQuota {
    cpus: f64,
    periods: Arc<Mutex<Periods>>,
}

struct Periods {
    start: Instant,
    /// Execution charged to the current period, in nanoseconds (past the quota, a debt
    /// that later periods pay).
    used: f64,
}

pub const CPU_PERIOD: Duration = Duration::from_millis(100);

impl CpuQuota {
    /// `cpus` must be positive and finite (the API checks what callers send).
    pub fn new(cpus: f64) -> CpuQuota {
        assert!(cpus.is_finite() && cpus > 0.0, "a CPU quota of {cpus} cores");
        CpuQuota { cpus, periods: Arc::new(Mutex::new(Periods { start: Instant::now(), used: 0.0 })) }
    }

    pub fn cpus(&self) -> f64 {
        self.cpus
    }

    /// Charges `spent` of execution; answers how long the caller must sleep to stay within
    /// the quota, if at all.
    pub(crate) fn charge(&self, spent: Duration) -> Option<Duration> {
        let mut periods = self.periods.lock().expect("CPU quota lock");
        let now = Instant::now();
        let period = CPU_PERIOD.as_nanos() as f64;
        let quota = period * self.cpus;
        let passed = (now.duration_since(periods.start).as_nanos() as f64 / period).floor();
        if passed >= 1.0 {
            periods.start += CPU_PERIOD.mul_f64(passed);
            periods.used = (periods.used - passed * quota).max(0.0);
        }
        periods.used += spent.as_nanos() as f64;
        let owed = (periods.used / quota).floor();
        (owed >= 1.0).then(|| (periods.start + CPU_PERIOD.mul_f64(owed)).saturating_duration_since(now))
    }
}

impl std::fmt::Debug for CpuQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuQuota({} cores)", self.cpus)
    }
}

/// Two quotas are the same when they are one account (a sandbox's).
impl PartialEq for CpuQuota {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.periods, &other.periods)
    }
}

impl Eq for CpuQuota {}

/// The guest asked for more memory than its limit allows.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("memory limit exceeded: the guest asked for {requested} bytes of linear memory, its limit is {limit} bytes")]
pub struct MemoryLimitExceeded {
    pub requested: u64,
    pub limit: u64,
}

/// Counts memory and table growth across the whole store.
///
/// Exceeding the memory limit is a trap rather than a failed `memory.grow`: a guest that
/// hits its limit ends with a clear cause, as a process killed by the OOM killer would,
/// instead of failing somewhere later in a way that hides why.
pub(crate) struct StoreLimiter {
    max_memory: Option<u64>,
    max_table_elements: u64,
    memory_in_use: u64,
    table_elements: u64,
}

impl StoreLimiter {
    pub(crate) fn new(limits: &Limits) -> Self {
        StoreLimiter {
            max_memory: limits.max_memory,
            max_table_elements: limits.max_table_elements,
            memory_in_use: 0,
            table_elements: 0,
        }
    }
}

impl StoreLimiter {
    /// Whether memories of `bytes` in all could be made within the limit (checked before
    /// a restore makes memories at an image's sizes, so a crafted image claiming more
    /// never gets them made).
    pub(crate) fn admits(&self, bytes: u64) -> Result<(), MemoryLimitExceeded> {
        match self.max_memory {
            Some(limit) if bytes > limit => Err(MemoryLimitExceeded { requested: bytes, limit }),
            _ => Ok(()),
        }
    }

    /// Counts memory a restore created beyond what its modules asked for (a memory the
    /// host made at its captured size, which the limiter only saw at its minimum).
    pub(crate) fn restored(&mut self, extra: u64) -> Result<(), MemoryLimitExceeded> {
        let requested = self.memory_in_use.saturating_add(extra);
        if let Some(limit) = self.max_memory
            && requested > limit
        {
            return Err(MemoryLimitExceeded { requested, limit });
        }
        self.memory_in_use = requested;
        Ok(())
    }
}

impl wasmtime::ResourceLimiter for StoreLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let requested = self.memory_in_use - current as u64 + desired as u64;
        if let Some(limit) = self.max_memory
            && requested > limit
        {
            return Err(MemoryLimitExceeded { requested, limit }.into());
        }
        self.memory_in_use = requested;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let requested = self.table_elements - current as u64 + desired as u64;
        if requested > self.max_table_elements {
            return Ok(false);
        }
        self.table_elements = requested;
        Ok(true)
    }

    fn instances(&self) -> usize {
        // Components instantiate a few dozen core instances (adapters, shims).
        1000
    }

    fn memories(&self) -> usize {
        100
    }

    fn tables(&self) -> usize {
        1000
    }
}

/// Parses a byte size as written on a command line: `65536`, `64K`, `64M`, `1G`, `512MiB`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("invalid size `{text}`: expected a number such as 64M"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("invalid size `{text}`: unknown unit `{other}` (use K, M or G)")),
    };
    n.checked_mul(multiplier).ok_or_else(|| format!("invalid size `{text}`: too large"))
}

/// Parses a duration: `2s`, `500ms`, `1m`, `1.5s`, `250us`, `3h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("invalid duration `{text}`: expected e.g. 2s or 500ms"))?;
    let seconds = match unit.trim() {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("invalid duration `{text}`: unknown unit `{other}` (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("invalid duration `{text}`: out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("64M"), Ok(64 << 20));
        assert_eq!(parse_byte_size("65536"), Ok(65536));
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("2k"), Ok(2048));
        assert!(parse_byte_size("12Q").unwrap_err().contains("unknown unit `q`"));
        assert!(parse_byte_size("M").is_err());
        assert!(parse_byte_size("99999999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory_limit_counts_all_memories_together() {
        let mut limiter = StoreLimiter::new(&Limits { max_memory: Some(3 << 16), ..Limits::default() });
        assert!(limiter.memory_growing(0, 1 << 16, None).unwrap());
        assert!(limiter.memory_growing(0, 2 << 16, None).unwrap());
        let err = limiter.memory_growing(1 << 16, 2 << 16, None).unwrap_err();
        let err = err.downcast_ref::<MemoryLimitExceeded>().unwrap();
        assert_eq!(err.requested, 4 << 16);
    }
}
