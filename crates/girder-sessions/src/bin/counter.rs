//! `girder-sessions-counter`: an example axum app whose web sessions live on girder's grid
//! (see `girder_sessions`), so several app processes on one grid share them.
//!
//! ```sh
//! girder-sessions-counter --statekeeper redis://127.0.0.1:6379/0 --listen 127.0.0.1:3001 &
//! girder-sessions-counter --statekeeper redis://127.0.0.1:6379/0 --listen 127.0.0.1:3002 &
//! curl -c jar -b jar http://127.0.0.1:3001/        # {"count":1,"name":null}
//! curl -c jar -b jar http://127.0.0.1:3002/        # {"count":2,"name":null}
//! ```
//!
//! Routes: `GET /` counts a visit in the session and returns the visit; `GET /count`
//! returns it unchanged; `POST /name` (the name as the body) names the session.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use girder::{Embedded, EmbeddedConfig, RedisConfig, RedisStatekeeper, Statekeeper};
use girder_sessions::GirderSessionStore;
use serde::Serialize;
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// Longest session TTL accepted: a year.
const TTL_SECS_MAX: i64 = 366 * 24 * 3_600;
/// Longest name accepted, in characters; bodies of `POST /name` are capped a little above.
const NAME_CHARS_MAX: usize = 64;
const NAME_BODY_BYTES_MAX: usize = 1_024;
const COUNT: &str = "count";
const NAME: &str = "name";

/// An axum app that counts visits in web sessions stored on girder's grid.
#[derive(Parser, Debug)]
#[command(name = "girder-sessions-counter", version)]
struct Args {
    /// The grid's statekeeper: `embedded` (sessions live in this process) or a
    /// redis:// / rediss:// URL shared by every app process.
    #[arg(long, default_value = "embedded", env = "GIRDER_STATEKEEPER", hide_env_values = true)]
    statekeeper: String,
    /// With Redis: the grid's namespace (grids with different namespaces do not see each other).
    #[arg(long, default_value = "girder")]
    namespace: String,
    /// Where to listen (port 0: any free port; the address is printed once bound).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A session expires after this many seconds without a change.
    #[arg(long, default_value_t = 3_600, value_parser = clap::value_parser!(i64).range(1..=TTL_SECS_MAX))]
    ttl_secs: i64,
    /// Mark the session cookie `Secure` (only sent over HTTPS): do so behind a TLS proxy.
    #[arg(long)]
    secure_cookies: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("girder-sessions-counter: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Kept alive for the app's lifetime: the structures store belongs to it.
    let statekeeper = open_statekeeper(&args).await?;
    let sessions = SessionManagerLayer::new(GirderSessionStore::new(statekeeper.structures()))
        .with_expiry(Expiry::OnInactivity(time::Duration::seconds(args.ttl_secs)))
        .with_secure(args.secure_cookies);
    let app = router().layer(sessions);
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    // Tests and scripts wait for this line; a closed stdout must not stop the app.
    let _ = std::io::stdout().flush();
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

/// The statekeeper named by `--statekeeper`; it is only used as a client (no workers).
async fn open_statekeeper(args: &Args) -> anyhow::Result<Arc<dyn Statekeeper>> {
    let spec = args.statekeeper.as_str();
    if spec == "embedded" {
        return Ok(Arc::new(Embedded::new(EmbeddedConfig::default())));
    }
    // Errors name the URL only through `redacted`, which hides any password.
    anyhow::ensure!(
        spec.starts_with("redis://") || spec.starts_with("rediss://"),
        "--statekeeper must be `embedded` or a redis:// or rediss:// URL, got {:?}",
        girder::redacted(spec)
    );
    let mut config = RedisConfig::new(spec);
    config.namespace = args.namespace.clone();
    let redis =
        RedisStatekeeper::connect(config).await.with_context(|| format!("connect to {}", girder::redacted(spec)))?;
    Ok(Arc::new(redis))
}

fn router() -> Router {
    Router::new()
        .route("/", get(count_visit))
        .route("/count", get(show))
        .route("/name", post(set_name).layer(DefaultBodyLimit::max(NAME_BODY_BYTES_MAX)))
}

/// What the app knows of a session.
#[derive(Serialize)]
struct Visit {
    count: u64,
    name: Option<String>,
}

async fn visit(session: &Session) -> Result<Visit, AppError> {
    Ok(Visit { count: session.get(COUNT).await?.unwrap_or(0), name: session.get(NAME).await? })
}

/// `GET /`: one more visit.
async fn count_visit(session: Session) -> Result<Json<Visit>, AppError> {
    let count = session.get::<u64>(COUNT).await?.unwrap_or(0).saturating_add(1);
    session.insert(COUNT, count).await?;
    Ok(Json(visit(&session).await?))
}

/// `GET /count`: the visit as it is (an unchanged session is not saved, so this does not
/// extend it).
async fn show(session: Session) -> Result<Json<Visit>, AppError> {
    Ok(Json(visit(&session).await?))
}

/// `POST /name`: names the session with the body's text.
async fn set_name(session: Session, body: String) -> Result<Json<Visit>, AppError> {
    let name = body.trim();
    if name.is_empty() || name.chars().count() > NAME_CHARS_MAX {
        return Err(AppError::BadName);
    }
    session.insert(NAME, name).await?;
    Ok(Json(visit(&session).await?))
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("a name is 1 to {NAME_CHARS_MAX} characters")]
    BadName,
    #[error("session: {0}")]
    Session(#[from] tower_sessions::session::Error),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match self {
            AppError::BadName => StatusCode::BAD_REQUEST,
            AppError::Session(_) => {
                tracing::error!(error = %self, "session store failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, self.to_string()).into_response()
    }
}

/// Resolves on Ctrl-C or SIGTERM, so in-flight requests (and their session saves) finish.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
