//! `GET /v1/functions`: the catalogue of the functions the grid serves, with their
//! parameters' names and JSON schemas, their result's schema and their policies; and, from
//! the statekeeper's directory, the functions other nodes serve that this one does not know.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::grid::function::{FnKind, Policy};
use crate::grid::Node;

/// Most functions served only elsewhere that one catalogue looks up (one directory read
/// each), so a grid with a huge directory cannot make a catalogue request expensive.
pub const ELSEWHERE_MAX: usize = 1_000;
/// Directory look-ups in flight at once for one catalogue.
const LOOKUPS_AT_ONCE: usize = 16;
/// How long the catalogue waits for the directory before answering without it.
const DIRECTORY_TIMEOUT_MS: u64 = 2_000;

/// What `GET /v1/functions` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Catalogue {
    /// The node that answered.
    pub node: String,
    /// Whether the statekeeper's directory was read: when `false` (it did not answer in
    /// time), functions served only by other nodes are missing and `nodes` is empty.
    pub directory_read: bool,
    /// Every function, sorted by name.
    pub functions: Vec<FunctionEntry>,
}

/// One function of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FunctionEntry {
    /// The namespace-qualified name, e.g. `examples/fib`.
    pub name: String,
    /// The version served.
    pub version: u32,
    /// Whether this node runs it; a function registered here but not run (a gateway) is
    /// still described.
    pub served_here: bool,
    /// The live nodes that serve it, by the directory, sorted.
    pub nodes: Vec<String>,
    /// `async` or `blocking`; `null` for a function this node does not know.
    pub kind: Option<Kind>,
    /// The parameters in order; `null` for a function this node does not know (its
    /// parameters and schemas are not in the directory).
    pub params: Option<Vec<ParamEntry>>,
    /// The result's JSON schema; `null` for a function this node does not know.
    pub result: Option<serde_json::Value>,
    /// Its policies; `null` for a function this node does not know.
    pub policy: Option<PolicyEntry>,
}

/// How a function runs on a worker (see [`FnKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An `async fn`.
    Async,
    /// A plain, blocking `fn`.
    Blocking,
}

/// One parameter of a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ParamEntry {
    /// The parameter's name in the function's signature.
    pub name: String,
    /// The JSON schema of the values it takes (`true`: any value).
    pub schema: serde_json::Value,
}

/// A function's policies (see [`Policy`]); `null` means the node's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyEntry {
    /// How many times an evaluation that panicked or whose node was lost is run again.
    pub retries: Option<u32>,
    /// Longest an evaluation may run, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// How long a memoized result is kept, in milliseconds.
    pub ttl_ms: Option<u64>,
}

impl From<Policy> for PolicyEntry {
    fn from(policy: Policy) -> PolicyEntry {
        PolicyEntry { retries: policy.retries, timeout_ms: policy.timeout_ms, ttl_ms: policy.ttl_ms }
    }
}

impl From<FnKind> for Kind {
    fn from(kind: FnKind) -> Kind {
        match kind {
            FnKind::Async => Kind::Async,
            FnKind::Blocking => Kind::Blocking,
        }
    }
}

/// The catalogue route.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/functions", get(functions))
}

async fn functions(State(state): State<Arc<AppState>>) -> Json<Catalogue> {
    Json(catalogue(&state.node).await)
}

