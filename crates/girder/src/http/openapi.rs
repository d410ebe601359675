//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of the node's HTTP API. Every route of
//! [`super::ROUTES`] names the function here that documents it; each function the node
//! knows adds `POST /v1/call/NAME`, whose body is the tuple of its parameters' schemas and
//! whose answer is its result's schema.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

use super::catalogue::{self, FunctionEntry};
use super::{AppState, ROUTES};
use crate::error::ErrorKind;

/// The `kind`s an error body may carry.
const ERROR_KINDS: [ErrorKind; 24] = [
    ErrorKind::FunctionError,
    ErrorKind::Panic,
    ErrorKind::UnknownFunction,
    ErrorKind::BadArguments,
    ErrorKind::BadResult,
    ErrorKind::DeadlineExceeded,
    ErrorKind::Statekeeper,
    ErrorKind::Shutdown,
    ErrorKind::BlockingInAsync,
    ErrorKind::NoPool,
    ErrorKind::BudgetExceeded,
    ErrorKind::Cancelled,
    ErrorKind::TimeLimitExceeded,
    ErrorKind::NodeLost,
    ErrorKind::BadRequest,
    ErrorKind::NotFound,
    ErrorKind::WrongKind,
    ErrorKind::TooLarge,
    ErrorKind::Unauthorized,
    ErrorKind::Overloaded,
    ErrorKind::Full,
    ErrorKind::Conflict,
    ErrorKind::Corrupt,
    ErrorKind::Unavailable,
];

// Does not compile once `ErrorKind` has a variant more, so that it is added above.
const _: fn(ErrorKind) = |kind| match kind {
    ErrorKind::FunctionError
    | ErrorKind::Panic
    | ErrorKind::UnknownFunction
    | ErrorKind::BadArguments
    | ErrorKind::BadResult
    | ErrorKind::DeadlineExceeded
    | ErrorKind::Statekeeper
    | ErrorKind::Shutdown
    | ErrorKind::BlockingInAsync
    | ErrorKind::NoPool
    | ErrorKind::BudgetExceeded
    | ErrorKind::Cancelled
    | ErrorKind::TimeLimitExceeded
    | ErrorKind::NodeLost
    | ErrorKind::BadRequest
    | ErrorKind::NotFound
    | ErrorKind::WrongKind
    | ErrorKind::TooLarge
    | ErrorKind::Unauthorized
    | ErrorKind::Overloaded
    | ErrorKind::Full
    | ErrorKind::Conflict
    | ErrorKind::Corrupt
    | ErrorKind::Unavailable => {}
};

/// What the document says that depends on the node's configuration.
pub(crate) struct Docs {
    /// Whether routes but health require a bearer token.
    secured: bool,
    /// Largest `timeout_ms` a call may ask for.
    timeout_ms_max: u64,
    /// Largest request body, in bytes.
    body_bytes_max: usize,
}

/// The OpenAPI route.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/openapi.json", get(serve))
}

async fn serve(State(state): State<Arc<AppState>>) -> Response {
    let body = state.openapi.get_or_init(|| {
        let docs = Docs {
            secured: !state.config.tokens.is_empty(),
            timeout_ms_max: state.config.timeout_ms_max,
            body_bytes_max: state.config.body_bytes_max,
        };
        let functions = catalogue::registered(&state.node);
        axum::body::Bytes::from(document(&docs, &functions).to_string())
    });
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

/// The whole document for a node with `docs`'s settings that knows `functions`.
fn document(docs: &Docs, functions: &[FunctionEntry]) -> Value {
    let mut schemas = base_schemas();
    let mut paths = Map::new();
    for route in ROUTES {
        let mut operation = (route.doc)(docs);
        if docs.secured && route.path != "/v1/health" {
            add_errors(docs, &mut operation, &[401]);
        }
        let path = paths.entry(route.openapi_path()).or_insert_with(|| json!({}));
        path[route.method.to_ascii_lowercase()] = operation;
    }
    for function in functions {
        let mut operation = function_call(docs, function, &mut schemas);
        if docs.secured {
            add_errors(docs, &mut operation, &[401]);
        }
        paths.insert(format!("/v1/call/{}", path_encode(&function.name)), json!({ "post": operation }));
    }
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "girder node",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of a girder node: calls of the grid's functions, the \
                cache, and what the node and the grid say about themselves. Every error is a \
                JSON body {\"kind\", \"message\"}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    });
    if docs.secured {
        document["security"] = json!([{ "bearer": [] }]);
    }
    document
}

/// What each error status means, whatever the route.
fn status_text(status: u16) -> &'static str {
    match status {
        400 => {
            "A malformed request (bad JSON, path, query or header): `bad_request`; arguments \
                that do not fit the function's parameters: `bad_arguments`."
        }
        401 => "No valid bearer token: `unauthorized`.",
        404 => {
            "Nothing by that name: `not_found`, or `unknown_function` when no live node \
                serves the function."
        }
        408 => "The body did not arrive in time; the connection closes.",
        409 => {
            "A conflict: `wrong_kind` (the key holds another kind of structure), \
                `cancelled` (the call was cancelled), a call id already in flight, or \
                `conflict` (a conditional store write found another version)."
        }
        413 => "The body is over the node's limit: `too_large`; the connection closes.",
        422 => {
            "The function returned an error (`function_error`, the message is its text) or \
                the call's tree went over its budget (`budget_exceeded`)."
        }
        429 => "This caller holds its share of the node's slots: `overloaded`; retry later.",
        500 => "The function panicked (`panic`), a stored value could not be read, or every copy of an item failed its checksum (`corrupt`).",
        502 => "The function's result could not be encoded: `bad_result`.",
        503 => {
            "The grid cannot take it now: `statekeeper`, `shutdown`, `overloaded` (the \
                node's call cap) or `unavailable` (no node could serve a store request in \
                time); retry later."
        }
        504 => {
            "The deadline passed (`deadline_exceeded`) or the evaluation ran over its time \
                limit (`time_limit_exceeded`)."
        }
        507 => "The store has no room for the value: `full`; nothing changed.",
        _ => "An error.",
    }
}

