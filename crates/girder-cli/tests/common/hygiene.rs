//! Helpers for the HTTP hygiene tests: nodes whose stderr is kept in a file, raw TCP
//! clients that misbehave on purpose, and certificates made at run time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::GIRDER;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "girder-{name}-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A `girder node` child whose stderr goes to a file; killed when dropped.
pub struct LoggedNode {
    child: Child,
    /// Its base URL, `http://` or `https://`.
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    stderr: PathBuf,
}

impl LoggedNode {
    /// Starts `girder node --listen 127.0.0.1:0 ARGS` with `envs`, waits until it listens.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> LoggedNode {
        use std::io::{BufRead, BufReader};
        let stderr = temp_dir("node-stderr").join("stderr");
        let mut child = Command::new(GIRDER)
            .args(["node", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("girder node starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("address line");
        let url = line.split_whitespace().last().unwrap_or_default().to_owned();
        let Some(addr) = url.split("://").nth(1).and_then(|a| a.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&stderr).unwrap_or_default();
            panic!("girder node {args:?} did not start; first line {line:?}; stderr:\n{log}");
        };
        LoggedNode { child, url, addr, stderr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the node wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most 30 s) for the process to exit; returns how long it
    /// took and how it exited.
    pub fn terminate(&mut self) -> (Duration, Option<ExitStatus>) {
        let begun = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (begun.elapsed(), Some(status));
            }
            if begun.elapsed() > Duration::from_secs(30) {
                return (begun.elapsed(), None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `addr` with `timeout` on reads and writes.
pub fn connect(addr: SocketAddr, timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connects");
    stream.set_read_timeout(Some(timeout)).expect("read timeout");
    stream.set_write_timeout(Some(timeout)).expect("write timeout");
    stream
}

/// Reads from `stream` until the peer closes it (or `limit` passes); returns what was read
/// and when it closed (`None`: still open at `limit`).
pub fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let begun = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    stream.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Some(begun.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // Reset by the peer: closed too.
            Err(_) => return (got, Some(begun.elapsed())),
        }
        if begun.elapsed() > limit {
            return (got, None);
        }
    }
}

/// Writes `bytes` one at a time, `every` apart, on a thread, until the peer closes the
/// connection or `bytes` run out.
pub fn trickle(mut stream: TcpStream, bytes: Vec<u8>, every: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for byte in bytes {
            if stream.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    })
}

/// The status code of the first response in `bytes`, skipping none.
pub fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The body of the first response in `bytes` (after the blank line).
pub fn body_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// A self-signed certificate for 127.0.0.1 and localhost, as `cert.pem` and `key.pem` in
/// `dir`.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert.pem");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key.pem");
    (cert, key)
}

/// Raises this process's soft limit of open files to its hard limit; returns the limit.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).expect("the open-files limit can be raised")
}
