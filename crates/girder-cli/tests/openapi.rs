//! The catalogue and the OpenAPI document against real `girder node` processes: the
//! examples are listed with their parameters (over HTTP and by `girder functions`); the
//! document lists every route of the router and every function, passes
//! `openapi-spec-validator`, and `schemathesis` fuzzes the node from it without a server
//! error beyond the documented 503/504/507. Both tools come from PyPI into a virtual
//! environment cached under `target/tmp`, keyed by their versions and Python's.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{text, NodeProcess, GIRDER};
use girder::http::Catalogue;
use tokio::process::Command;

/// The tools, pinned so that a run tests this code, not a new release of them.
const VALIDATOR: &str = "openapi-spec-validator==0.9.0";
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Longest the virtual environment may take to build (a fresh machine downloads both).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a fuzzing run may take; it takes about 20 s on two cores.
const FUZZ_TIMEOUT: Duration = Duration::from_secs(120);
const TOKEN: &str = "openapi-test-token";

/// The node the document and fuzzing tests run against: a bearer token (so the document
/// says so, and schemathesis checks that a request without it is refused), and limits that
/// end any call a fuzzer makes within a second or two.
const FUZZED_NODE: &[&str] = &[
    "--id",
    "fuzzed",
    "--workers",
    "1",
    "--slots",
    "4",
    "--time-limit-ms",
    "1000",
    "--http-deadline-ms",
    "2000",
    "--call-requests-max",
    "1000",
    "--call-depth-max",
    "64",
    "--structures-bytes-max",
    "64M",
    "--token",
    TOKEN,
];

/// Runs `command` for at most `timeout` and returns its output; fails the test otherwise.
async fn run(command: &mut Command, timeout: Duration, what: &str) -> std::process::Output {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let output = command.output();
    let output = tokio::time::timeout(timeout, output)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {} s", timeout.as_secs()))
        .unwrap_or_else(|err| panic!("{what} does not start: {err}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The virtual environment with both tools: built once per key, in a directory of its own
/// that is renamed into place when complete, so concurrent test processes never use half of
/// one (tools are run as `python -m`, which does not mind the rename).
async fn venv() -> &'static Path {
    static VENV: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    VENV.get_or_init(build_venv).await
}

async fn build_venv() -> PathBuf {
    let version = run(
        Command::new("python3").args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]),
        Duration::from_secs(30),
        "python3 (needed for the OpenAPI tools)",
    )
    .await;
    let key = format!("py{}-{VALIDATOR}-{SCHEMATHESIS}", text(&version.stdout)).replace("==", "-");
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("openapi-venv-{key}"));
    if dir.join("ready").exists() {
        return dir;
    }
    let building = root.join(format!("openapi-venv-{key}.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    run(Command::new("python3").arg("-m").arg("venv").arg(&building), INSTALL_TIMEOUT, "python3 -m venv").await;
    let pip = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", VALIDATOR, SCHEMATHESIS];
    run(Command::new(building.join("bin/python")).args(pip), INSTALL_TIMEOUT, "pip install").await;
    std::fs::write(building.join("ready"), key).expect("mark the venv ready");
    if std::fs::rename(&building, &dir).is_err() {
        // Another process got there first with a complete one, or left a broken one.
        if !dir.join("ready").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&building, &dir).expect("move the venv into place");
        } else {
            let _ = std::fs::remove_dir_all(&building);
        }
    }
    dir
}

/// A scratch directory of this test under `target/tmp`, emptied.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("openapi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

async fn get_json(url: &str, token: Option<&str>) -> serde_json::Value {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the node answers");
    assert_eq!(response.status(), 200, "GET {url}");
    response.json().await.expect("JSON")
}

