//! `girder functions`: the catalogue of the functions a grid serves, from a node's HTTP API.

use std::time::Duration;

use anyhow::{bail, Context};
use girder::http::catalogue::{Catalogue, FunctionEntry, PolicyEntry};
use serde_json::Value;

/// Arguments of `girder functions`.
#[derive(Debug, clap::Args)]
pub struct FunctionsArgs {
    /// Ask this node (its base URL).
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
    /// Print the node's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// How long the verb waits for the node: the catalogue reads the directory for at most 2 s.
const TIMEOUT_MS: u64 = 30_000;

pub async fn run(args: FunctionsArgs) -> anyhow::Result<()> {
    let base = args.node.trim_end_matches('/');
    let client = args.auth.client(reqwest::Client::builder().timeout(Duration::from_millis(TIMEOUT_MS)))?;
    let response = client
        .get(format!("{base}/v1/functions"))
        .send()
        .await
        .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?;
    let status = response.status();
    let body: Value =
        response.json().await.with_context(|| format!("the node at {base} answered {status} without a JSON body"))?;
    if !status.is_success() {
        match body.get("message").and_then(Value::as_str) {
            Some(message) => bail!("{message}"),
            None => bail!("the node answered {status}: {body}"),
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let catalogue: Catalogue =
        serde_json::from_value(body).with_context(|| format!("the node at {base} answered no catalogue"))?;
    print_table(&catalogue);
    Ok(())
}

fn print_table(catalogue: &Catalogue) {
    let rows: Vec<[String; 5]> = catalogue.functions.iter().map(row).collect();
    let headers = ["name", "version", "kind", "parameters -> result", "policy"].map(str::to_owned);
    let mut widths = headers.each_ref().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&headers).chain(&rows) {
        let [name, version, kind, params, policy] = row;
        let [w0, w1, w2, w3, _] = widths;
        outln!("{name:<w0$}  {version:>w1$}  {kind:<w2$}  {params:<w3$}  {policy}");
    }
    if !catalogue.directory_read {
        outln!("(the statekeeper's directory did not answer: functions only other nodes serve are missing)");
    }
}

/// One function's line: name, version, kind, `(name: type, ...) -> type`, policy.
fn row(function: &FunctionEntry) -> [String; 5] {
    let kind = match function.kind {
        Some(kind) => serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        None => "-".to_owned(),
    };
    let signature = match &function.params {
        Some(params) => {
            let params: Vec<String> =
                params.iter().map(|param| format!("{}: {}", param.name, type_name(&param.schema))).collect();
            let result = function.result.as_ref().map_or_else(|| "any".to_owned(), type_name);
            format!("({}) -> {result}", params.join(", "))
        }
        None => format!("unknown here (served by {})", function.nodes.join(", ")),
    };
    let policy = function.policy.map_or_else(|| "-".to_owned(), policy_text);
    [function.name.clone(), function.version.to_string(), kind, signature, policy]
}

/// The policies that differ from the node's, e.g. `retries 3, timeout 500 ms`.
fn policy_text(policy: PolicyEntry) -> String {
    let mut parts = Vec::new();
    if let Some(retries) = policy.retries {
        parts.push(format!("retries {retries}"));
    }
    if let Some(timeout_ms) = policy.timeout_ms {
        parts.push(format!("timeout {timeout_ms} ms"));
    }
    if let Some(ttl_ms) = policy.ttl_ms {
        parts.push(format!("ttl {ttl_ms} ms"));
    }
    if parts.is_empty() {
        "node defaults".to_owned()
    } else {
        parts.join(", ")
    }
}

/// A short name for the type a JSON schema describes: `integer`, `string?`, `array<number>`,
/// a definition's name, `any` for a schema that allows everything.
fn type_name(schema: &Value) -> String {
    let Value::Object(object) = schema else {
        return if *schema == Value::Bool(false) { "nothing".to_owned() } else { "any".to_owned() };
    };
    if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
        return reference.rsplit('/').next().unwrap_or(reference).to_owned();
    }
    if let Some(Value::Array(options)) = object.get("anyOf").or_else(|| object.get("oneOf")) {
        return union_name(options);
    }
    match object.get("type") {
        Some(Value::String(name)) => simple_type(name, object),
        Some(Value::Array(names)) => {
            let options: Vec<Value> = names.iter().map(|name| serde_json::json!({ "type": name })).collect();
            let mut name = union_name(&options);
            if let Some(items) = object.get("items").filter(|_| name.starts_with("array")) {
                name = name.replacen("array", &format!("array<{}>", type_name(items)), 1);
            }
            name
        }
        _ if object.contains_key("enum") => "enum".to_owned(),
        _ if object.contains_key("const") => "const".to_owned(),
        _ => object.get("title").and_then(Value::as_str).unwrap_or("any").to_owned(),
    }
}

fn simple_type(name: &str, object: &serde_json::Map<String, Value>) -> String {
    match name {
        "array" => match (object.get("items"), object.get("prefixItems")) {
            (_, Some(Value::Array(items))) => {
                format!("[{}]", items.iter().map(type_name).collect::<Vec<_>>().join(", "))
            }
            (Some(items), _) => format!("array<{}>", type_name(items)),
            (None, _) => "array".to_owned(),
        },
        // A struct's schema has its name as title; a plain object has none.
        "object" => object.get("title").and_then(Value::as_str).unwrap_or("object").to_owned(),
        other => other.to_owned(),
    }
}

/// `T?` for a union of one type with null; `A | B` otherwise.
fn union_name(options: &[Value]) -> String {
    let is_null = |option: &Value| option.get("type").and_then(Value::as_str) == Some("null");
    let names: Vec<String> = options.iter().filter(|option| !is_null(option)).map(type_name).collect();
    let nullable = options.iter().any(is_null);
    match (names.as_slice(), nullable) {
        ([one], true) => format!("{one}?"),
        (_, true) => format!("{}?", names.join(" | ")),
        (_, false) => names.join(" | "),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::type_name;

    #[test]
    fn type_names_summarise_schemas() {
        assert_eq!(type_name(&json!(true)), "any");
        assert_eq!(type_name(&json!({"type": "integer", "format": "uint64", "minimum": 0})), "integer");
        assert_eq!(type_name(&json!({"type": ["string", "null"]})), "string?");
        assert_eq!(type_name(&json!({"type": "array", "items": {"type": "number"}})), "array<number>");
        assert_eq!(type_name(&json!({"$ref": "#/$defs/Point"})), "Point");
        assert_eq!(type_name(&json!({"anyOf": [{"$ref": "#/$defs/Point"}, {"type": "null"}]})), "Point?");
        assert_eq!(type_name(&json!({"title": "Reading", "type": "object", "properties": {}})), "Reading");
        assert_eq!(type_name(&json!({"type": "array", "prefixItems": [{"type": "string"}, true]})), "[string, any]");
    }
}
