//! The example app end to end: two `girder-sessions-counter` processes on one real Redis
//! share sessions, and a session expires after its TTL (not before).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use girder::testing::RedisServer;
use girder::{RedisConfig, RedisStatekeeper, Statekeeper};
use girder_sessions::GirderSessionStore;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{json, Value};
use tower_sessions::session::Id;
use tower_sessions::session_store::SessionStore;

const APP: &str = env!("CARGO_BIN_EXE_girder-sessions-counter");

/// An app process, killed when dropped.
struct App {
    child: Child,
    url: String,
}

impl App {
    /// Starts the app on a free port with sessions on `redis`, and waits until it listens.
    fn start(redis: &str, ttl_secs: u32) -> App {
        let mut child = Command::new(APP)
            .args(["--statekeeper", redis, "--listen", "127.0.0.1:0", "--ttl-secs", &ttl_secs.to_string()])
            // Expired sessions are logged as warnings by tower-sessions; errors still show.
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the app starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        // The app prints its address once it listens: that line is the ready signal.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("the app prints its address");
        let url = line.trim().strip_prefix("listening on ").unwrap_or_default().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "the app did not start; first line: {line:?}");
        App { child, url }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(client: &reqwest::Client, app: &App, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client.get(format!("{}{path}", app.url));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.expect("the app answers");
    assert!(response.status().is_success(), "GET {path}: {}", response.status());
    response
}

async fn visit(client: &reqwest::Client, app: &App, path: &str) -> Value {
    get(client, app, path, None).await.json().await.expect("JSON")
}

#[tokio::test]
async fn a_session_set_through_one_app_is_read_and_changed_through_another() {
    let redis = RedisServer::start(false).expect("redis-server starts");
    let (a, b) = (App::start(&redis.url(), 3_600), App::start(&redis.url(), 3_600));
    let browser = reqwest::Client::builder().cookie_store(true).build().expect("client");

    assert_eq!(visit(&browser, &a, "/").await, json!({"count": 1, "name": null}));
    assert_eq!(visit(&browser, &b, "/count").await, json!({"count": 1, "name": null}));
    assert_eq!(visit(&browser, &b, "/").await, json!({"count": 2, "name": null}));
    assert_eq!(visit(&browser, &a, "/count").await, json!({"count": 2, "name": null}));

    let named = browser.post(format!("{}/name", b.url)).body("ada").send().await.expect("the app answers");
    assert!(named.status().is_success(), "POST /name: {}", named.status());
    assert_eq!(visit(&browser, &a, "/").await, json!({"count": 3, "name": "ada"}));
    let too_long = browser.post(format!("{}/name", a.url)).body("x".repeat(65)).send().await.expect("answers");
    assert_eq!(too_long.status(), reqwest::StatusCode::BAD_REQUEST);

    // Another browser has a session of its own.
    let other = reqwest::Client::builder().cookie_store(true).build().expect("client");
    assert_eq!(visit(&other, &b, "/").await, json!({"count": 1, "name": null}));
    assert_eq!(visit(&browser, &b, "/count").await, json!({"count": 3, "name": "ada"}));
}

/// The session cookie (`id=...`) a response set.
fn session_cookie(response: &reqwest::Response) -> String {
    let set = response.headers().get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok());
    let cookie = set.filter_map(|v| v.split(';').next()).find(|c| c.starts_with("id="));
    cookie.expect("a session cookie").to_owned()
}

async fn count(client: &reqwest::Client, app: &App, cookie: &str) -> u64 {
    let body: Value = get(client, app, "/count", Some(cookie)).await.json().await.expect("JSON");
    body["count"].as_u64().expect("a count")
}

#[tokio::test]
async fn a_session_expires_after_its_ttl() {
    const TTL: Duration = Duration::from_secs(2);
    // The first check that may see it gone runs at most this long after the TTL.
    const LATE_MAX: Duration = Duration::from_millis(1_500);
    // A session seen gone this long before its TTL expired early.
    const EARLY_MAX: Duration = Duration::from_millis(100);
    let redis = RedisServer::start(false).expect("redis-server starts");
    let (a, b) = (App::start(&redis.url(), 2), App::start(&redis.url(), 2));
    // The cookie is carried by hand: a cookie jar would drop it at its Max-Age by itself,
    // and this test is about the store forgetting the session.
    let client = reqwest::Client::new();

    let sent = Instant::now();
    let cookie = session_cookie(&get(&client, &a, "/", None).await);
    // Polled with a deadline; `first_gone` is measured after the answer that said so, so
    // it can only be late, never early.
    let mut first_gone = None;
    loop {
        let (on_a, on_b) = (count(&client, &a, &cookie).await, count(&client, &b, &cookie).await);
        assert!(on_a <= 1 && on_b <= 1, "the session holds one visit, got {on_a} and {on_b}");
        let elapsed = sent.elapsed();
        if on_a.min(on_b) == 0 {
            first_gone.get_or_insert(elapsed);
        }
        if on_a.max(on_b) == 0 {
            break;
        }
        assert!(elapsed < TTL + LATE_MAX, "the session outlived its TTL by more than {LATE_MAX:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_gone = first_gone.unwrap_or_default();
    eprintln!("session first seen gone {first_gone:?} after it was set, with a TTL of {TTL:?}");
    assert!(first_gone + EARLY_MAX >= TTL, "the session was gone after {first_gone:?}, its TTL is {TTL:?}");

    // Gone from the store itself, not just hidden by its date.
    let grid = RedisStatekeeper::connect(RedisConfig::new(redis.url())).await.expect("connects");
    let sessions = GirderSessionStore::new(grid.structures());
    let id: Id = cookie.trim_start_matches("id=").parse().expect("a session id");
    assert_eq!(sessions.load(&id).await.expect("loads"), None);
    let stored = grid.structures().exists(girder_sessions::SESSION_KIND, &sessions.key(&id)).await;
    assert!(!stored.expect("exists"), "the stored value expired");
    assert_eq!(count(&client, &b, &cookie).await, 0);
}
