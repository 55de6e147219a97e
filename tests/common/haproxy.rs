//! HAProxy (Debian's `haproxy`, installed by scripts/test.sh) for the tests
//! that compare with it or put it in front of spike.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where the `haproxy` binary is.
pub fn haproxy() -> PathBuf {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("haproxy must be installed for these tests (run scripts/test.sh)")
}

/// A HAProxy process in the foreground, killed on drop.
pub struct HaProxy(pub Child);

impl HaProxy {
    /// Runs `haproxy -f CFG -db` (in the foreground, its log on stderr).
    pub fn start(cfg: &Path) -> HaProxy {
        HaProxy(
            Command::new(haproxy())
                .arg("-f")
                .arg(cfg)
                .arg("-db")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start haproxy"),
        )
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
