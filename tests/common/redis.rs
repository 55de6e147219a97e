//! A real `redis-server` per test, on a free port, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Its working directory (AOF, RDB), removed on drop.
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts redis-server with an append-only file synced every second
    /// (Redis's default fsync): the setup `spike stock init` accepts.
    pub fn start() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "yes"])
    }

    /// Starts redis-server with persistence off, a Redis that forgets
    /// everything on restart (`spike stock init` refuses it).
    pub fn start_volatile() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// The arguments of [`RedisServer::start_durable`].
    pub const DURABLE: [&'static str; 6] = [
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ];

    /// Starts redis-server with append-only persistence, every write synced,
    /// so a restart comes back with everything it acknowledged.
    pub fn start_durable() -> RedisServer {
        Self::start_with(&Self::DURABLE)
    }

    /// The arguments of a server of a replicated group that takes a write
    /// only while `min-replicas-to-write` replicas are within
    /// `min-replicas-max-lag` seconds: what `stock init` asks of a Redis
    /// for `[redis] replicas = N` (N and the lag as given).
    pub fn replicated_args(replicas: u64, max_lag: u64) -> Vec<String> {
        [
            "--save",
            "",
            "--appendonly",
            "yes",
            "--min-replicas-to-write",
            &replicas.to_string(),
            "--min-replicas-max-lag",
            &max_lag.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A primary for `[redis] replicas = N`: append-only, and refusing
    /// writes while fewer than N replicas are within 10 s of it.
    pub fn start_primary_for(replicas: u64) -> RedisServer {
        let args = Self::replicated_args(replicas, 10);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with(&args)
    }

    /// Starts a replica of `primary` (append-only too) and returns it once
    /// its link to the primary is up.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        Self::start_replica_with(primary, &["--save", "", "--appendonly", "yes"])
    }

    /// [`RedisServer::start_replica_of`] with the replica's own arguments
    /// (`--replicaof` is added), e.g. [`RedisServer::replicated_args`] so
    /// that it keeps the rule once Sentinel promotes it.
    pub fn start_replica_with(primary: &RedisServer, args: &[&str]) -> RedisServer {
        let port = primary.port.to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--replicaof", "127.0.0.1", &port]);
        let replica = Self::start_with(&all);
        let start = Instant::now();
        loop {
            let mut c = replica.connection().expect("replica connection");
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut c)
                .expect("INFO");
            if info.contains("master_link_status:up") {
                return replica;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the replica did not sync: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts redis-server with extra arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "spike-redis-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut s = RedisServer {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn_on_free_port();
        s
    }

    fn spawn_on_free_port(&mut self) {
        // Another process may grab the port between our probe and redis's
        // bind, so try a few ports.
        for _ in 0..5 {
            let port = if self.port == 0 {
                super::free_port()
            } else {
                self.port
            };
            let child = Command::new("redis-server")
                .arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&self.dir)
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (run scripts/test.sh)");
            self.child = Some(child);
            self.port = port;
            if self.wait_ready(Duration::from_secs(5)) {
                return;
            }
            self.kill();
            self.port = 0;
        }
        panic!("redis-server did not start");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            if let Ok(mut c) = self.connection() {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query(&mut c);
                if pong.is_ok() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The URL a spike config should use.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A blocking connection for checks from the test.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection()
    }

    /// A whole hash (`HGETALL`), for checks on what a sale wrote.
    pub fn hash<V: redis::FromRedisValue>(
        &self,
        key: &str,
    ) -> std::collections::HashMap<String, V> {
        let mut c = self.connection().expect("redis connection");
        redis::cmd("HGETALL")
            .arg(key)
            .query(&mut c)
            .expect("HGETALL")
    }

    /// The OS pid, for SIGSTOP/SIGCONT.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// Sends a signal to redis-server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} redis-server");
    }

    /// Stops redis-server for good (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory, with other extra
    /// arguments from now on.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        loop {
            let child = Command::new("redis-server")
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&self.dir)
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.child = Some(child);
            if self.wait_ready(Duration::from_secs(5)) {
                return;
            }
            self.kill();
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A stopped server ignores SIGKILL until continued on some kernels.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway PKI made with the `openssl` CLI in a fresh directory
/// (removed on drop): a CA, a server certificate for 127.0.0.1 and
/// localhost, and a client certificate, all signed by the CA. A second
/// one is an unrelated CA, whose certificates must be refused.
pub struct TestPki {
    /// The directory holding every file.
    pub dir: PathBuf,
}

/// `openssl req`'s arguments for a new EC P-256 key without a passphrase.
const EC_P256: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

impl TestPki {
    /// Makes the files (EC P-256 keys: quick to generate).
    pub fn new() -> TestPki {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("spike-pki-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create pki dir");
        let pki = TestPki { dir };
        pki.openssl(
            &[
                &["req", "-x509"],
                &EC_P256[..],
                &["-keyout", "ca.key", "-out", "ca.crt"],
            ]
            .concat(),
            "/CN=spike-test-ca",
        );
        pki.issue(
            "server",
            "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        );
        pki.issue(
            "client",
            "/CN=spike-test-client",
            "extendedKeyUsage=clientAuth",
        );
        pki
    }

    /// Makes `NAME.key` and `NAME.crt` (an EC P-256 key, a certificate
    /// for `cn` signed by the CA, with the extension line `ext`, such as
    /// `subjectAltName=DNS:shop.test`).
    pub fn issue(&self, name: &str, cn: &str, ext: &str) {
        let (key, csr, crt, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(self.dir.join(&extfile), format!("{ext}\n")).expect("write ext");
        self.openssl(
            &[&["req"], &EC_P256[..], &["-keyout", &key, "-out", &csr]].concat(),
            cn,
        );
        self.openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &extfile,
            ],
            "",
        );
    }

    fn openssl(&self, args: &[&str], subject: &str) {
        let mut cmd = Command::new("openssl");
        cmd.args(args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !subject.is_empty() {
            cmd.args(["-subj", subject, "-days", "2"]);
        }
        let ok = cmd
            .status()
            .expect("openssl must be installed (run scripts/test.sh)")
            .success();
        assert!(ok, "openssl {args:?} failed");
    }

    /// The path of one of its files (`ca.crt`, `server.key`, `client.crt`…).
    pub fn file(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServer {
    /// Starts redis-server (append-only, as [`RedisServer::start`]) with a
    /// TLS port beside its plaintext one, its certificate from `pki`;
    /// `auth_clients` makes it demand a client certificate signed by
    /// `pki`'s CA. Returns it and its TLS port. (The plaintext port, the
    /// one [`RedisServer::url`] names, is for the test's own checks.)
    pub fn start_tls(pki: &TestPki, auth_clients: bool) -> (RedisServer, u16) {
        let tls_port = super::free_port().to_string();
        let (cert, key, ca) = (
            pki.file("server.crt"),
            pki.file("server.key"),
            pki.file("ca.crt"),
        );
        let redis = Self::start_with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" },
        ]);
        (redis, tls_port.parse().expect("port"))
    }
}
