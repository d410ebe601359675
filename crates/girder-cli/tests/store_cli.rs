//! The bucket store's interfaces on one real `girder node`: the `/v1/store` routes and the
//! `girder store` verbs.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{text, NodeProcess, GIRDER};
use futures::StreamExt;
use reqwest::blocking::Client;

/// The item limit the nodes here run with: big enough for the 5 MiB round trip.
const ITEM_BYTES_MAX: usize = 6 << 20;

fn node() -> NodeProcess {
    NodeProcess::start(&["--item-max-bytes", &ITEM_BYTES_MAX.to_string()])
}

/// `girder store ARGS --node URL`, with `stdin` as its input.
fn store(node: &NodeProcess, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(GIRDER)
        .arg("store")
        .args(args)
        .args(["--node", &node.url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("girder store runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    // A verb the node refused part way exits without reading the rest: a broken pipe here.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().expect("girder store ends")
}

fn item_url(node: &NodeProcess, bucket: &str, item: &str) -> String {
    let escape = |key: &str| percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string();
    format!("{}/v1/store/{}/{}", node.url, escape(bucket), escape(item))
}

fn json(response: reqwest::blocking::Response) -> serde_json::Value {
    response.json().expect("a JSON answer")
}

#[test]
fn items_round_trip_over_http_with_versions_and_conditions() {
    let node = node();
    let client = Client::new();
    let url = item_url(&node, "http-bucket", "greeting");
    let put = client.put(&url).body("hello").send().unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["girder-version"], "1");
    assert_eq!(json(put), serde_json::json!({ "version": 1 }));
    assert_eq!(json(client.post(&url).body(", world").send().unwrap())["version"], 2);

    let got = client.get(&url).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["girder-version"], "2");
    assert_eq!(got.headers()["etag"], "\"2\"");
    assert_eq!(got.bytes().unwrap(), "hello, world");

    // A stale version and "must not exist" are both refused with the actual version.
    let stale = client.put(&url).header("if-match", "1").body("x").send().unwrap();
    assert_eq!(stale.status(), 409);
    assert_eq!(stale.headers()["girder-version"], "2");
    let stale = json(stale);
    assert_eq!((stale["kind"].as_str(), stale["version"].as_u64()), (Some("conflict"), Some(2)));
    let exists = client.put(&url).header("if-none-match", "*").body("x").send().unwrap();
    assert_eq!((exists.status().as_u16(), json(exists)["version"].as_u64()), (409, Some(2)));
    let current = client.put(&url).header("if-match", "2").body("bye").send().unwrap();
    assert_eq!(json(current)["version"], 3);
    assert_eq!(client.get(&url).send().unwrap().bytes().unwrap(), "bye");

    assert_eq!(json(client.delete(&url).send().unwrap()), serde_json::json!({ "existed": true }));
    assert_eq!(json(client.delete(&url).send().unwrap()), serde_json::json!({ "existed": false }));
    let gone = client.get(&url).send().unwrap();
    assert_eq!(
        (gone.status().as_u16(), json(gone)["kind"].as_str().map(str::to_owned)),
        (404, Some("not_found".into()))
    );
    let absent = client.put(&url).header("if-none-match", "*").body("again").send().unwrap();
    assert_eq!(absent.status(), 200, "a deleted item counts as absent");
}

#[test]
fn oversize_items_and_bad_keys_are_refused_with_clear_errors() {
    let node = node();
    let client = Client::new();
    let over = vec![7u8; ITEM_BYTES_MAX + 1];
    let url = item_url(&node, "limits", "big");
    // With a Content-Length (refused before the body is read) and chunked (refused at the limit).
    let announced = client.put(&url).body(over.clone()).send().unwrap();
    assert_eq!(announced.status(), 413);
    assert_eq!(json(announced)["kind"], "too_large");
    let chunks =
        futures::stream::iter(over.chunks(1 << 20).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let chunked = runtime.block_on(async {
        let response = reqwest::Client::new().post(&url).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
        (response.status(), response.json::<serde_json::Value>().await.unwrap())
    });
    assert_eq!(chunked.0, 413);
    assert!(chunked.1["message"].as_str().unwrap().contains(&ITEM_BYTES_MAX.to_string()), "{}", chunked.1);
    assert_eq!(client.get(&url).send().unwrap().status(), 404, "nothing of a refused item is stored");
    // Exactly at the limit is fine.
    assert_eq!(client.put(&url).body(vec![7u8; ITEM_BYTES_MAX]).send().unwrap().status(), 200);

    let long = "k".repeat(2_048);
    for url in [item_url(&node, &long, "item"), item_url(&node, "bucket", &long)] {
        let refused = client.put(&url).body("x").send().unwrap();
        assert_eq!(refused.status(), 400);
        assert!(json(refused)["message"].as_str().unwrap().contains("2048 bytes"));
    }
    let listing = client.get(format!("{}/v1/store/{long}", node.url)).send().unwrap();
    assert_eq!(listing.status(), 400);

    let cli = store(&node, &["put", "limits", "big", "-"], &over);
    assert!(!cli.status.success());
    assert!(text(&cli.stderr).contains("limit of 6291456"), "{}", text(&cli.stderr));
}

#[test]
fn the_cli_verbs_round_trip_a_5_mib_file_byte_for_byte() {
    let node = node();
    let dir = std::env::temp_dir().join(format!("girder-store-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut value = vec![0u8; 5 << 20];
    fastrand::Rng::with_seed(5).fill(&mut value);
    let (input, output) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&input, &value).unwrap();
    let (bucket, item) = ("Zürich-東京 🚀", "naïve résumé?#%");

    let put = store(&node, &["put", bucket, item, input.to_str().unwrap()], b"");
    assert_eq!((text(&put.stdout), text(&put.stderr)), ("1".into(), String::new()));
    let got = store(&node, &["get", bucket, item, "-o", output.to_str().unwrap()], b"");
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(std::fs::read(&output).unwrap() == value, "the file comes back byte for byte");
    let to_stdout = store(&node, &["get", bucket, item], b"");
    assert!(to_stdout.stdout == value, "and on stdout");
    // The HTTP API sees the same item under the same unicode keys.
    let http = Client::new().get(item_url(&node, bucket, item)).send().unwrap();
    assert_eq!(http.bytes().unwrap().len(), value.len());

    assert_eq!(text(&store(&node, &["append", bucket, item], b"tail").stdout), "2");
    let conflict = store(&node, &["put", bucket, item, "--if-version", "1"], b"x");
    assert!(!conflict.status.success());
    assert!(text(&conflict.stderr).contains("at version 2"), "{}", text(&conflict.stderr));
    assert!(!store(&node, &["put", bucket, item, "--if-absent"], b"x").status.success());
    assert_eq!(text(&store(&node, &["put", bucket, "second", "--if-absent"], b"22").stdout), "1");

    let list = store(&node, &["list", bucket], b"");
    let expected = format!("2\t{}\t{item}\n1\t2\tsecond\n", value.len() + 4);
    assert_eq!(String::from_utf8_lossy(&list.stdout), expected);

    assert_eq!(text(&store(&node, &["delete", bucket, item], b"").stdout), "deleted");
    let missing = store(&node, &["get", bucket, item, "-o", output.to_str().unwrap()], b"");
    assert!(!missing.status.success() && text(&missing.stderr).contains("no item"), "{}", text(&missing.stderr));
    assert_eq!(std::fs::read(&output).unwrap().len(), value.len(), "a failed get leaves the file as it was");
    assert_eq!(text(&store(&node, &["delete-bucket", bucket], b"").stdout), "deleted 1 item(s)");
    assert_eq!(store(&node, &["list", bucket], b"").stdout, b"");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bucket_of_1000_items_streams_every_item_once_in_order() {
    let node = node();
    let items: Vec<(String, String)> =
        (0..1_000).map(|i| (format!("item-{i:04}"), format!("value {i} {}", "x".repeat(i % 50)))).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let puts = futures::stream::iter(items.iter().rev())
            .map(|(item, value)| client.put(item_url(&node, "thousand", item)).body(value.clone()).send())
            .buffer_unordered(16);
        puts.for_each(|sent| async move { assert_eq!(sent.unwrap().status(), 200) }).await;
    });

    let body = Client::new().get(format!("{}/v1/store/thousand", node.url)).send().unwrap();
    assert_eq!(body.headers()["content-type"], "application/x-ndjson");
    let lines: Vec<serde_json::Value> =
        body.text().unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), items.len());
    for ((item, value), line) in items.iter().zip(&lines) {
        assert_eq!(line["item"], item.as_str());
        assert_eq!(line["version"], 1);
        assert_eq!(line["bytes"], value.len());
        assert_eq!(line["value_b64"], base64(value.as_bytes()));
    }

    let listed = store(&node, &["list", "thousand"], b"");
    let names: Vec<String> = text(&listed.stdout).lines().map(|l| l.rsplit('\t').next().unwrap().to_owned()).collect();
    assert!(names.iter().eq(items.iter().map(|(item, _)| item)), "the CLI lists every item once, in order");
    assert_eq!(text(&store(&node, &["delete-bucket", "thousand"], b"").stdout), "deleted 1000 item(s)");
    assert_eq!(Client::new().get(format!("{}/v1/store/thousand", node.url)).send().unwrap().text().unwrap(), "");
}

/// Standard base64 with padding, to check `value_b64` without another dependency.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (i, &b)| word | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            let six = (word >> (18 - 6 * i)) & 63;
            out.push(if i <= chunk.len() { ALPHABET[six as usize] as char } else { '=' });
        }
    }
    out
}
