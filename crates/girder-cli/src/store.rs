//! `girder store put|get|append|delete|list|delete-bucket`: the bucket store through a
//! node's HTTP API. Values stream both ways (a file is never read whole into memory), with a
//! progress bar on stderr for transfers over 8 MiB when stderr is a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Arguments of `girder store`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    op: StoreOp,
    /// The node's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    /// Never draw a progress bar.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

#[derive(Debug, clap::Subcommand)]
enum StoreOp {
    /// Store FILE (or stdin) as ITEM of BUCKET; prints the item's new version.
    Put {
        /// The bucket key.
        bucket: String,
        /// The item key.
        item: String,
        /// The file holding the value; `-` (the default) reads stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Write only if the item is at this version (else fail with its actual version).
        #[arg(long, conflicts_with = "if_absent")]
        if_version: Option<u64>,
        /// Write only if the item does not exist.
        #[arg(long)]
        if_absent: bool,
    },
    /// Write ITEM's value (raw bytes) to stdout or to a file.
    Get {
        /// The bucket key.
        bucket: String,
        /// The item key.
        item: String,
        /// Write the value to this file (replaced only once the whole value arrived).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Append FILE (or stdin) to ITEM (created if missing); prints the item's new version.
    Append {
        /// The bucket key.
        bucket: String,
        /// The item key.
        item: String,
        /// The file holding the bytes to append; `-` (the default) reads stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Delete ITEM of BUCKET.
    Delete {
        /// The bucket key.
        bucket: String,
        /// The item key.
        item: String,
    },
    /// List BUCKET's items in order: version, size in bytes and key, tab-separated.
    List {
        /// The bucket key.
        bucket: String,
        /// Print the node's NDJSON lines (`item`, `version`, `bytes`) instead.
        #[arg(long)]
        json: bool,
    },
    /// Delete every item of BUCKET; prints how many there were.
    DeleteBucket {
        /// The bucket key.
        bucket: String,
    },
}

/// Transfers larger than this get a progress bar.
const BAR_BYTES_MIN: u64 = 8 << 20;
/// Bytes read from a file or stdin at once.
const CHUNK_BYTES: usize = 256 << 10;
/// Longest error body read from the node.
const ERROR_BYTES_MAX: usize = 64 << 10;
/// Longest line of a bucket listing (a key of at most 1 KiB, escaped, and two numbers).
const LIST_LINE_BYTES_MAX: usize = 64 << 10;

pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    let client = args.auth.client(reqwest::Client::builder())?;
    let node = Node { client, base: args.node.trim_end_matches('/').to_owned(), quiet: args.quiet };
    match &args.op {
        StoreOp::Put { bucket, item, file, if_version, if_absent } => {
            let mut request = node.client.put(node.item_url(bucket, item));
            if let Some(version) = if_version {
                request = request.header(reqwest::header::IF_MATCH, version.to_string());
            }
            if *if_absent {
                request = request.header(reqwest::header::IF_NONE_MATCH, "*");
            }
            node.write(request, file).await
        }
        StoreOp::Append { bucket, item, file } => node.write(node.client.post(node.item_url(bucket, item)), file).await,
        StoreOp::Get { bucket, item, output } => node.get(bucket, item, output.as_deref()).await,
        StoreOp::Delete { bucket, item } => {
            let answer = node.json(node.client.delete(node.item_url(bucket, item))).await?;
            let existed = answer["existed"].as_bool().context("the node's answer has no `existed`")?;
            outln!("{}", if existed { "deleted" } else { "absent: nothing to delete" });
            Ok(())
        }
        StoreOp::List { bucket, json } => node.list(bucket, *json).await,
        StoreOp::DeleteBucket { bucket } => {
            let answer = node.json(node.client.delete(node.bucket_url(bucket))).await?;
            let deleted = answer["deleted"].as_u64().context("the node's answer has no `deleted`")?;
            outln!("deleted {deleted} item(s)");
            Ok(())
        }
    }
}

/// The node the verb talks to.
struct Node {
    client: reqwest::Client,
    base: String,
    quiet: bool,
}

/// What a key may hold unescaped in a path segment: the URL's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn segment(key: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(key, SEGMENT)
}

