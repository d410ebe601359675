//! The node's HTTP API under careless and hostile clients, against real `girder node`
//! processes: idle connection floods, slowloris, huge and slow bodies, call caps, fairness
//! between callers, health under load, TLS, bounded SIGTERM and the Redis password file.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::hygiene::{
    body_of, connect, raise_nofile, read_until_closed, self_signed, status_of, temp_dir, trickle, LoggedNode,
};
use common::{text, GIRDER};

/// `GET /v1/health` on a fresh connection, with `limit` for the whole exchange.
async fn health(url: &str, limit: Duration) -> Result<serde_json::Value, String> {
    let http = reqwest::Client::builder().timeout(limit).build().map_err(|e| e.to_string())?;
    let response = http.get(format!("{url}/v1/health")).send().await.map_err(|e| format!("{e:?}"))?;
    if response.status() != 200 {
        return Err(format!("health answered {}", response.status()));
    }
    response.json().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_leave_health_answering_within_a_second() {
    let nofile = raise_nofile();
    // 10,000 is the node's default cap; a machine with fewer descriptors tests a lower one.
    let cap: usize = 10_000.min(nofile.saturating_sub(1_500) as usize);
    assert!(cap >= 500, "the open-files limit ({nofile}) is too low for this test");
    let extra = 500;
    let cap_arg = cap.to_string();
    let node = LoggedNode::start(&["--workers", "1", "--connections-max", &cap_arg], &[]);
    let addr = node.addr;
    let opened = tokio::task::spawn_blocking(move || {
        let mut idle = Vec::with_capacity(cap + extra);
        for _ in 0..cap + extra {
            idle.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connects"));
        }
        idle
    })
    .await
    .expect("connections open");
    let begun = Instant::now();
    let answer = health(&node.url, Duration::from_secs(1)).await;
    let took = begun.elapsed();
    assert!(answer.is_ok(), "health with {} idle connections: {answer:?}", opened.len());
    assert!(took < Duration::from_secs(1), "health took {took:?}");
    // The longest-idle connections made room: the first ones opened are closed by the node.
    let closed = tokio::task::spawn_blocking(move || {
        let mut closed = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        for mut stream in opened.into_iter().take(extra) {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if read_until_closed(&mut stream, left).1.is_some() {
                closed += 1;
            }
        }
        closed
    })
    .await
    .expect("counted");
    assert!(closed >= extra - 10, "only {closed} of the {extra} oldest idle connections were closed");
}

#[test]
fn slowloris_headers_and_silent_connections_are_cut_off_within_the_header_timeout() {
    let node = LoggedNode::start(&["--workers", "1", "--header-timeout-ms", "1000"], &[]);
    // Headers one byte every 100 ms: 25 s worth of them.
    let slow = connect(node.addr, Duration::from_secs(5));
    let mut head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n".to_vec();
    head.extend(std::iter::repeat_n(b"X-Slow: y\r\n".iter().copied(), 20).flatten());
    let mut reader = slow.try_clone().expect("clone");
    let writer = trickle(slow, head, Duration::from_millis(100));
    // A connection that sends nothing at all.
    let mut silent = connect(node.addr, Duration::from_secs(5));
    let (_, slow_closed) = read_until_closed(&mut reader, Duration::from_secs(5));
    let (_, silent_closed) = read_until_closed(&mut silent, Duration::from_secs(5));
    let slow_closed = slow_closed.expect("the slowloris connection is still open after 5 s");
    let silent_closed = silent_closed.expect("the silent connection is still open after 5 s");
    assert!(slow_closed < Duration::from_millis(2_500), "slowloris cut after {slow_closed:?}");
    assert!(slow_closed >= Duration::from_millis(900), "slowloris cut after only {slow_closed:?}");
    assert!(silent_closed < Duration::from_millis(2_500), "silent connection cut after {silent_closed:?}");
    writer.join().expect("writer");
    // A prompt client on a fresh connection is served, and may keep its connection.
    let mut prompt = connect(node.addr, Duration::from_secs(5));
    prompt.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let (got, _) = read_until_closed(&mut prompt, Duration::from_millis(300));
    assert_eq!(status_of(&got), Some(200), "{}", String::from_utf8_lossy(&got));
}

#[test]
fn an_oversized_upload_asking_for_100_continue_gets_413_and_never_continue() {
    let node = LoggedNode::start(&["--workers", "1"], &[]);
    for (method, path) in [("PUT", "/v1/cache/big"), ("POST", "/v1/call/examples/echo"), ("POST", "/nowhere")] {
        let mut stream = connect(node.addr, Duration::from_secs(5));
        let head =
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\nExpect: 100-continue\r\n\r\n");
        stream.write_all(head.as_bytes()).expect("head");
        let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&got);
        assert!(!text.contains("100 Continue"), "{method} {path}: the node said continue:\n{text}");
        assert_eq!(status_of(&got), Some(413), "{method} {path}:\n{text}");
        let body: serde_json::Value = serde_json::from_str(&body_of(&got)).expect("a JSON body");
        assert_eq!(body["kind"], "too_large", "{body}");
        assert!(closed.is_some(), "{method} {path}: the connection stays open for a body nobody reads");
    }
    // Without Expect the client just sends; it is told no before it is done.
    let mut stream = connect(node.addr, Duration::from_secs(5));
    stream.write_all(b"PUT /v1/cache/big HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n").expect("head");
    let _ = stream.write_all(&vec![b'x'; 64 * 1024]);
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(5));
    assert_eq!(status_of(&got), Some(413), "{}", String::from_utf8_lossy(&got));
}

