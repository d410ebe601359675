//! Test support: a real `redis-server` on a free loopback port in a temporary directory,
//! stopped when dropped. Used by girder's own tests and benchmarks; no mocks of Redis.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a Redis server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    /// The binary is not installed.
    #[error("redis-server is not installed: install it with `apt-get install redis-server` (scripts/test does)")]
    NotInstalled,
    /// Anything else.
    #[error("cannot start redis-server: {0}")]
    Start(String),
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    appendonly: bool,
    tls: bool,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

fn free_port() -> Result<u16, RedisServerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| RedisServerError::Start(e.to_string()))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| RedisServerError::Start(e.to_string()))
}

impl RedisServer {
    /// Starts a server on a free port; with `appendonly` it persists every write to an AOF
    /// in its directory, so a restart keeps the data.
    pub fn start(appendonly: bool) -> Result<RedisServer, RedisServerError> {
        let mut server = RedisServer::start_stopped()?;
        server.appendonly = appendonly;
        server.spawn()?;
        Ok(server)
    }

    /// Starts a server that only speaks TLS, with a self-signed certificate made by
    /// `openssl` in its directory. Its URL is `rediss://...#insecure`.
    pub fn start_tls() -> Result<RedisServer, RedisServerError> {
        let mut server = RedisServer::start_stopped()?;
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(server.dir.join("key.pem"))
            .arg("-out")
            .arg(server.dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| RedisServerError::Start(format!("openssl (apt-get install openssl): {e}")))?;
        if !status.success() {
            return Err(RedisServerError::Start("openssl could not make a certificate".into()));
        }
        server.tls = true;
        server.spawn()?;
        Ok(server)
    }

    fn start_stopped() -> Result<RedisServer, RedisServerError> {
        let dir = std::env::temp_dir().join(format!(
            "girder-redis-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| RedisServerError::Start(e.to_string()))?;
        Ok(RedisServer { child: None, port: free_port()?, dir, appendonly: false, tls: false })
    }

    fn spawn(&mut self) -> Result<(), RedisServerError> {
        let mut command = Command::new("redis-server");
        if self.tls {
            let (cert, key) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
            command.args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"]);
            command
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&cert);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        let mut child = command
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RedisServerError::NotInstalled,
                _ => RedisServerError::Start(e.to_string()),
            })?;
        let stdout = child.stdout.take().ok_or_else(|| RedisServerError::Start("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        // The server says when it accepts connections: that line is the readiness signal.
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Ready to accept connections") => break,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    return Err(RedisServerError::Start(format!("redis-server on port {} exited early", self.port)));
                }
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
        Ok(())
    }

    /// The server's URL, `redis://127.0.0.1:PORT/0` (`rediss://...#insecure` with TLS).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://127.0.0.1:{}/0#insecure", self.port)
        } else {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let sent = Command::new("kill").arg(signal).arg(child.id().to_string()).status();
            if !sent.is_ok_and(|s| s.success()) {
                tracing::warn!(signal, "could not signal redis-server");
            }
        }
    }

    /// Stops the server abruptly (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (with appendonly, the data is back).
    pub fn restart(&mut self) -> Result<(), RedisServerError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