impl Node {
    fn bucket_url(&self, bucket: &str) -> String {
        format!("{}/v1/store/{}", self.base, segment(bucket))
    }

    fn item_url(&self, bucket: &str, item: &str) -> String {
        format!("{}/v1/store/{}/{}", self.base, segment(bucket), segment(item))
    }

    /// Sends `request`; the response if it succeeded, else the node's error message.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|err| {
            let why = if err.is_connect() {
                format!("cannot reach the girder node at {} (is `girder node` running there?)", self.base)
            } else if err.is_request() {
                // Typically a body far over the item limit: the node answers and closes.
                format!("the girder node at {} broke off the request (is the item over its limit?)", self.base)
            } else {
                format!("the request to the girder node at {} failed", self.base)
            };
            anyhow::Error::new(err).context(why)
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        bail!("{}", error_message(response).await)
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        self.send(request).await?.json().await.context("the node's answer is not JSON")
    }

    /// Put or append: streams `file` (or stdin) as the body and prints the new version.
    async fn write(&self, request: reqwest::RequestBuilder, file: &Path) -> anyhow::Result<()> {
        let (reader, length) = open(file).await?;
        let progress = Progress::new(length, self.quiet);
        let mut request = request.body(reqwest::Body::wrap_stream(chunks(reader, progress.clone())));
        if let Some(length) = length {
            // A known length lets the node refuse an oversize item before it is sent.
            request = request.header(reqwest::header::CONTENT_LENGTH, length);
        }
        let answer = self.json(request).await;
        progress.finish();
        let version = answer?["version"].as_u64().context("the node's answer has no `version`")?;
        outln!("{version}");
        Ok(())
    }

    /// Streams the item's value to `output` (a file, replaced once complete) or stdout.
    async fn get(&self, bucket: &str, item: &str, output: Option<&Path>) -> anyhow::Result<()> {
        let response = self.send(self.client.get(self.item_url(bucket, item))).await?;
        let progress = Progress::new(response.content_length(), self.quiet);
        let result = match output {
            Some(path) => download_to_file(response, path, &progress).await,
            None => {
                let mut stdout = tokio::io::stdout();
                copy_body(response, &mut stdout, &progress).await
            }
        };
        progress.finish();
        result
    }

    /// Prints the bucket's items as the node streams them.
    async fn list(&self, bucket: &str, json: bool) -> anyhow::Result<()> {
        let request = self.client.get(self.bucket_url(bucket)).query(&[("values", "false")]);
        let mut body = self.send(request).await?.bytes_stream();
        let mut pending = BytesMut::new();
        while let Some(chunk) = body.next().await {
            pending.extend_from_slice(&chunk.context("the listing broke off")?);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(end + 1);
                list_line(&line[..end], json)?;
            }
            anyhow::ensure!(pending.len() <= LIST_LINE_BYTES_MAX, "the node sent a listing line over 64 KiB");
        }
        anyhow::ensure!(pending.iter().all(u8::is_ascii_whitespace), "the listing ended in the middle of a line");
        Ok(())
    }
}

/// Prints one line of a listing, or fails with the error the node ended the stream with.
fn list_line(line: &[u8], json: bool) -> anyhow::Result<()> {
    let entry: serde_json::Value =
        serde_json::from_slice(line).context("the node sent a listing line that is not JSON")?;
    if let Some(error) = entry.get("error") {
        bail!("the listing failed part way: {}", error["message"].as_str().unwrap_or("unknown error"));
    }
    if json {
        outln!("{entry}");
        return Ok(());
    }
    let item = entry["item"].as_str().context("a listing line has no `item`")?;
    let version = entry["version"].as_u64().context("a listing line has no `version`")?;
    let bytes = entry["bytes"].as_u64().context("a listing line has no `bytes`")?;
    // A key with a tab or newline would break the columns: such keys are printed quoted.
    if item.chars().any(char::is_control) {
        outln!("{version}\t{bytes}\t{item:?}");
    } else {
        outln!("{version}\t{bytes}\t{item}");
    }
    Ok(())
}

