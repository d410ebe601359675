//! girder's command line, as a library so that a binary with its own functions can reuse
//! it: `fn main() -> ExitCode { girder_cli::main_with(my_registry()) }`.

/// Prints a line on stdout like `println!`, but a closed stdout (`girder status | head -1`)
/// ends the command quietly and successfully, as Unix tools do, instead of panicking.
macro_rules! outln {
    () => {
        $crate::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))
    };
}

mod auth;
mod bench;
mod cache;
mod call;
mod config;
mod demo;
mod ds;
mod events;
mod forget;
mod functions;
mod map;
mod serve;
mod status;
mod store;
mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use girder::Registry;

/// girder: a distributed cache and compute grid.
#[derive(Debug, Parser)]
#[command(name = "girder", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a realistic workload on an in-process grid and summarize what happened.
    Demo(demo::DemoArgs),
    /// Run a long-lived node serving the HTTP API.
    Node(Box<serve::NodeArgs>),
    /// Call a function on a running node and print its JSON result.
    Call(call::CallArgs),
    /// List the functions the grid serves: parameters, types, result and policies.
    Functions(functions::FunctionsArgs),
    /// Forget memoized results of a function (one, or every one with --all), so the next call computes again.
    Forget(forget::ForgetArgs),
    /// Call a function once per argument array on stdin; print results as they complete.
    Map(map::MapArgs),
    /// Read and write the grid's cache through a node.
    Cache(cache::CacheArgs),
    /// Read and write the bucket store through a node: items by bucket and key, streamed.
    Store(store::StoreArgs),
    /// Send to a workflow instance, or read its state, through a node.
    Workflow(workflow::WorkflowArgs),
    /// Print the grid's lifecycle events (nodes joining, leaving, dying; components moving).
    Events(events::EventsArgs),
    /// Drive the grid's data structures directly: contention and failure drills.
    Ds(ds::DsArgs),
    /// Read and change per-node configuration; running nodes pick it up.
    Config(config::ConfigArgs),
    /// Measure round trip, throughput, memo hits and nested fan-out, embedded or over Redis.
    Bench(bench::BenchArgs),
    /// List the grid's live nodes with their pools, slots, load and request counts.
    Status(status::StatusArgs),
}

/// Parses the command line and runs the verb with `registry`'s functions. Errors are printed
/// as one line on stderr and turn into a non-zero exit code.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return clap_error(err),
    };
    init_tracing(matches!(cli.command, Command::Node(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("girder: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(registry, args).await,
            Command::Node(args) => serve::run(registry, *args).await,
            Command::Call(args) => call::run(args).await,
            Command::Map(args) => map::run(args).await,
            Command::Forget(args) => forget::run(args).await,
            Command::Functions(args) => functions::run(args).await,
            Command::Cache(args) => cache::run(args).await,
            Command::Store(args) => store::run(args).await,
            Command::Workflow(args) => workflow::run(args).await,
            Command::Events(args) => events::run(args).await,
            Command::Ds(args) => ds::run(args).await,
            Command::Config(args) => config::run(args).await,
            Command::Bench(args) => bench::run(registry, args).await,
            Command::Status(args) => status::run(args).await,
        }
    });
    // Tasks of a stopped node may still be parked; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("girder: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out whole; a usage error becomes one line.
/// Writes one line on stdout; see `outln!`.
fn stdout_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(err) = written {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Any other failure to print (a full disk) is the same as the reader going away.
        std::process::exit(1);
    }
}

/// Whether `err` comes from writing to a stdout nobody reads any more.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

fn clap_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("invalid command line").trim_start_matches("error: ");
            eprintln!("girder: error: {first} (see girder --help)");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