/// Adds the error responses `statuses` to `operation`.
fn add_errors(docs: &Docs, operation: &mut Value, statuses: &[u16]) {
    for status in statuses {
        let mut description = status_text(*status).to_owned();
        if *status == 413 {
            description.push_str(&format!(" This node's limit: {} bytes.", docs.body_bytes_max));
        }
        operation["responses"][status.to_string()] = json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
        });
    }
}

/// An operation with `id`, `summary`, `description`, `parameters` and a successful
/// response, plus the errors of `statuses`.
fn operation(docs: &Docs, head: [&str; 3], parameters: Vec<Value>, ok: (u16, Value), statuses: &[u16]) -> Value {
    let [id, summary, description] = head;
    let mut operation = json!({
        "operationId": id,
        "summary": summary,
        "description": description,
        "responses": { ok.0.to_string(): ok.1 },
    });
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    add_errors(docs, &mut operation, statuses);
    operation
}

/// A successful JSON response.
fn json_ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn path_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": schema })
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn counter() -> Value {
    json!({ "type": "integer", "minimum": 0 })
}

/// The call id header a caller may send.
fn call_id_param() -> Value {
    json!({
        "name": "girder-call-id",
        "in": "header",
        "required": false,
        "description": "The call's id, to cancel it with DELETE /v1/calls/{id}; by default the node makes one.",
        "schema": schema_ref("CallId"),
    })
}

/// The call id header every call and map response carries.
fn call_id_header(required: bool) -> Value {
    json!({ "girder-call-id": { "description": "The call's id.", "required": required, "schema": schema_ref("CallId") } })
}

/// The query parameters of a call (and of each call of a map).
fn call_params(docs: &Docs) -> Vec<Value> {
    vec![
        query_param(
            "timeout_ms",
            "The call's deadline in milliseconds (default: the node's); past it the call answers 504.",
            json!({ "type": "integer", "minimum": 0, "maximum": docs.timeout_ms_max }),
        ),
        query_param(
            "affinity",
            "Run on a node that owns this key when one has a free slot.",
            json!({ "type": "string" }),
        ),
        query_param(
            "bucket",
            "Run on a node that holds this bucket of the store (queueing there when all are \
             busy), where the function reads it without the network; it overrides `affinity`.",
            json!({ "type": "string", "minLength": 1, "maxLength": crate::store::KEY_BYTES_MAX }),
        ),
        query_param(
            "requests_max",
            "Lowers the node's limit of new requests of the call's tree (its root included; 0 \
             answers only from memoized results).",
            json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX }),
        ),
        query_param(
            "depth_max",
            "Lowers the node's limit of the call tree's depth.",
            json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
        ),
        call_id_param(),
    ]
}

/// The responses of a call that may fail.
const CALL_ERRORS: [u16; 12] = [400, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 507];

fn function_param() -> Value {
    path_param(
        "function",
        "The function's name, e.g. examples/fib (its `/` may be sent as is).",
        json!({ "type": "string", "minLength": 1 }),
    )
}

/// `POST /v1/call/{function}`.
pub(super) fn call(docs: &Docs) -> Value {
    let mut parameters = vec![function_param()];
    parameters.extend(call_params(docs));
    let mut ok = json_ok("The function's result as JSON.", json!(true));
    ok["headers"] = call_id_header(true);
    let mut operation = operation(
        docs,
        [
            "call",
            "Call a function",
            "Calls the function with the JSON array of its arguments and answers its result. \
             An identical call (same function, version and arguments) shares one evaluation \
             and its memoized result. An empty body is no arguments.",
        ],
        parameters,
        (200, ok),
        &CALL_ERRORS,
    );
    operation["requestBody"] = json!({
        "required": false,
        "content": { "application/json": { "schema": schema_ref("Arguments") } },
    });
    operation
}

/// `POST /v1/call/NAME` for one function this node knows.
fn function_call(docs: &Docs, function: &FunctionEntry, schemas: &mut Map<String, Value>) -> Value {
    let params = function.params.as_deref().unwrap_or_default();
    let items: Vec<Value> = params.iter().map(|param| embed(param.schema.clone(), &function.name, schemas)).collect();
    let mut body = json!({ "type": "array", "minItems": params.len(), "maxItems": params.len() });
    if !items.is_empty() {
        // OpenAPI's meta-schema wants at least one; no parameters is said by `maxItems: 0`.
        body["prefixItems"] = Value::Array(items);
    }
    let result = embed(function.result.clone().unwrap_or(Value::Bool(true)), &function.name, schemas);
    let names: Vec<&str> = params.iter().map(|param| param.name.as_str()).collect();
    let mut ok = json_ok("The function's result.", result);
    ok["headers"] = call_id_header(true);
    let id = format!("call:{}", function.name);
    let summary = format!("Call {} (version {})", function.name, function.version);
    let description = format!("The body is the array of its arguments: [{}].", names.join(", "));
    let mut operation = operation(docs, [&id, &summary, &description], call_params(docs), (200, ok), &CALL_ERRORS);
    operation["tags"] = json!(["functions"]);
    operation["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": body } } });
    operation
}