#[tokio::test]
async fn the_catalogue_lists_the_examples_with_their_parameters() {
    let node = NodeProcess::start(&["--id", "catalogued", "--workers", "1", "--slots", "2"]);
    let body = get_json(&format!("{}/v1/functions", node.url), None).await;
    let catalogue: Catalogue = serde_json::from_value(body.clone()).expect("a catalogue");
    assert!(catalogue.directory_read);
    let names: Vec<&str> = catalogue.functions.iter().map(|f| f.name.as_str()).collect();
    let examples: Vec<&str> = girder::Registry::with_examples().names().into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, examples, "every example, sorted by name");
    let params = |name: &str| {
        let function = catalogue.functions.iter().find(|f| f.name == name).expect("listed");
        assert!(function.served_here && function.nodes == ["catalogued"], "{function:?}");
        let params = function.params.as_ref().expect("known here");
        params.iter().map(|p| p.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(params("examples/fib"), ["n"]);
    assert_eq!(params("examples/tree"), ["depth", "fanout", "id"]);
    assert_eq!(params("examples/whoami"), ["tag"]);
    assert!(params("examples/panic").is_empty());
    let fib = catalogue.functions.iter().find(|f| f.name == "examples/fib").expect("fib");
    assert_eq!(fib.version, 1);
    let blocking = catalogue.functions.iter().find(|f| f.name == "examples/tree_blocking").expect("listed");
    assert_eq!(blocking.kind, Some(girder::http::catalogue::Kind::Blocking));

    // `girder functions`: a table with a line per function, or the node's JSON.
    let out = std::process::Command::new(GIRDER).args(["functions", "--node", &node.url]).output().expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("name") && lines[0].contains("version"), "{table}");
    assert_eq!(lines.len(), 1 + examples.len(), "{table}");
    let tree = lines.iter().find(|line| line.starts_with("examples/tree ")).expect("a tree line");
    assert!(tree.contains("(depth: ") && tree.contains(", fanout: ") && tree.contains(", id: "), "{tree}");
    let out =
        std::process::Command::new(GIRDER).args(["functions", "--json", "--node", &node.url]).output().expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(printed["functions"], body["functions"]);
}

#[tokio::test]
async fn girder_functions_sends_the_token_and_says_when_it_is_missing() {
    let node = NodeProcess::start(&["--id", "guarded", "--workers", "1", "--slots", "1", "--token", TOKEN]);
    let without = std::process::Command::new(GIRDER)
        .args(["functions", "--node", &node.url])
        .env_remove("GIRDER_TOKEN")
        .output()
        .expect("runs");
    assert!(!without.status.success());
    assert!(text(&without.stderr).contains("requires a bearer token"), "{}", text(&without.stderr));
    let with = std::process::Command::new(GIRDER)
        .args(["functions", "--node", &node.url])
        .env("GIRDER_TOKEN", TOKEN)
        .output()
        .expect("runs");
    assert!(with.status.success(), "{}", text(&with.stderr));
    assert!(text(&with.stdout).contains("examples/fib"));
}