#[test]
fn a_slow_body_is_cut_off_at_the_body_timeout() {
    let node = LoggedNode::start(&["--workers", "1", "--body-timeout-ms", "1000"], &[]);
    let mut stream = connect(node.addr, Duration::from_secs(5));
    stream.write_all(b"POST /v1/call/examples/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n[").expect("head");
    let reader = stream.try_clone().expect("clone");
    // 199 more bytes, one every 100 ms: 20 s if nobody stopped it.
    let writer = trickle(stream, vec![b' '; 199], Duration::from_millis(100));
    let mut reader = reader;
    let (got, closed) = read_until_closed(&mut reader, Duration::from_secs(6));
    let closed = closed.expect("the slow body is still being read after 6 s");
    assert!(closed < Duration::from_millis(3_000), "cut off after {closed:?}");
    assert_eq!(status_of(&got), Some(408), "{}", String::from_utf8_lossy(&got));
    let body: serde_json::Value = serde_json::from_str(&body_of(&got)).expect("a JSON body");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("body timeout")), "{body}");
    writer.join().expect("writer");
}

#[tokio::test]
async fn calls_over_the_node_cap_are_refused_at_once() {
    let node =
        LoggedNode::start(&["--workers", "1", "--slots", "4", "--calls-max", "2", "--caller-share", "100%"], &[]);
    let http = reqwest::Client::new();
    let long: Vec<_> = (0..2)
        .map(|i| {
            let request = http.post(format!("{}/v1/call/examples/sleep", node.url)).body(format!("[{}]", 20_000 + i));
            tokio::spawn(request.send())
        })
        .collect();
    wait_for_busy(&node.url, 2).await;
    let begun = Instant::now();
    let refused = http.post(format!("{}/v1/call/examples/echo", node.url)).body("[1]").send().await.expect("call");
    assert!(begun.elapsed() < Duration::from_millis(500), "refused after {:?}", begun.elapsed());
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.expect("JSON body");
    assert_eq!(body["kind"], "overloaded", "{body}");
    // Other routes still answer.
    assert!(health(&node.url, Duration::from_secs(1)).await.is_ok());
    for call in long {
        call.abort();
    }
}