/// `POST /v1/map/{function}`.
pub(super) fn map(docs: &Docs) -> Value {
    let mut parameters = vec![function_param()];
    parameters.extend(call_params(docs));
    parameters.push(query_param(
        "concurrency",
        "Calls in flight at once (default 64; at most the caller's share of the node's calls).",
        json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX }),
    ));
    parameters.push(query_param(
        "ordered",
        "Whether lines come in input order (default: as calls complete).",
        json!({ "type": "boolean" }),
    ));
    let ok = json!({
        "description": "One JSON line per input as it completes (application/x-ndjson), each a MapLine.",
        "headers": call_id_header(true),
        "content": { "application/x-ndjson": { "schema": schema_ref("MapLine") } },
    });
    let mut operation = operation(
        docs,
        [
            "map",
            "Call a function on many inputs",
            "Calls the function once per argument array of the body, at most `concurrency` at \
             once, and streams each result as one NDJSON line as it completes. An input's error \
             is its line's; the status is 200 once the stream starts.",
        ],
        parameters,
        (200, ok),
        &[400, 404, 408, 409, 413, 429, 503, 504],
    );
    operation["requestBody"] = json!({
        "required": true,
        "content": { "application/json": { "schema": schema_ref("MapInputs") } },
    });
    operation
}

/// `DELETE /v1/calls/{id}`.
pub(super) fn cancel(docs: &Docs) -> Value {
    operation(
        docs,
        [
            "cancel",
            "Cancel a call or map in flight",
            "Cancels the call or map with this id in flight on this node, and the requests of \
             its tree that no other caller waits for.",
        ],
        vec![path_param("id", "The call's id (its girder-call-id).", schema_ref("CallId"))],
        (200, json_ok("The call was cancelled.", schema_ref("Cancelled"))),
        &[400, 404],
    )
}

/// `POST /v1/forget/{function}`.
pub(super) fn forget(docs: &Docs) -> Value {
    let mut operation = operation(
        docs,
        [
            "forget",
            "Forget memoized results",
            "Forgets the memoized result of the function with the body's arguments; with \
             `?all=true` and no body, every memoized result of the function's current version.",
        ],
        vec![
            function_param(),
            query_param("all", "Forget every memoized result of the function.", json!({ "type": "boolean" })),
        ],
        (200, json_ok("How many results were forgotten.", schema_ref("Forgotten"))),
        &[400, 404, 408, 413, 503, 504],
    );
    operation["requestBody"] = json!({
        "required": false,
        "content": { "application/json": { "schema": schema_ref("Arguments") } },
    });
    operation
}

/// `GET /v1/functions`.
pub(super) fn functions(docs: &Docs) -> Value {
    operation(
        docs,
        [
            "functions",
            "The functions the grid serves",
            "Every function this node knows, with its parameters' names and JSON schemas, its \
             result's schema and its policies, and the functions only other nodes serve (from \
             the directory; their schemas are unknown here: null). Sorted by name.",
        ],
        Vec::new(),
        (200, json_ok("The catalogue.", schema_ref("Catalogue"))),
        &[],
    )
}

/// `GET /v1/openapi.json`.
pub(super) fn openapi(docs: &Docs) -> Value {
    operation(
        docs,
        ["openapi", "This document", "The OpenAPI 3.1 document of this node's HTTP API."],
        Vec::new(),
        (200, json_ok("An OpenAPI 3.1 document.", json!({ "type": "object" }))),
        &[],
    )
}

/// `GET /v1/health`.
pub(super) fn health(docs: &Docs) -> Value {
    let mut operation = operation(
        docs,
        [
            "health",
            "Whether the node answers",
            "Always 200 while the node runs, `degraded` once every slot has been busy for a \
             while. Needs no token.",
        ],
        Vec::new(),
        (200, json_ok("The node's health.", schema_ref("Health"))),
        &[],
    );
    operation["security"] = json!([]);
    operation
}

/// `GET /v1/stats`.
pub(super) fn stats(docs: &Docs) -> Value {
    operation(
        docs,
        ["stats", "The node's counters", "Calls, memo hits, workers, pools and evaluations of this node."],
        Vec::new(),
        (200, json_ok("The node's counters.", schema_ref("Stats"))),
        &[],
    )
}

/// `GET /v1/status`.
pub(super) fn status(docs: &Docs) -> Value {
    operation(
        docs,
        ["status", "The grid's live nodes", "The live nodes as the statekeeper knows them."],
        Vec::new(),
        (200, json_ok("The live nodes.", schema_ref("Status"))),
        &[503],
    )
}

/// `GET /metrics`.
pub(super) fn metrics(docs: &Docs) -> Value {
    let ok = json!({
        "description": "Prometheus's text exposition format.",
        "content": { "text/plain": { "schema": { "type": "string" } } },
    });
    operation(docs, ["metrics", "The node's metrics", "For Prometheus."], Vec::new(), (200, ok), &[])
}

/// `GET /v1/placement/{id}`.
pub(super) fn placement(docs: &Docs) -> Value {
    operation(
        docs,
        ["placement", "Where a key lives", "The flock of a key and the live nodes that own it."],
        vec![path_param("id", "Any key.", json!({ "type": "string" }))],
        (200, json_ok("The key's owners.", schema_ref("Placement"))),
        &[400, 503, 504],
    )
}

