//! Redis Sentinel for the failover tests: three `redis-server --sentinel`
//! processes on free ports watching one primary, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One Sentinel process (`redis-server CONF --sentinel`), killed on drop.
pub struct Sentinel {
    child: Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl Sentinel {
    /// Starts a Sentinel watching `primary` as `service` (quorum 2, down
    /// after 1 s).
    pub fn start(service: &str, primary: u16) -> Sentinel {
        let port = super::free_port();
        let dir =
            std::env::temp_dir().join(format!("spike-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        // Sentinel rewrites its file, so each has its own.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {service} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir.display()
            ),
        )
        .expect("sentinel conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run scripts/test.sh)");
        Sentinel { child, port, dir }
    }

    /// Sends `SENTINEL args...`.
    pub fn ask(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut c =
            redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?.get_connection()?;
        redis::cmd("SENTINEL").arg(args).query(&mut c)
    }

    /// The primary this Sentinel names for `service`, as a port.
    pub fn primary(&self, service: &str) -> Option<u16> {
        match self.ask(&["get-master-addr-by-name", service]) {
            Ok(redis::Value::Array(parts)) => match parts.get(1) {
                Some(redis::Value::BulkString(p)) => String::from_utf8_lossy(p).parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether it knows the other two Sentinels and the replica.
    pub fn settled(&self, service: &str) -> bool {
        self.settled_with(service, 1)
    }

    /// Whether it knows the other two Sentinels and `replicas` replicas.
    pub fn settled_with(&self, service: &str, replicas: u64) -> bool {
        let Ok(redis::Value::Array(fields)) = self.ask(&["master", service]) else {
            return false;
        };
        let text: Vec<String> = fields
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        let field = |name: &str| {
            text.iter()
                .position(|f| f == name)
                .and_then(|i| text.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        field("num-other-sentinels") == Some(2) && field("num-slaves") == Some(replicas)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks `check` every 100 ms until it holds; fails naming `what` after
/// `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