/// Waits (at most 10 s) until `busy` slots of the node at `url` are busy.
async fn wait_for_busy(url: &str, busy: u64) {
    let begun = Instant::now();
    loop {
        if let Ok(health) = health(url, Duration::from_secs(1)).await {
            if health["busy"].as_u64() == Some(busy) {
                return;
            }
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "{busy} slots never got busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_callers_long_calls_leave_the_node_answering_another_caller_within_a_second() {
    let dir = temp_dir("fairness");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# one token per caller\nalice-token\nbob-token\n").expect("token file");
    let tokens = tokens.to_string_lossy().into_owned();
    // 2 workers x 4 slots; each caller may keep half of them busy.
    let node = LoggedNode::start(&["--token-file", &tokens], &[]);
    let http = reqwest::Client::new();
    // One answer per call of alice's: 8.
    let (answered, mut answers) = tokio::sync::mpsc::channel(8);
    let alice: Vec<_> = (0..8)
        .map(|i| {
            let request = http
                .post(format!("{}/v1/call/examples/sleep", node.url))
                .bearer_auth("alice-token")
                .body(format!("[{}]", 600_000 - i));
            let answered = answered.clone();
            tokio::spawn(async move {
                let response = request.send().await.expect("alice is answered");
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let _ = answered.send((status, body)).await;
            })
        })
        .collect();
    // Alice's calls beyond her share (half the node's 8 slots) are told so at once.
    for _ in 0..4 {
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), answers.recv())
            .await
            .expect("four of alice's calls are refused at once")
            .expect("an answer");
        assert_eq!((status, body["kind"].as_str()), (429, Some("overloaded")), "{body}");
    }
    wait_for_busy(&node.url, 4).await;
    let begun = Instant::now();
    let bob = http
        .post(format!("{}/v1/call/examples/echo", node.url))
        .bearer_auth("bob-token")
        .body("[42]")
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .expect("bob is answered within a second");
    assert_eq!(bob.status(), 200);
    assert_eq!(bob.text().await.expect("body"), "42");
    assert!(begun.elapsed() < Duration::from_secs(1), "bob waited {:?}", begun.elapsed());
    assert!(answers.try_recv().is_err(), "alice's four admitted calls still run");
    for call in alice {
        call.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn health_says_degraded_when_every_slot_has_been_busy_for_long() {
    let node = LoggedNode::start(
        &["--workers", "1", "--slots", "2", "--caller-share", "1", "--degraded-after-ms", "500"],
        &[],
    );
    let first = health(&node.url, Duration::from_secs(1)).await.expect("health");
    assert_eq!(first["status"], "ok", "{first}");
    let http = reqwest::Client::new();
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let request = http.post(format!("{}/v1/call/examples/sleep", node.url)).body(format!("[{}]", 3_000 + i));
            tokio::spawn(request.send())
        })
        .collect();
    wait_for_busy(&node.url, 2).await;
    let busy_at = Instant::now();
    let degraded = loop {
        let answer = health(&node.url, Duration::from_secs(1)).await.expect("health answers while busy");
        if answer["status"] == "degraded" {
            break answer;
        }
        assert!(busy_at.elapsed() < Duration::from_millis(2_500), "never degraded: {answer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(degraded["all_busy_ms"].as_u64().is_some_and(|ms| ms >= 500), "{degraded}");
    assert_eq!(degraded["slots"], 2);
    // Once the calls are done the node is ok again.
    for call in calls {
        assert_eq!(call.await.expect("task").expect("answer").status(), 200);
    }
    let done = Instant::now();
    loop {
        let after = health(&node.url, Duration::from_secs(1)).await.expect("health");
        if after["status"] == "ok" {
            break;
        }
        assert!(done.elapsed() < Duration::from_secs(2), "still {after} with every slot free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_cli_talks_to_a_node_over_tls() {
    let dir = temp_dir("tls");
    let (cert, key) = self_signed(&dir);
    let (cert, key) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    let node = LoggedNode::start(&["--workers", "1", "--tls-cert", &cert, "--tls-key", &key], &[]);
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    let out = Command::new(GIRDER)
        .args(["call", "examples/echo", "5", "--node", &node.url, "--ca-file", &cert])
        .output()
        .expect("girder call");
    assert_eq!(text(&out.stdout), "5", "{}", text(&out.stderr));
    for args in [&["cache", "set", "k", "v"][..], &["status"]] {
        let out = Command::new(GIRDER)
            .args(args)
            .args(["--node", &node.url])
            .env("GIRDER_CA_FILE", &cert)
            .output()
            .expect("girder runs");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let got = Command::new(GIRDER)
        .args(["cache", "get", "k", "--node", &node.url, "--ca-file", &cert])
        .output()
        .expect("girder cache get");
    assert_eq!(text(&got.stdout), "v", "{}", text(&got.stderr));
    // An untrusted certificate is refused, and plain HTTP to the TLS port fails fast.
    let untrusted =
        Command::new(GIRDER).args(["call", "examples/echo", "5", "--node", &node.url]).output().expect("runs");
    assert!(!untrusted.status.success(), "{}", text(&untrusted.stdout));
    let begun = Instant::now();
    let plain = node.url.replacen("https://", "http://", 1);
    let out = Command::new(GIRDER).args(["call", "examples/echo", "5", "--node", &plain]).output().expect("runs");
    assert!(!out.status.success());
    assert!(begun.elapsed() < Duration::from_secs(5), "plain HTTP took {:?}", begun.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_with_slow_clients_exits_within_the_drain_timeout_plus_two_seconds() {
    // Long client timeouts: only shutdown itself can end these clients.
    let mut node = LoggedNode::start(
        &[
            "--workers",
            "1",
            "--drain-timeout-ms",
            "1000",
            "--header-timeout-ms",
            "60000",
            "--body-timeout-ms",
            "60000",
            "--idle-timeout-ms",
            "60000",
        ],
        &[],
    );
    let addr = node.addr;
    let mut writers = Vec::new();
    // Slowloris headers.
    let slow_head = connect(addr, Duration::from_secs(5));
    writers.push(trickle(
        slow_head,
        b"GET /v1/health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
        Duration::from_millis(200),
    ));
    // A slow body.
    let mut slow_body = connect(addr, Duration::from_secs(5));
    slow_body.write_all(b"PUT /v1/cache/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").expect("head");
    writers.push(trickle(slow_body, vec![b'x'; 100], Duration::from_millis(200)));
    // An idle keep-alive connection.
    let mut keep_alive = connect(addr, Duration::from_secs(5));
    keep_alive.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    // Connections that never say anything.
    let silent: Vec<TcpStream> = (0..50).map(|_| connect(addr, Duration::from_secs(5))).collect();
    // A call in flight far longer than the drain timeout, from a client that never reads.
    let mut long_call = connect(addr, Duration::from_secs(5));
    long_call
        .write_all(b"POST /v1/call/examples/sleep HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n[60000]")
        .expect("call");
    // Everything is in place once the call runs.
    let begun = Instant::now();
    loop {
        let stats = stats_blocking(addr);
        if stats["workers"][0]["executed"].as_u64() == Some(1) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(10), "the long call never started: {stats}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (took, status) = node.terminate();
    let status = status.unwrap_or_else(|| panic!("the node did not exit within 30 s:\n{}", node.stderr()));
    assert!(took < Duration::from_millis(1_000 + 2_000), "the node took {took:?} to exit");
    assert!(status.success(), "exit {status:?}:\n{}", node.stderr());
    drop((silent, keep_alive, long_call));
    for writer in writers {
        writer.join().expect("writer");
    }
}

/// `GET /v1/stats` over a raw connection, without an async runtime (`Null` if it fails).
fn stats_blocking(addr: std::net::SocketAddr) -> serde_json::Value {
    let mut stream = connect(addr, Duration::from_secs(2));
    if stream.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return serde_json::Value::Null;
    }
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(2));
    serde_json::from_str(&body_of(&got)).unwrap_or_default()
}

/// A redis-server that requires `password`, on a free port; killed when dropped.
struct PasswordRedis {
    child: std::process::Child,
    port: u16,
}

impl PasswordRedis {
    fn start(password: &str, dir: &std::path::Path) -> PasswordRedis {
        use std::io::{BufRead, BufReader};
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", password])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Ready to accept connections") => break,
                Some(Ok(_)) => {}
                _ => panic!("redis-server on port {port} exited early"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        PasswordRedis { child, port }
    }
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_statekeeper_password_comes_from_a_file_and_shows_nowhere() {
    // Characters a URL would have to escape.
    let password = "hunter2/@:%#x";
    let dir = temp_dir("password");
    let redis = PasswordRedis::start(password, &dir);
    let file = dir.join("password");
    std::fs::write(&file, format!("{password}\n")).expect("password file");
    let file = file.to_string_lossy().into_owned();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let node = LoggedNode::start(
        &["--statekeeper", &url, "--statekeeper-password-file", &file, "--id", "pw1", "--workers", "1"],
        &[],
    );
    let ps = Command::new("ps").args(["-ww", "-o", "args=", "-p", &node.pid().to_string()]).output().expect("ps");
    let ps = text(&ps.stdout);
    assert!(ps.contains("--statekeeper-password-file"), "ps shows {ps:?}");
    assert!(!ps.contains("hunter2"), "ps shows the password: {ps}");
    let out = Command::new(GIRDER).args(["call", "examples/echo", "3", "--node", &node.url]).output().expect("call");
    assert_eq!(text(&out.stdout), "3", "{}", text(&out.stderr));
    // The verbs that open the statekeeper take the file too, by flag or environment.
    let status = Command::new(GIRDER)
        .args(["status", "--json", "--statekeeper", &url])
        .env("GIRDER_STATEKEEPER_PASSWORD_FILE", &file)
        .output()
        .expect("status");
    assert!(text(&status.stdout).contains("\"pw1\""), "{}", text(&status.stderr));
    let set = Command::new(GIRDER)
        .args(["config", "set", "pw1", "slots", "2", "--statekeeper", &url, "--statekeeper-password-file", &file])
        .output()
        .expect("config");
    assert!(set.status.success(), "{}", text(&set.stderr));
    // A wrong password, or none, fails without showing it; so does a URL with a password too.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "hunter2-wrong/@x").expect("wrong file");
    let wrong = wrong.to_string_lossy().into_owned();
    let with_password = format!("redis://:hunter2@127.0.0.1:{}/0", redis.port);
    for (statekeeper, password_file) in [(&url, Some(&wrong)), (&url, None), (&with_password, Some(&file))] {
        let mut command = Command::new(GIRDER);
        command.args(["node", "--listen", "127.0.0.1:0", "--statekeeper", statekeeper]);
        command.env_remove("GIRDER_STATEKEEPER_PASSWORD_FILE");
        if let Some(password_file) = password_file {
            command.args(["--statekeeper-password-file", password_file]);
        }
        let out = command.output().expect("girder node runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{statekeeper} with {password_file:?} started");
        assert!(!stderr.contains("hunter2"), "the password shows in: {stderr}");
    }
    assert!(!node.stderr().contains("hunter2"), "the node logged the password:\n{}", node.stderr());
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