/// The functions registered on `node` as it describes them, without the directory.
pub(super) fn registered(node: &Node) -> Vec<FunctionEntry> {
    let registry = node.registry();
    let served: BTreeSet<String> = node.info().functions.into_iter().collect();
    registry
        .names()
        .into_iter()
        .filter_map(|(name, version)| {
            let function = &registry.get(name)?.function;
            let schemas = function.schemas();
            let mut schemas_of = schemas.params.into_iter();
            let params = function
                .params()
                .iter()
                .map(|param| {
                    // A function that declares fewer schemas than parameters allows anything.
                    let mut schema = schemas_of.next().unwrap_or(serde_json::Value::Bool(true));
                    bound_integers(&mut schema);
                    ParamEntry { name: (*param).to_owned(), schema }
                })
                .collect();
            Some(FunctionEntry {
                name: name.to_owned(),
                version,
                served_here: served.contains(name),
                nodes: Vec::new(),
                kind: Some(function.kind().into()),
                params: Some(params),
                result: Some(result_schema(schemas.output)),
                // The attribute's, with this node's overrides (`--policy`).
                policy: Some(node.policy(name).unwrap_or_else(|| function.policy()).into()),
            })
        })
        .collect()
}

/// The range of the integers of a schemars `format`, which JSON Schema validators do not
/// know: `None` for a format that is no integer type, or whose range JSON numbers cannot
/// write (128-bit).
fn integer_range(format: &str) -> Option<(i64, u64)> {
    let range = match format {
        "int8" => (i64::from(i8::MIN), i8::MAX as u64),
        "int16" => (i64::from(i16::MIN), i16::MAX as u64),
        "int32" => (i64::from(i32::MIN), i32::MAX as u64),
        "int64" | "int" => (i64::MIN, i64::MAX as u64),
        "uint8" => (0, u64::from(u8::MAX)),
        "uint16" => (0, u64::from(u16::MAX)),
        "uint32" => (0, u64::from(u32::MAX)),
        "uint64" | "uint" => (0, u64::MAX),
        _ => return None,
    };
    Some(range)
}

/// Whether `schema` is an integer type (alone or with others, like `null`).
fn is_integer(schema: &serde_json::Map<String, serde_json::Value>) -> bool {
    match schema.get("type") {
        Some(serde_json::Value::String(name)) => name == "integer",
        Some(serde_json::Value::Array(names)) => names.iter().any(|name| name == "integer"),
        _ => false,
    }
}

/// Calls `visit` on every object of `schema`, depth first, children before their parent.
fn walk(schema: &mut serde_json::Value, visit: &mut dyn FnMut(&mut serde_json::Value)) {
    match schema {
        serde_json::Value::Object(object) => object.values_mut().for_each(|value| walk(value, visit)),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|value| walk(value, visit)),
        _ => return,
    }
    if schema.is_object() {
        visit(schema);
    }
}

/// Gives every integer of `schema` whose `format` names its Rust type (`uint32`, ...) the
/// bounds of that type, so that clients and validators know them: a parameter takes any
/// number in its type's range (and, beyond ±2^53, its decimal text as well).
fn bound_integers(schema: &mut serde_json::Value) {
    walk(schema, &mut |schema| {
        let Some(object) = schema.as_object_mut() else { return };
        let range = object.get("format").and_then(|f| f.as_str()).and_then(integer_range);
        if let (true, Some((min, max))) = (is_integer(object), range) {
            object.entry("minimum").or_insert(min.into());
            object.entry("maximum").or_insert(max.into());
        }
    });
}

/// A result's schema as its JSON form is: integers beyond ±2^53 come as their decimal text
/// (see [`crate::codec`]), so an integer type whose range reaches beyond is a number within
/// ±2^53 or a string of digits.
fn result_schema(mut schema: serde_json::Value) -> serde_json::Value {
    const EXACT: u64 = crate::codec::JSON_EXACT_INT_MAX;
    bound_integers(&mut schema);
    walk(&mut schema, &mut |schema| {
        let Some(object) = schema.as_object_mut() else { return };
        let format = object.get("format").and_then(|f| f.as_str()).unwrap_or_default();
        let wide = matches!(format, "int64" | "int" | "uint64" | "uint" | "int128" | "uint128");
        if !(is_integer(object) && wide) {
            return;
        }
        let mut number = object.clone();
        let lowest = if format.starts_with('u') { 0 } else { -(EXACT as i64) };
        number.insert("minimum".to_owned(), lowest.into());
        number.insert("maximum".to_owned(), EXACT.into());
        let text = serde_json::json!({
            "type": "string",
            "pattern": "^-?[1-9][0-9]{15,}$",
            "description": "An integer beyond ±2^53, as its decimal text.",
        });
        *schema = serde_json::json!({ "anyOf": [number, text] });
    });
    schema
}