fn cache_key() -> Value {
    // Keys are stored under a prefix, within the store's limit in bytes. `maxLength` counts
    // characters, so it is exact for ASCII keys and lets longer UTF-8 through to a 400.
    let bytes_max = crate::structures::KEY_BYTES_MAX - super::USER_KEY_PREFIX.len();
    let description = format!("The cache key: 1 to {bytes_max} bytes of UTF-8.");
    path_param("key", &description, json!({ "type": "string", "minLength": 1, "maxLength": bytes_max }))
}

/// The errors of every cache operation.
const CACHE_ERRORS: [u16; 6] = [400, 409, 500, 503, 504, 507];

/// `GET /v1/cache/{key}`.
pub(super) fn cache_get(docs: &Docs) -> Value {
    let ok = json!({
        "description": "The value's bytes.",
        "content": { "application/octet-stream": { "schema": { "type": "string", "contentMediaType": "application/octet-stream" } } },
    });
    let mut operation = operation(docs, ["cache_get", "Read a cached value", ""], vec![cache_key()], (200, ok), &[404]);
    add_errors(docs, &mut operation, &CACHE_ERRORS);
    operation
}

fn raw_body() -> Value {
    json!({
        "required": false,
        "content": { "application/octet-stream": { "schema": { "type": "string", "contentMediaType": "application/octet-stream" } } },
    })
}

/// `PUT /v1/cache/{key}`.
pub(super) fn cache_put(docs: &Docs) -> Value {
    let ttl = query_param(
        "ttl_ms",
        "Drop the value after this many milliseconds.",
        json!({ "type": "integer", "minimum": 0, "maximum": crate::structures::TTL_MS_MAX }),
    );
    let ok = json!({ "description": "Stored." });
    let mut operation = operation(
        docs,
        ["cache_put", "Write a cached value", "The body is the value."],
        vec![cache_key(), ttl],
        (204, ok),
        &[408, 413],
    );
    add_errors(docs, &mut operation, &CACHE_ERRORS);
    operation["requestBody"] = raw_body();
    operation
}

/// `POST /v1/cache/{key}`.
pub(super) fn cache_append(docs: &Docs) -> Value {
    let ok = json_ok("The value's size after the append.", schema_ref("Appended"));
    let mut operation = operation(
        docs,
        ["cache_append", "Append to a cached value", "The body is appended to the value (created if missing)."],
        vec![cache_key()],
        (200, ok),
        &[408, 413],
    );
    add_errors(docs, &mut operation, &CACHE_ERRORS);
    operation["requestBody"] = raw_body();
    operation
}

/// `DELETE /v1/cache/{key}`.
pub(super) fn cache_delete(docs: &Docs) -> Value {
    let ok = json!({ "description": "Deleted." });
    let mut operation =
        operation(docs, ["cache_delete", "Delete a cached value", ""], vec![cache_key()], (204, ok), &[404]);
    add_errors(docs, &mut operation, &CACHE_ERRORS);
    operation
}

fn store_params(item: bool) -> Vec<Value> {
    let key = |name: &str, what: &str| {
        let description = format!("The {what} key: 1 to {} bytes of UTF-8.", crate::store::KEY_BYTES_MAX);
        path_param(
            name,
            &description,
            json!({ "type": "string", "minLength": 1, "maxLength": crate::store::KEY_BYTES_MAX }),
        )
    };
    let mut params = vec![key("bucket", "bucket")];
    if item {
        params.push(key("item", "item"));
    }
    params
}

/// The errors of every store operation.
const STORE_ERRORS: [u16; 4] = [400, 500, 503, 507];

fn store_op(docs: &Docs, head: [&str; 3], item: bool, ok: (u16, Value), statuses: &[u16]) -> Value {
    let mut operation = operation(docs, head, store_params(item), ok, statuses);
    add_errors(docs, &mut operation, &STORE_ERRORS);
    operation
}

/// `GET /v1/store/{bucket}/{item}`.
pub(super) fn store_get(docs: &Docs) -> Value {
    let ok = json!({
        "description": "The item's bytes; its version in `girder-version` and `ETag`.",
        "content": { "application/octet-stream": { "schema": { "type": "string", "contentMediaType": "application/octet-stream" } } },
    });
    store_op(docs, ["store_get", "Read an item", "From the best node holding its bucket."], true, (200, ok), &[404])
}

/// `PUT /v1/store/{bucket}/{item}`.
pub(super) fn store_put(docs: &Docs) -> Value {
    let ok = json_ok("Stored on every owner; its new version.", schema_ref("Written"));
    let about = "The body is the value. `If-Match: VERSION` writes only over that version, `If-None-Match: *` \
                 only if the item does not exist (409 `conflict` otherwise, with the item's version in \
                 `version`, null if it does not exist, and in `girder-version`).";
    let mut operation = store_op(docs, ["store_put", "Write an item", about], true, (200, ok), &[408, 409, 413]);
    operation["requestBody"] = raw_body();
    operation
}

/// `POST /v1/store/{bucket}/{item}`.
pub(super) fn store_append(docs: &Docs) -> Value {
    let ok = json_ok("Appended on every owner; the item's new version.", schema_ref("Written"));
    let head = ["store_append", "Append to an item", "The body is appended to the item (created if missing)."];
    let mut operation = store_op(docs, head, true, (200, ok), &[408, 413]);
    operation["requestBody"] = raw_body();
    operation
}

/// `DELETE /v1/store/{bucket}/{item}`.
pub(super) fn store_delete(docs: &Docs) -> Value {
    let ok = json_ok("Whether the item existed.", schema_ref("Existed"));
    store_op(docs, ["store_delete", "Delete an item", ""], true, (200, ok), &[])
}