/// Every (path, method) of an OpenAPI document.
fn operations(document: &serde_json::Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().expect("a path item").keys().map(move |method| (path.clone(), method.clone()))
        })
        .collect()
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_validates() {
    let node = NodeProcess::start(FUZZED_NODE);
    let document = get_json(&format!("{}/v1/openapi.json", node.url), Some(TOKEN)).await;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["security"], serde_json::json!([{ "bearer": [] }]));
    let catalogue: Catalogue =
        serde_json::from_value(get_json(&format!("{}/v1/functions", node.url), Some(TOKEN)).await).expect("catalogue");
    let mut expected: BTreeSet<(String, String)> =
        girder::http::ROUTES.iter().map(|route| (route.openapi_path(), route.method.to_ascii_lowercase())).collect();
    expected.extend(catalogue.functions.iter().map(|f| (format!("/v1/call/{}", f.name), "post".to_owned())));
    assert_eq!(operations(&document), expected, "the document and the router's routes differ");
    let fib = &document["paths"]["/v1/call/examples/fib"]["post"]["requestBody"]["content"]["application/json"];
    assert_eq!(fib["schema"]["maxItems"], 1, "{fib}");

    let dir = scratch("validate");
    let file = dir.join("openapi.json");
    std::fs::write(&file, document.to_string()).expect("write the document");
    let venv = venv().await;
    let mut validate = Command::new(venv.join("bin/python"));
    validate.args(["-m", "openapi_spec_validator"]).arg(&file);
    let out = run(&mut validate, Duration::from_secs(60), "openapi-spec-validator").await;
    assert!(text(&out.stdout).ends_with("OK"), "{}", text(&out.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}

/// schemathesis checks of our own: no server error but the documented ones; the lines of a
/// map's NDJSON are results; data the document allows is not refused as malformed (400).
/// The last replaces schemathesis's `positive_data_acceptance`, which also counts a
/// function's own error (422) as a refusal, and cannot be told that `?all=true` of
/// `POST /v1/forget` takes no body.
const HOOKS: &str = r#"
import json
import schemathesis

SERVER_ERRORS_DOCUMENTED = {503, 504, 507}


@schemathesis.check
def no_undocumented_server_error(ctx, response, case):
    status = response.status_code
    if status < 500 or status in SERVER_ERRORS_DOCUMENTED:
        return None
    # The example that panics on purpose answers 500 `panic`, as documented.
    if status == 500 and case.path == "/v1/call/examples/panic" and json.loads(response.text)["kind"] == "panic":
        return None
    raise AssertionError(f"{status} from {case.method} {case.formatted_path}: {response.text[:500]}")


@schemathesis.check
def map_lines_are_results(ctx, response, case):
    if case.path != "/v1/map/{function}" or response.status_code != 200:
        return None
    for line in response.text.splitlines():
        result = json.loads(line)
        assert isinstance(result.get("index"), int), line
        assert ("value" in result) != ("error" in result), line
        if "error" in result:
            assert isinstance(result["error"]["kind"], str) and isinstance(result["error"]["message"], str), line


@schemathesis.check
def valid_data_is_not_a_bad_request(ctx, response, case):
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    # `?all=true` with a body is refused, which the document can say only in words.
    if case.path == "/v1/forget/{function}" and str((case.query or {}).get("all")).lower() == "true":
        return None
    raise AssertionError(f"schema-valid data refused: {case.method} {case.formatted_path}: {response.text[:500]}")
"#;

#[tokio::test]
async fn schemathesis_finds_no_undocumented_server_error() {
    let node = NodeProcess::start(FUZZED_NODE);
    let document = get_json(&format!("{}/v1/openapi.json", node.url), Some(TOKEN)).await;
    let dir = scratch("fuzz");
    std::fs::write(dir.join("openapi.json"), document.to_string()).expect("write the document");
    std::fs::write(dir.join("girder_hooks.py"), HOOKS).expect("write the hooks");
    let venv = venv().await;
    // GIRDER_FUZZ_SEED=S reruns a failing seed.
    let seed = std::env::var("GIRDER_FUZZ_SEED").unwrap_or_else(|_| fastrand::u32(..).to_string());
    // The output goes to a file, so that a run cut short still says what it was doing.
    let log_path = dir.join("schemathesis.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut fuzz = Command::new(venv.join("bin/python"));
    fuzz.current_dir(&dir)
        .env("PYTHONPATH", &dir)
        .env("SCHEMATHESIS_HOOKS", "girder_hooks")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .args(["-m", "schemathesis.cli", "run", "openapi.json", "--url", &node.url])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--max-examples", "10", "--workers", "1", "--seed", &seed])
        // A request the node does not answer in 10 s is a failure, and the first failure
        // ends the run.
        .args(["--request-timeout", "10", "--max-failures", "1"])
        // Every check but two, which the hooks above replace.
        .args(["--checks", "all", "--exclude-checks", "not_a_server_error,positive_data_acceptance"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true);
    let mut child = fuzz.spawn().expect("schemathesis starts");
    let status = tokio::time::timeout(FUZZ_TIMEOUT, child.wait()).await;
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|_| {
        panic!("schemathesis (seed {seed}) took over {} s; so far:\n{output}", FUZZ_TIMEOUT.as_secs())
    });
    assert!(status.expect("schemathesis runs").success(), "schemathesis (seed {seed}) failed:\n{output}");
    assert!(output.contains(" passed"), "{output}");
    // The node took all of it and still answers.
    let health = get_json(&format!("{}/v1/health", node.url), None).await;
    assert_eq!(health["node"], "fuzzed");
    let _ = std::fs::remove_dir_all(&dir);
}
