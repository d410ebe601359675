//! `#[girder::function]`: borrowed parameters, `Result` bodies, bodies called directly with
//! a test context, JSON schemas, and the signatures it refuses (`tests/ui`, with trybuild).

mod common;

use girder::schemars::JsonSchema;
use girder::{CallError, Ctx, Function, Registry};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, JsonSchema)]
#[schemars(crate = "girder::schemars")]
struct Config {
    label: String,
    scale: u32,
}

/// Neither `Clone` nor `JsonSchema`: borrowed as `&Opaque`, described as any value.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Opaque(u64);

/// Every kind of borrowed parameter, one with a named lifetime.
#[girder::function(name = "macros/greet")]
#[allow(clippy::needless_lifetimes)] // The named lifetime is part of what is tested.
async fn greet<'a>(_ctx: Ctx, name: &'a str, items: &[u32], config: &Config) -> String {
    format!("{}:{name}:{}", config.label, items.iter().sum::<u32>() * config.scale)
}

/// A blocking body with borrowed parameters.
#[girder::function(name = "macros/shout")]
fn shout(_ctx: Ctx, words: &[String], opaque: &Opaque) -> String {
    format!("{}!{}", words.join(" ").to_uppercase(), opaque.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_arguments_are_the_same_request_as_owned_ones() {
    let node = common::grid(Registry::new().with::<greet>().with::<shout>(), 1, 2).await;
    let client = node.client();
    let config = Config { label: "hi".into(), scale: 2 };
    let name = String::from("ada");
    assert_eq!(greet::call(&client, &name, &[1, 2, 3], &config).await.unwrap(), "hi:ada:12");
    // The same arguments owned, through the generic helper and as JSON: memoized already.
    let owned = ("ada".to_owned(), vec![1u32, 2, 3], config.clone());
    assert_eq!(girder::call::<greet, _>(&client, owned).await.unwrap(), "hi:ada:12");
    let json = serde_json::json!(["ada", [1, 2, 3], {"scale": 2, "label": "hi"}]);
    assert_eq!(client.call_json("macros/greet", &json).await.unwrap(), "hi:ada:12");
    assert_eq!(node.evaluations_of("macros/greet"), 1, "borrowed, owned and JSON are one request");

    let words = vec!["grid".to_owned(), "on".to_owned()];
    let blocking = std::thread::scope(|scope| {
        scope.spawn(|| shout::call_blocking(&client, &words, &Opaque(7))).join().expect("no panic")
    });
    assert_eq!(blocking.unwrap(), "GRID ON!7");
    let owned = (words.clone(), Opaque(7));
    assert_eq!(girder::call::<shout, _>(&client, owned).await.unwrap(), "GRID ON!7");
    assert_eq!(node.evaluations_of("macros/shout"), 1);
    node.shutdown().await;
}

#[girder::function(name = "macros/halve")]
async fn halve(_ctx: Ctx, n: u64) -> anyhow::Result<u64> {
    if n % 2 == 1 {
        anyhow::bail!("anyhow: {n} is odd");
    }
    Ok(n / 2)
}

/// An error type that is `Display` but not `Serialize`.
#[girder::function(name = "macros/parse")]
fn parse(_ctx: Ctx, text: &str) -> Result<u64, std::num::ParseIntError> {
    text.parse()
}

fn function_error(outcome: Result<u64, CallError>) -> String {
    match outcome {
        Err(CallError::Function { message, .. }) => message,
        other => panic!("expected a function error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_bodies_report_err_as_a_function_error() {
    let node = common::grid(Registry::new().with::<halve>().with::<parse>(), 1, 2).await;
    let client = node.client();
    assert_eq!(halve::call(&client, 8).await.unwrap(), 4);
    assert_eq!(function_error(halve::call(&client, 7).await), "anyhow: 7 is odd");
    let (good, bad) = std::thread::scope(|scope| {
        let good = scope.spawn(|| parse::call_blocking(&client, "42"));
        let bad = scope.spawn(|| parse::call_blocking(&client, "4x2"));
        (good.join().expect("no panic"), bad.join().expect("no panic"))
    });
    assert_eq!(good.unwrap(), 42);
    assert_eq!(function_error(bad), "invalid digit found in string");
    node.shutdown().await;
}

#[girder::function(name = "macros/fib")]
async fn fib(ctx: Ctx, n: u64) -> Result<u64, CallError> {
    if n < 2 {
        return Ok(n);
    }
    Ok(fib::call(&ctx, n - 1).await? + fib::call(&ctx, n - 2).await?)
}

#[girder::function(name = "macros/fib_blocking")]
fn fib_blocking(ctx: Ctx, n: u64) -> Result<u64, CallError> {
    if n < 2 {
        return Ok(n);
    }
    Ok(fib_blocking::call_blocking(&ctx, n - 1)? + fib_blocking::call_blocking(&ctx, n - 2)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_run_directly_with_a_test_context() {
    let node = common::grid(Registry::new().with::<fib>().with::<fib_blocking>().with::<greet>(), 1, 4).await;
    // The body itself ran here; its nested calls (fib 9 down to fib 0) went through the node.
    assert_eq!(fib::run(Ctx::for_tests(&node), 10).await.unwrap(), 55);
    assert_eq!(node.evaluations_of("macros/fib"), 10);
    let ctx = Ctx::for_tests(&node);
    assert_eq!(ctx.budget(), girder::Budget::default(), "a test context is in no call tree");
    assert!(!ctx.is_cancelled());
    let config = Config { label: "t".into(), scale: 1 };
    assert_eq!(greet::run(ctx, "x", &[4], &config).await, "t:x:4");
    assert_eq!(node.evaluations_of("macros/greet"), 0, "run is the body, not a call");

    let blocking = std::thread::scope(|scope| {
        scope.spawn(|| fib_blocking::run(Ctx::for_tests(&node), 12)).join().expect("no panic")
    });
    assert_eq!(blocking.unwrap(), 144);
    assert_eq!(node.evaluations_of("macros/fib_blocking"), 12);
    node.shutdown().await;
}

#[test]
fn schemas_come_from_json_schema_where_the_type_has_one() {
    let schemas = greet::schemas();
    assert_eq!(schemas.params.len(), 3);
    assert_eq!(schemas.params[0]["type"], "string");
    assert_eq!(schemas.params[1]["type"], "array");
    assert_eq!(schemas.params[1]["items"]["type"], "integer");
    let config = &schemas.params[2];
    assert_eq!(config["type"], "object", "{config}");
    assert_eq!(config["properties"]["label"]["type"], "string", "{config}");
    assert_eq!(config["properties"]["scale"]["type"], "integer", "{config}");
    assert_eq!(schemas.output["type"], "string");

    let schemas = shout::schemas();
    assert_eq!(schemas.params[0]["items"]["type"], "string");
    assert_eq!(schemas.params[1], serde_json::Value::Bool(true), "Opaque has no JsonSchema: any value");
    assert_eq!(halve::schemas().output["type"], "integer", "the schema of `T` in `Result<T>`");
    assert_eq!(<fib as Function>::PARAMS, ["n"]);
}

#[test]
fn refused_signatures_say_what_to_write_instead() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