/// `GET /v1/store/{bucket}`.
pub(super) fn store_bucket_get(docs: &Docs) -> Value {
    let ok = json!({
        "description": "One line per item in item order: `{\"item\", \"version\", \"bytes\", \"value_b64\"}`; an error ends the stream with `{\"error\": ...}`.",
        "content": { "application/x-ndjson": { "schema": { "type": "string" } } },
    });
    let head = ["store_bucket_get", "Read a whole bucket", "Streamed as it is read."];
    let mut operation = store_op(docs, head, false, (200, ok), &[]);
    let values = query_param("values", "`false` leaves `value_b64` out: a listing.", json!({ "type": "boolean" }));
    if let Some(parameters) = operation["parameters"].as_array_mut() {
        parameters.push(values);
    }
    operation
}

/// `DELETE /v1/store/{bucket}`.
pub(super) fn store_bucket_delete(docs: &Docs) -> Value {
    let ok = json_ok("How many items were deleted.", schema_ref("Deleted"));
    store_op(docs, ["store_bucket_delete", "Delete a whole bucket", ""], false, (200, ok), &[])
}

fn workflow_params() -> Vec<Value> {
    let name = |name: &str, what: &str| {
        let description =
            format!("The {what}: 1 to {} characters, no control characters.", crate::workflow::NAME_CHARS_MAX);
        // Control characters (C0, DEL, C1: what `char::is_control` says) are refused.
        let schema = json!({
            "type": "string",
            "minLength": 1,
            "maxLength": crate::workflow::NAME_CHARS_MAX,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
        });
        path_param(name, &description, schema)
    };
    vec![name("workflow", "workflow type (its `/` as `%2F`)"), name("id", "instance id")]
}

/// `GET /v1/workflows/{workflow}/{id}`.
pub(super) fn workflow_get(docs: &Docs) -> Value {
    let ok =
        json_ok("The instance's record: state as JSON, owner, epoch, positions, status.", json!({ "type": "object" }));
    let about = "Parked instances carry the error of the message that failed every attempt.";
    operation(docs, ["workflow_get", "Read a workflow instance", about], workflow_params(), (200, ok), &[400, 404, 503])
}

/// `GET /v1/workflows/{workflow}`.
pub(super) fn workflow_list(docs: &Docs) -> Value {
    let ok = json_ok(
        "How many instances the type has, and up to `limit` of their ids, sorted.",
        json!({
            "type": "object", "required": ["workflow", "count", "ids"],
            "properties": {
                "workflow": { "type": "string" }, "count": counter(),
                "ids": { "type": "array", "items": { "type": "string" } },
            },
        }),
    );
    let mut params = workflow_params();
    params.truncate(1);
    params.push(query_param(
        "limit",
        "At most this many ids (default 100; more than 1,000 lists 1,000).",
        json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
    ));
    let about = "Every instance that has had a message, finished and parked ones too.";
    operation(docs, ["workflow_list", "List a workflow type's instances", about], params, (200, ok), &[400, 503])
}

/// `POST /v1/workflows/{workflow}/{id}`.
pub(super) fn workflow_send(docs: &Docs) -> Value {
    let ok = json_ok(
        "Queued in the instance's mailbox: its sequence id there.",
        json!({
            "type": "object", "required": ["seq"], "properties": { "seq": counter() },
        }),
    );
    let about = "The body is the JSON message; the instance is created by its first message.";
    let mut operation = operation(
        docs,
        ["workflow_send", "Send to a workflow instance", about],
        workflow_params(),
        (202, ok),
        &[400, 413, 503],
    );
    operation["requestBody"] = json!({
        "required": true,
        "content": { "application/json": { "schema": {} } },
    });
    operation
}

/// `GET /v1/events`.
pub(super) fn events(docs: &Docs) -> Value {
    let ok = json_ok(
        "The events after `after`, each with its `seq`, and `next` (the `after` of the next read).",
        json!({
            "type": "object", "required": ["events", "next"],
            "properties": { "events": { "type": "array", "items": { "type": "object" } }, "next": counter() },
        }),
    );
    let params = vec![
        query_param(
            "after",
            "Return events after this sequence id (default 0).",
            json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX }),
        ),
        query_param(
            "limit",
            "At most this many events (default 100; more than 1,000 reads 1,000).",
            json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
        ),
        query_param(
            "wait_ms",
            "Wait up to this long for an event when there is none (at most 5,000).",
            json!({ "type": "integer", "minimum": 0, "maximum": super::events::WAIT_MS_MAX }),
        ),
    ];
    let about = "Nodes joining, leaving and dying; components starting, stopping and moving.";
    operation(docs, ["events", "Cluster lifecycle events", about], params, (200, ok), &[400, 503])
}

/// `GET /v1/flocks`.
pub(super) fn flocks(docs: &Docs) -> Value {
    let ok = json_ok("Each flock this node owns or holds, and the store's figures.", json!({ "type": "object" }));
    let about = "Ready, held, copying, live items and the digest replicas compare (equal digests, equal data).";
    operation(docs, ["flocks", "This node's flocks", about], vec![], (200, ok), &[503])
}