/// The message of an error response (its JSON `message`, else its status).
async fn error_message(response: reqwest::Response) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > ERROR_BYTES_MAX {
            break;
        }
    }
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("the node answered {status}"))
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// `file` (or stdin for `-`) to read from, and its length when it is a regular file.
async fn open(file: &Path) -> anyhow::Result<(Reader, Option<u64>)> {
    if file == Path::new("-") {
        return Ok((Box::new(tokio::io::stdin()), None));
    }
    let opened = tokio::fs::File::open(file).await.with_context(|| format!("cannot open {}", file.display()))?;
    let metadata = opened.metadata().await.with_context(|| format!("cannot read {}", file.display()))?;
    anyhow::ensure!(!metadata.is_dir(), "{} is a directory", file.display());
    // A pipe or device has no length worth announcing: it is sent chunked.
    let length = metadata.is_file().then_some(metadata.len());
    Ok((Box::new(opened), length))
}

/// `reader` as a stream of chunks, advancing `progress` as they are sent.
fn chunks(
    reader: Reader,
    progress: Progress,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::try_unfold((reader, progress), |(mut reader, progress)| async move {
        let mut chunk = BytesMut::with_capacity(CHUNK_BYTES);
        while chunk.len() < CHUNK_BYTES {
            if reader.read_buf(&mut chunk).await? == 0 {
                break;
            }
        }
        if chunk.is_empty() {
            return Ok(None);
        }
        progress.advance(chunk.len() as u64);
        Ok(Some((chunk.freeze(), (reader, progress))))
    })
}

/// Writes the body to a file beside `path`, then renames it over `path`: a transfer that
/// fails leaves whatever `path` held before.
async fn download_to_file(response: reqwest::Response, path: &Path, progress: &Progress) -> anyhow::Result<()> {
    let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
    let partial = path.with_file_name(format!(".{}.girder-{}", name.to_string_lossy(), std::process::id()));
    let written = async {
        let mut file =
            tokio::fs::File::create(&partial).await.with_context(|| format!("cannot create {}", partial.display()))?;
        copy_body(response, &mut file, progress).await?;
        file.sync_all().await.with_context(|| format!("cannot write {}", partial.display()))?;
        tokio::fs::rename(&partial, path).await.with_context(|| format!("cannot write {}", path.display()))
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    written
}

/// Copies the response body to `out` as it arrives.
async fn copy_body(
    response: reqwest::Response,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the value broke off")?;
        out.write_all(&chunk).await.context("writing the value")?;
        progress.advance(chunk.len() as u64);
    }
    out.flush().await.context("writing the value")
}

/// A progress bar on stderr for a transfer over [`BAR_BYTES_MIN`], drawn only when stderr
/// is a terminal; one of unknown length shows up once that many bytes went by.
#[derive(Clone)]
struct Progress {
    bar: indicatif::ProgressBar,
    /// The length is unknown: show the bar once the transfer turns out large.
    reveal_late: bool,
}

impl Progress {
    fn new(length: Option<u64>, quiet: bool) -> Progress {
        let drawn = !quiet && std::io::stderr().is_terminal();
        let (bar, template) = match length {
            Some(length) => {
                (indicatif::ProgressBar::new(length), "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}")
            }
            None => (indicatif::ProgressBar::no_length(), "{spinner} {bytes} {bytes_per_sec}"),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        if !(drawn && length.is_some_and(|length| length > BAR_BYTES_MIN)) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Progress { bar, reveal_late: drawn && length.is_none() }
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
        if self.reveal_late && self.bar.position() > BAR_BYTES_MIN && self.bar.is_hidden() {
            self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