/// The catalogue of `node`: its registered functions, and those the directory says other
/// nodes serve; the directory part is given up after [`DIRECTORY_TIMEOUT_MS`].
pub(super) async fn catalogue(node: &Node) -> Catalogue {
    let mut functions = registered(node);
    let directory = tokio::time::timeout(Duration::from_millis(DIRECTORY_TIMEOUT_MS), elsewhere(node, &functions));
    let directory_read = match directory.await {
        Ok(Ok((servers, others))) => {
            for entry in &mut functions {
                entry.nodes = servers.get(&entry.name).cloned().unwrap_or_default();
            }
            functions.extend(others);
            functions.sort_by(|a, b| a.name.cmp(&b.name));
            true
        }
        Ok(Err(err)) => {
            tracing::warn!(node = node.id(), "the catalogue lists no function of other nodes: {err}");
            false
        }
        Err(_) => {
            tracing::warn!(
                node = node.id(),
                "the catalogue lists no function of other nodes: the directory took over {DIRECTORY_TIMEOUT_MS} ms"
            );
            false
        }
    };
    Catalogue { node: node.id().to_owned(), directory_read, functions }
}

/// Which live nodes serve each function, and the functions `known` lacks with the version
/// the directory has for them (at most [`ELSEWHERE_MAX`]).
async fn elsewhere(
    node: &Node,
    known: &[FunctionEntry],
) -> Result<(BTreeMap<String, Vec<String>>, Vec<FunctionEntry>), crate::error::StatekeeperError> {
    let statekeeper = node.statekeeper();
    let mut servers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for info in statekeeper.live_nodes().await? {
        for function in info.functions {
            servers.entry(function).or_default().push(info.id.clone());
        }
    }
    for ids in servers.values_mut() {
        ids.sort_unstable();
        ids.dedup();
    }
    let known: BTreeSet<&str> = known.iter().map(|entry| entry.name.as_str()).collect();
    // Owned, so the look-ups' futures borrow nothing (a handler's future must not).
    let unknown: Vec<(String, Vec<String>)> = servers
        .iter()
        .filter(|(name, _)| !known.contains(name.as_str()))
        .take(ELSEWHERE_MAX)
        .map(|(name, ids)| (name.clone(), ids.clone()))
        .collect();
    let others: Vec<FunctionEntry> = futures::stream::iter(unknown)
        .map(|(name, nodes)| {
            let statekeeper = statekeeper.clone();
            async move {
                let version = statekeeper.function_version(&name).await?;
                Ok::<_, crate::error::StatekeeperError>(version.map(|version| FunctionEntry {
                    name,
                    version,
                    served_here: false,
                    nodes,
                    kind: None,
                    params: None,
                    result: None,
                    policy: None,
                }))
            }
        })
        .buffered(LOOKUPS_AT_ONCE)
        // A function whose last node left between the two reads has no version: skip it.
        .try_filter_map(|entry| futures::future::ready(Ok(entry)))
        .try_collect()
        .await?;
    Ok((servers, others))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::ServiceExt;

    use super::Catalogue;
    use crate::control::Statekeeper;
    use crate::control::{Embedded, EmbeddedConfig};
    use crate::{Node, PoolSpec, Registry, WorkerSpec};

    async fn node(statekeeper: &Arc<dyn Statekeeper>, id: &str, functions: &[&str]) -> Node {
        Node::builder()
            .id(id)
            .statekeeper(statekeeper.clone())
            .registry(Registry::with_examples().only(functions).expect("examples"))
            .heartbeat_ms(10)
            .pool(PoolSpec::new("main"))
            .workers(WorkerSpec::new("main", 1, 1))
            .start()
            .await
            .expect("node starts")
    }

    #[test]
    fn integers_get_their_types_bounds_and_wide_results_may_be_text() {
        #[derive(schemars::JsonSchema)]
        #[allow(dead_code)]
        struct Reading {
            count: u64,
            small: i8,
        }
        let schema = |value: schemars::Schema| serde_json::to_value(value).expect("json");
        let mut param = schema(schemars::schema_for!(u32));
        super::bound_integers(&mut param);
        assert_eq!((param["minimum"].as_u64(), param["maximum"].as_u64()), (Some(0), Some(u64::from(u32::MAX))));
        let mut param = schema(schemars::schema_for!(i64));
        super::bound_integers(&mut param);
        assert_eq!((param["minimum"].as_i64(), param["maximum"].as_i64()), (Some(i64::MIN), Some(i64::MAX)));

        // A u64 result within 2^53 is a number; beyond, the digits of a string.
        let result = super::result_schema(schema(schemars::schema_for!(Reading)));
        let count = &result["properties"]["count"]["anyOf"];
        assert_eq!(count[0]["maximum"].as_u64(), Some(crate::codec::JSON_EXACT_INT_MAX));
        assert_eq!(count[1]["type"], "string");
        assert_eq!(result["properties"]["small"]["maximum"].as_i64(), Some(127));
        let optional = super::result_schema(schema(schemars::schema_for!(Option<u64>)));
        assert_eq!(optional["anyOf"][0]["type"], serde_json::json!(["integer", "null"]));
    }

    async fn catalogue_of(router: &axum::Router) -> Catalogue {
        let request = axum::http::Request::get("/v1/functions").body(axum::body::Body::empty()).expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), 200);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        serde_json::from_slice(&body).expect("a catalogue")
    }

    #[tokio::test]
    async fn lists_local_functions_and_those_only_other_nodes_serve() {
        let statekeeper: Arc<dyn Statekeeper> = Arc::new(Embedded::new(EmbeddedConfig::default()));
        let here = Arc::new(node(&statekeeper, "here", &["examples/tree", "examples/fib"]).await);
        let there = node(&statekeeper, "there", &["examples/fib", "examples/echo"]).await;
        let router = super::super::router(here.clone(), super::super::HttpConfig::default());
        // The directory learns what a node serves from its heartbeats (every 10 ms here).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let catalogue = loop {
            let catalogue = catalogue_of(&router).await;
            if catalogue.functions.iter().any(|f| f.name == "examples/echo") {
                break catalogue;
            }
            assert!(tokio::time::Instant::now() < deadline, "echo never showed up: {catalogue:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(catalogue.directory_read);
        let names: Vec<&str> = catalogue.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["examples/echo", "examples/fib", "examples/tree"]);
        let [echo, fib, tree] = &catalogue.functions[..] else { unreachable!() };
        assert!(!echo.served_here && echo.params.is_none() && echo.kind.is_none() && echo.policy.is_none());
        assert_eq!(echo.version, 0);
        assert_eq!(echo.nodes, ["there"]);
        assert!(fib.served_here);
        assert_eq!(fib.version, 1);
        assert_eq!(fib.nodes, ["here", "there"]);
        let params: Vec<&str> = tree.params.as_ref().expect("known").iter().map(|p| p.name.as_str()).collect();
        assert_eq!(params, ["depth", "fanout", "id"]);
        let depth = &tree.params.as_ref().expect("known")[0].schema;
        assert_eq!(depth["maximum"].as_u64(), Some(u64::from(u32::MAX)), "{depth}");
        assert_eq!(tree.kind, Some(super::Kind::Async));
        assert_eq!(tree.policy, Some(super::PolicyEntry { retries: None, timeout_ms: None, ttl_ms: None }));
        there.shutdown().await;
        here.shutdown().await;
    }
}