/// The schemas every document has, by name.
fn base_schemas() -> Map<String, Value> {
    let kinds: Vec<&str> = ERROR_KINDS.iter().map(|kind| kind.as_str()).collect();
    let mut schemas = Map::new();
    let mut add = |name: &str, schema: Value| {
        schemas.insert(name.to_owned(), schema);
    };
    add(
        "Error",
        json!({
            "type": "object",
            "required": ["kind", "message"],
            "properties": {
                "kind": { "type": "string", "enum": kinds },
                "message": { "type": "string", "description": "What went wrong, for a person." },
            },
        }),
    );
    add("Arguments", json!({ "type": "array", "description": "One JSON value per parameter, in order." }));
    add("Written", json!({ "type": "object", "required": ["version"], "properties": { "version": counter() } }));
    add(
        "Existed",
        json!({ "type": "object", "required": ["existed"], "properties": { "existed": { "type": "boolean" } } }),
    );
    add("Deleted", json!({ "type": "object", "required": ["deleted"], "properties": { "deleted": counter() } }));
    add("MapInputs", json!({ "type": "array", "items": schema_ref("Arguments") }));
    add(
        "MapLine",
        json!({
            "type": "object",
            "required": ["index"],
            "properties": { "index": counter(), "value": true, "error": schema_ref("Error") },
            "oneOf": [{ "required": ["value"] }, { "required": ["error"] }],
        }),
    );
    add("CallId", json!({ "type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$" }));
    add(
        "Cancelled",
        json!({
            "type": "object",
            "required": ["id", "cancelled"],
            "properties": { "id": schema_ref("CallId"), "cancelled": { "const": true } },
        }),
    );
    add("Forgotten", json!({ "type": "object", "required": ["forgotten"], "properties": { "forgotten": counter() } }));
    add(
        "Appended",
        json!({ "type": "object", "required": ["stored_bytes"], "properties": { "stored_bytes": counter() } }),
    );
    add("Health", health_schema());
    add("Stats", stats_schema());
    add(
        "Status",
        json!({ "type": "object", "required": ["nodes"], "properties": { "nodes": { "type": "array", "items": node_info_schema() } } }),
    );
    add(
        "Placement",
        json!({
            "type": "object",
            "required": ["id", "flock", "node_id", "node_ids"],
            "properties": {
                "id": { "type": "string" },
                "flock": counter(),
                "node_id": { "type": ["string", "null"], "description": "The owner to use, null when none is live." },
                "node_ids": { "type": "array", "items": { "type": "string" } },
            },
        }),
    );
    let catalogue = serde_json::to_value(schemars::schema_for!(catalogue::Catalogue)).unwrap_or(Value::Bool(true));
    let catalogue = embed(catalogue, "Catalogue", &mut schemas);
    schemas.insert("Catalogue".to_owned(), catalogue);
    schemas
}

fn health_schema() -> Value {
    json!({
        "type": "object",
        "required": ["status", "node", "slots", "busy"],
        "properties": {
            "status": { "type": "string", "enum": ["ok", "degraded"] },
            "node": { "type": "string" },
            "slots": counter(),
            "busy": counter(),
            "all_busy_ms": counter(),
            "message": { "type": "string" },
        },
    })
}

fn stats_schema() -> Value {
    let object = |required: &[&str], properties: Value| json!({ "type": "object", "required": required, "properties": properties });
    json!({
        "type": "object",
        "required": ["node", "calls", "memo_hits", "joined", "queued", "workers", "pools", "evaluations"],
        "properties": {
            "node": { "type": "string" },
            "calls": counter(),
            "memo_hits": counter(),
            "joined": counter(),
            "queued": counter(),
            "running": counter(),
            "workers": { "type": "array", "items": object(&["id", "pool", "slots", "executed"], json!({
                "id": { "type": "string" }, "pool": { "type": "string" }, "slots": counter(), "executed": counter(),
            })) },
            "pools": { "type": "array", "items": object(&["pool"], json!({
                "pool": { "type": "string" }, "handed_off": counter(), "hoisted": counter(), "queue_len": counter(),
            })) },
            "evaluations": { "type": "array", "items": object(&["function", "count"], json!({
                "function": { "type": "string" }, "count": counter(),
            })) },
            "store": store_stats_schema(),
        },
    })
}

/// The bucket store's figures in `GET /v1/stats` (`null` on a node without a store).
fn store_stats_schema() -> Value {
    let fields = [
        "items",
        "bytes",
        "flocks_ready",
        "flocks_syncing",
        "writes",
        "replicated",
        "copied",
        "repaired",
        "fenced",
        "syncs",
        "replication_lag_ms",
    ];
    let properties: Map<String, Value> = fields.iter().map(|field| ((*field).to_owned(), counter())).collect();
    json!({ "type": ["object", "null"], "required": fields, "properties": properties })
}

/// A live node as `GET /v1/status` describes it (its main fields; it may have more).
fn node_info_schema() -> Value {
    let text = json!({ "type": "string" });
    let texts = json!({ "type": "array", "items": { "type": "string" } });
    json!({
        "type": "object",
        "required": ["id", "host", "version", "pools", "functions", "workers", "health"],
        "properties": {
            "id": text,
            "http": { "type": ["string", "null"] },
            "host": text,
            "pid": counter(),
            "version": text,
            "cpus": counter(),
            "memory_total_bytes": counter(),
            "memory_free_bytes": counter(),
            "memory_max_bytes": { "type": ["integer", "null"], "minimum": 0 },
            "load_1m": { "type": "number" },
            "pools": texts,
            "functions": texts,
            "workers": { "type": "array", "items": {
                "type": "object",
                "required": ["id", "pool", "slots"],
                "properties": {
                    "id": text, "pool": text, "slots": counter(), "busy": counter(),
                    "queue_len": counter(), "executed": counter(),
                },
            } },
            "calls": counter(),
            "memo_hits": counter(),
            "evaluations": counter(),
            "heartbeat_ms": counter(),
            "heartbeat_age_ms": counter(),
            "flocks": counter(),
            "health": { "type": "string", "enum": ["alive", "suspect", "dead"] },
        },
    })
}

