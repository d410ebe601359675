//! Helpers shared by the end-to-end tests: real `girder` processes on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

pub const GIRDER: &str = env!("CARGO_BIN_EXE_girder");

/// A `girder node` child process, killed when dropped.
pub struct NodeProcess {
    child: Child,
    pub url: String,
}

impl NodeProcess {
    /// Starts `girder node` on a free port with `args`, and waits until it listens.
    pub fn start(args: &[&str]) -> NodeProcess {
        let mut child = Command::new(GIRDER)
            .args(["node", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("girder binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        // The node prints its address once it listens: that line is the ready signal.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("node prints its address");
        let url = line.split_whitespace().last().unwrap_or_default().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "girder node {args:?} did not start; first line: {line:?}");
        NodeProcess { child, url }
    }

    /// Starts a node `id` on the Redis statekeeper at `url` with a short lease (1.5 s,
    /// heartbeat 250 ms), so failure tests run quickly, and `extra` arguments.
    pub fn on_redis(url: &str, id: &str, extra: &[&str]) -> NodeProcess {
        let base = ["--statekeeper", url, "--id", id, "--node-ttl-ms", "1500", "--heartbeat-ms", "250"];
        NodeProcess::start(&[&base[..], extra].concat())
    }

    /// Runs `girder call ARGS --node URL`.
    pub fn call(&self, args: &[&str]) -> Output {
        Command::new(GIRDER).arg("call").args(args).args(["--node", &self.url]).output().expect("girder call runs")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// Sends SIGTERM and waits at most `timeout` for the process to exit; whether it did.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> bool {
        self.signal("TERM");
        let begun = std::time::Instant::now();
        while begun.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Kills the process with SIGKILL: no goodbye, no deregistration.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

pub mod hygiene;

/// A fresh directory under the system's temp dir (a node's data directory, say), removed
/// when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// A new empty directory whose name contains `name`.
    pub fn new(name: &str) -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("girder-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.0
    }

    /// The directory as a string (for command lines).
    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp dir")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
