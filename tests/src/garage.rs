//! A real S3-compatible object store on loopback for multi-node tests: Garage
//! (`cargo install garage`, see `.ci/run`), one node, one bucket, one key.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;

/// The `garage` binary: `$GARAGE_BIN`, else `garage` on `PATH`. `None` if there is none
/// (the tests that need it then say so and pass, except under CI, where they fail).
pub fn garage_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        return Some(bin.into());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join("garage")).find(|p| p.is_file())
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub const BUCKET: &str = "stasis";
pub const REGION: &str = "garage";

/// A one-node Garage cluster with bucket [`BUCKET`]; killed when dropped.
pub struct Garage {
    child: Child,
    config: PathBuf,
    bin: PathBuf,
    /// `http://127.0.0.1:PORT`: its S3 API.
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    _dir: tempfile::TempDir,
}

impl Garage {
    /// Starts Garage, or `None` when it is not installed outside CI.
    pub fn start() -> Option<Garage> {
        let Some(bin) = garage_bin() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "garage is not installed (GARAGE_BIN or PATH); .ci/run installs it"
            );
            eprintln!("skipping: garage is not installed (set GARAGE_BIN or put it on PATH)");
            return None;
        };
        // Ports are picked free and then bound by Garage: another test may take one in
        // between, so a failed setup is tried again from scratch.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(garage) => return Some(garage),
                Err(e) => failures.push(e),
            }
        }
        panic!("garage could not be set up three times: {failures:#?}");
    }

    fn try_start(bin: &std::path::Path) -> Result<Garage, String> {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret)).unwrap();
        let rpc_secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 compression_level = \"none\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning garage");
        let mut garage = Garage {
            child,
            config,
            bin: bin.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
            _dir: dir,
        };
        // `node id` reads the node's key from disk; `status` answers once its RPC is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = garage.try_cli(&["status"]) {
            if Instant::now() > deadline {
                return Err(format!("garage did not start: {e}\n{}", garage.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let id = garage.try_cli(&["node", "id", "-q"])?;
        let node = id.trim().split('@').next().unwrap_or_default().to_string();
        garage.try_cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &node])?;
        garage.try_cli(&["layout", "apply", "--version", "1"])?;
        garage.try_cli(&["bucket", "create", BUCKET])?;
        let key = garage.try_cli(&["key", "create", "stasis-test"])?;
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("no `{name}` in {key}"))
        };
        garage.key_id = field("Key ID:")?;
        garage.secret = field("Secret key:")?;
        garage.try_cli(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "stasis-test"])?;
        Ok(garage)
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin).arg("-c").arg(&self.config).args(args).output().unwrap();
        let text = crate::text(&out.stdout) + &crate::text(&out.stderr);
        if out.status.success() { Ok(text) } else { Err(format!("garage {args:?}: {text}")) }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("garage.log")).unwrap_or_default()
    }

    /// `stasis serve` arguments that share snapshots through this bucket.
    pub fn serve_args(&self) -> Vec<String> {
        ["--remote", &format!("s3://{BUCKET}"), "--remote-endpoint", &self.endpoint, "--remote-region", REGION]
            .map(String::from)
            .to_vec()
    }

    /// `stasis remote gc` on this bucket.
    pub fn gc(&self) -> std::process::Output {
        let mut cmd = Command::new(crate::stasis_bin());
        cmd.args(["remote", "gc"]).args(self.serve_args()).envs(self.env());
        crate::run(cmd)
    }

    /// The credentials, as `stasis serve` reads them.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("AWS_ACCESS_KEY_ID", self.key_id.clone()), ("AWS_SECRET_ACCESS_KEY", self.secret.clone())]
    }

    /// A client of the bucket, for tests that look inside it or damage it.
    pub fn bucket(&self) -> Bucket {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region(REGION)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Bucket { store: Arc::new(store), rt }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking view of the bucket.
pub struct Bucket {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl Bucket {
    /// Keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use futures_util::TryStreamExt;
        let prefix = object_store::path::Path::from(prefix);
        let mut keys: Vec<String> =
            self.rt.block_on(self.store.list(Some(&prefix)).map_ok(|m| m.location.to_string()).try_collect()).unwrap();
        keys.sort();
        keys
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt.block_on(self.store.put(&key.into(), bytes.into())).unwrap();
    }

    pub fn delete(&self, key: &str) {
        self.rt.block_on(self.store.delete(&key.into())).unwrap();
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        self.rt.block_on(async { self.store.get(&key.into()).await.unwrap().bytes().await.unwrap().to_vec() })
    }
}