/// `schema` ready to sit anywhere in the document: its definitions (`$defs`, as schemars
/// writes them) move to `components/schemas` and its references follow, since a reference
/// like `#/$defs/Point` resolves against the document's root. Definitions keep their names
/// when that clashes with no different definition; otherwise they all take `owner` as a
/// prefix. Its `$schema` goes: the document says which dialect its schemas use.
fn embed(mut schema: Value, owner: &str, schemas: &mut Map<String, Value>) -> Value {
    let Some(object) = schema.as_object_mut() else { return schema };
    object.remove("$schema");
    let mut own: Map<String, Value> = Map::new();
    for key in ["$defs", "definitions"] {
        if let Some(Value::Object(defs)) = object.remove(key) {
            own.extend(defs);
        }
    }
    let recursive = contains_ref(&schema, "#");
    if own.is_empty() && !recursive {
        return schema;
    }
    let owner = component_name(owner);
    let mut names: BTreeMap<String, String> = own.keys().map(|name| (name.clone(), component_name(name))).collect();
    // Named before the definitions move in, so no definition can take the name.
    let root = recursive.then(|| unique_name(&format!("{owner}.root"), schemas));
    let clashes = |names: &BTreeMap<String, String>, schemas: &Map<String, Value>| {
        names.iter().any(|(name, target)| {
            let mut def = own[name].clone();
            rewrite_refs(&mut def, names, root.as_deref());
            schemas.get(target).is_some_and(|existing| *existing != def)
        })
    };
    if clashes(&names, schemas) {
        for (name, target) in names.iter_mut() {
            *target = unique_name(&format!("{owner}.{}", component_name(name)), schemas);
        }
    }
    for (name, mut def) in own {
        rewrite_refs(&mut def, &names, root.as_deref());
        schemas.insert(names[&name].clone(), def);
    }
    rewrite_refs(&mut schema, &names, root.as_deref());
    match root {
        Some(root) => {
            schemas.insert(root.clone(), schema);
            schema_ref(&root)
        }
        None => schema,
    }
}

/// Whether `schema` has a `$ref` equal to `target`.
fn contains_ref(schema: &Value, target: &str) -> bool {
    match schema {
        Value::Object(object) => {
            object.get("$ref").is_some_and(|r| r == target) || object.values().any(|v| contains_ref(v, target))
        }
        Value::Array(items) => items.iter().any(|v| contains_ref(v, target)),
        _ => false,
    }
}

/// Points the references of `schema` to definitions named in `names` at their new names in
/// `components/schemas`, and those to `#` at `root`.
fn rewrite_refs(schema: &mut Value, names: &BTreeMap<String, String>, root: Option<&str>) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get_mut("$ref") {
                let target = ["#/$defs/", "#/definitions/"]
                    .iter()
                    .find_map(|prefix| reference.strip_prefix(prefix))
                    .and_then(|name| names.get(name))
                    .map(String::as_str)
                    .or(if reference == "#" { root } else { None });
                if let Some(target) = target {
                    *reference = format!("#/components/schemas/{target}");
                }
            }
            object.values_mut().for_each(|value| rewrite_refs(value, names, root));
        }
        Value::Array(items) => items.iter_mut().for_each(|value| rewrite_refs(value, names, root)),
        _ => {}
    }
}

/// `name` with only the characters OpenAPI allows in a component's name.
fn component_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

/// `name`, or `name_2`, `name_3`, ... whichever `schemas` does not have yet.
fn unique_name(name: &str, schemas: &Map<String, Value>) -> String {
    if !schemas.contains_key(name) {
        return name.to_owned();
    }
    (2..).map(|n| format!("{name}_{n}")).find(|candidate| !schemas.contains_key(candidate)).unwrap_or_default()
}

/// A function's name as a literal path: `/` stays, anything but unreserved characters is
/// percent-encoded (a `{` would otherwise read as a template).
fn path_encode(name: &str) -> String {
    let mut path = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'/' | b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::super::ROUTES;

    /// The paths of every `.route("PATH", ...)` in the HTTP module's sources: what the
    /// router serves, read where it is written, so a route added anywhere is seen.
    fn routed_paths() -> BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let mut paths = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).expect("src/http") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("source");
            // Tests (this one included) route nothing.
            let source = source.split("#[cfg(test)]").next().unwrap_or_default();
            for kind in [".nest(", ".route_service(", ".nest_service("] {
                assert!(!source.contains(kind), "{}: {kind} is not read by this test", path.display());
            }
            for (at, _) in source.match_indices(".route(") {
                let rest = source[at + ".route(".len()..].trim_start();
                let literal = rest.strip_prefix('"').and_then(|rest| rest.split('"').next());
                let literal = literal.unwrap_or_else(|| panic!("{}: a route whose path is no literal", path.display()));
                paths.insert(literal.to_owned());
            }
        }
        paths
    }

    #[test]
    fn every_path_the_router_serves_is_listed() {
        let listed: BTreeSet<String> = ROUTES.iter().map(|route| route.path.to_owned()).collect();
        assert_eq!(routed_paths(), listed, "ROUTES in http/mod.rs and the router differ");
    }

    /// Whether `response` is the router's answer to a route or method it does not have.
    async fn is_fallback(response: axum::response::Response) -> bool {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let message =
            serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["message"].as_str().map(str::to_owned));
        let message = message.unwrap_or_default();
        (status == 405 && message.contains(" does not take ")) || (status == 404 && message.starts_with("no route "))
    }

    #[tokio::test]
    async fn the_router_serves_exactly_the_listed_methods_of_each_path() {
        let registry = crate::Registry::with_examples().only(&["examples/echo"]).expect("echo");
        let node = crate::Node::builder()
            .registry(registry)
            .pool(crate::PoolSpec::new("main"))
            .workers(crate::WorkerSpec::new("main", 1, 1))
            .start()
            .await
            .expect("node starts");
        let node = Arc::new(node);
        let router = super::super::router(node.clone(), super::super::HttpConfig::default());
        let paths: BTreeSet<&str> = ROUTES.iter().map(|route| route.path).collect();
        for path in paths {
            let concrete =
                path.replace("{*function}", "examples/echo").replace("{id}", "probe").replace("{key}", "probe");
            for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
                let listed = ROUTES.iter().any(|route| route.path == path && route.method == method);
                let request = axum::http::Request::builder()
                    .method(method)
                    .uri(&concrete)
                    .body(axum::body::Body::from("[1]"))
                    .expect("request");
                let response = router.clone().oneshot(request).await.expect("infallible");
                assert_eq!(is_fallback(response).await, !listed, "{method} {path} is listed: {listed}");
            }
        }
        node.shutdown().await;
    }

    fn docs() -> super::Docs {
        super::Docs { secured: true, timeout_ms_max: 1_000, body_bytes_max: 1 << 20 }
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Point {
        x: f64,
        y: f64,
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Shape {
        corners: Vec<Point>,
    }

    mod other {
        /// A `Point` unlike the first, whose definition must not replace it.
        #[derive(schemars::JsonSchema)]
        #[allow(dead_code)]
        pub struct Point {
            pub label: String,
        }

        #[derive(schemars::JsonSchema)]
        #[allow(dead_code)]
        pub struct Pair {
            pub a: Point,
            pub b: Point,
        }
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Node {
        children: Vec<Node>,
    }

    fn schema<T: schemars::JsonSchema>() -> Value {
        serde_json::to_value(schemars::schema_for!(T)).expect("json")
    }

    fn entry(name: &str, params: Vec<(&str, Value)>, result: Value) -> super::FunctionEntry {
        super::FunctionEntry {
            name: name.to_owned(),
            version: 0,
            served_here: true,
            nodes: Vec::new(),
            kind: Some(super::super::catalogue::Kind::Async),
            params: Some(
                params
                    .into_iter()
                    .map(|(name, schema)| super::super::catalogue::ParamEntry { name: name.to_owned(), schema })
                    .collect(),
            ),
            result: Some(result),
            policy: None,
        }
    }

    /// Follows `#/components/schemas/NAME` in `document`.
    fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference.strip_prefix("#/components/schemas/").expect("a component");
                &document["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    #[test]
    fn function_schemas_move_their_definitions_to_the_components() {
        let functions = [
            entry("geo/area", vec![("shape", schema::<Shape>())], schema::<f64>()),
            entry("geo/label", vec![("pair", schema::<other::Pair>()), ("n", schema::<u32>())], schema::<Node>()),
            entry("none", vec![], json!(true)),
        ];
        let document = super::document(&docs(), &functions);
        let text = document.to_string();
        assert!(!text.contains("#/$defs/") && !text.contains("\"$defs\""), "{text}");
        assert!(!text.contains("\"$ref\":\"#\""), "{text}");
        let paths = &document["paths"];

        // geo/area: the body is a one-tuple of Shape, whose Point has x and y.
        let body = &paths["/v1/call/geo/area"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!((body["minItems"].as_u64(), body["maxItems"].as_u64()), (Some(1), Some(1)));
        let shape = resolve(&document, &body["prefixItems"][0]);
        let point = resolve(&document, &shape["properties"]["corners"]["items"]);
        assert!(point["properties"].get("x").is_some(), "{point}");

        // geo/label: its own Point (label) is another component than geo/area's.
        let body = &paths["/v1/call/geo/label"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        let pair = resolve(&document, &body["prefixItems"][0]);
        let point = resolve(&document, &pair["properties"]["a"]);
        assert!(point["properties"].get("label").is_some(), "{point}");
        assert_eq!(body["prefixItems"][1]["type"], "integer");
        // Its result, a recursive type, refers to itself through the components.
        let result = &paths["/v1/call/geo/label"]["post"]["responses"]["200"]["content"]["application/json"]["schema"];
        let tree = resolve(&document, result);
        assert_eq!(resolve(&document, &tree["properties"]["children"]["items"]), tree);

        // No parameters: an empty array, and no `prefixItems` (the meta-schema wants one).
        let body = &paths["/v1/call/none"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["maxItems"], 0);
        assert!(body.get("prefixItems").is_none());
    }

    #[test]
    fn every_operation_says_its_errors_and_tokens() {
        let document = super::document(&docs(), &[entry("a/b c", vec![("x", json!(true))], json!(true))]);
        assert_eq!(document["security"], json!([{ "bearer": [] }]));
        // A name that is no plain path is percent-encoded.
        assert!(document["paths"].get("/v1/call/a/b%20c").is_some());
        for (path, item) in document["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("operations") {
                let responses = operation["responses"].as_object().expect("responses");
                assert!(responses.keys().any(|status| status.starts_with('2')), "{method} {path}");
                let public = path == "/v1/health";
                assert_eq!(responses.contains_key("401"), !public, "{method} {path}");
                for (status, response) in responses.iter().filter(|(status, _)| !status.starts_with('2')) {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/Error", "{method} {path} {status}");
                }
            }
        }
        let insecure = super::document(&super::Docs { secured: false, ..docs() }, &[]);
        assert!(insecure.get("security").is_none());
        assert!(insecure["paths"]["/v1/stats"]["get"]["responses"].get("401").is_none());
    }
}
