//! JSON and Rust callers of the same function with the same value share one identity, and
//! every integer in a JSON result is one a JSON parser reads exactly: numbers within ±2^53,
//! decimal strings beyond (`u64::MAX`, `i64::MIN`, `u128::MAX`).

mod common;

use girder::{CallError, Ctx, Node, Registry};
use serde_json::json;

#[girder::function(name = "test/wide")]
async fn wide(_ctx: Ctx, n: u128) -> u128 {
    n
}

#[girder::function(name = "test/wide_signed")]
async fn wide_signed(_ctx: Ctx, n: i128) -> i128 {
    n
}

#[girder::function(name = "test/unsigned")]
async fn unsigned(_ctx: Ctx, n: u64) -> u64 {
    n
}

#[girder::function(name = "test/signed")]
async fn signed(_ctx: Ctx, n: i64) -> i64 {
    n
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Reading {
    label: String,
    count: u64,
    total: u128,
    celsius: f64,
}

#[girder::function(name = "test/reading")]
async fn reading(_ctx: Ctx, label: String, count: u64) -> Reading {
    Reading { label, count, total: u128::from(count) * u128::from(u64::MAX), celsius: 21.5 }
}

async fn node() -> Node {
    let registry =
        Registry::new().with::<wide>().with::<wide_signed>().with::<unsigned>().with::<signed>().with::<reading>();
    common::grid(registry, 1, 2).await
}

const U128_MAX_TEXT: &str = "340282366920938463463374607431768211455";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u128_max_from_rust_and_from_json_is_one_evaluation() {
    let node = node().await;
    let client = node.client();
    assert_eq!(wide::call(&client, u128::MAX).await, Ok(u128::MAX));
    let answer = client.call_json("test/wide", &json!([U128_MAX_TEXT])).await.unwrap();
    assert_eq!(answer, json!(U128_MAX_TEXT), "a u128 beyond 2^53 is its decimal text in JSON");
    assert_eq!(node.evaluations_of("test/wide"), 1, "the JSON call shared the Rust call's result");
    // A u128 that fits a u64 is a plain integer: small ones are JSON numbers both ways.
    assert_eq!(client.call_json("test/wide", &json!([7])).await.unwrap(), json!(7));
    assert_eq!(wide::call(&client, 7).await, Ok(7));
    let big = u128::from(u64::MAX) + 1;
    assert_eq!(client.call_json("test/wide", &json!([big.to_string()])).await.unwrap(), json!(big.to_string()));
    assert_eq!(wide::call(&client, big).await, Ok(big));
    assert_eq!(node.evaluations_of("test/wide"), 3, "7 and 2^64 ran once each");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i128_extremes_round_trip() {
    let node = node().await;
    let client = node.client();
    for n in [i128::MIN, i128::MAX, -(1 << 53) - 1, -(1 << 53)] {
        assert_eq!(wide_signed::call(&client, n).await, Ok(n));
        let sent = if n.unsigned_abs() > 1 << 53 { json!(n.to_string()) } else { json!(n as i64) };
        assert_eq!(client.call_json("test/wide_signed", &json!([sent])).await.unwrap(), sent);
    }
    assert_eq!(node.evaluations_of("test/wide_signed"), 4, "each value once, whoever called");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u64_max_and_i64_min_round_trip_as_numbers_or_strings() {
    let node = node().await;
    let client = node.client();
    assert_eq!(unsigned::call(&client, u64::MAX).await, Ok(u64::MAX));
    // Sent as the JSON number a parser reads exactly into a u64, or as the text it came back as.
    let answer = client.call_json("test/unsigned", &json!([u64::MAX])).await.unwrap();
    assert_eq!(answer, json!("18446744073709551615"));
    assert_eq!(client.call_json("test/unsigned", &json!([answer])).await.unwrap(), answer);
    assert_eq!(node.evaluations_of("test/unsigned"), 1);

    assert_eq!(signed::call(&client, i64::MIN).await, Ok(i64::MIN));
    let answer = client.call_json("test/signed", &json!([i64::MIN])).await.unwrap();
    assert_eq!(answer, json!("-9223372036854775808"));
    assert_eq!(client.call_json("test/signed", &json!([answer])).await.unwrap(), answer);
    assert_eq!(node.evaluations_of("test/signed"), 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_to_the_53_is_a_number_and_one_more_is_a_string() {
    let node = node().await;
    let client = node.client();
    let exact = 1u64 << 53;
    assert_eq!(client.call_json("test/unsigned", &json!([exact])).await.unwrap(), json!(exact));
    assert_eq!(client.call_json("test/unsigned", &json!([exact + 1])).await.unwrap(), json!("9007199254740993"));
    assert_eq!(client.call_json("test/signed", &json!([-(1i64 << 53)])).await.unwrap(), json!(-(1i64 << 53)));
    let below = client.call_json("test/signed", &json!([-(1i64 << 53) - 1])).await.unwrap();
    assert_eq!(below, json!("-9007199254740993"));
    // 2^53 sent as the float 9007199254740992.0 is the same request as the integer.
    assert_eq!(client.call_json("test/unsigned", &json!([9_007_199_254_740_992.0])).await.unwrap(), json!(exact));
    assert_eq!(unsigned::call(&client, exact).await, Ok(exact));
    assert_eq!(node.evaluations_of("test/unsigned"), 2, "2^53 once, 2^53 + 1 once");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_results_carry_field_names() {
    let node = node().await;
    let client = node.client();
    let answer = client.call_json("test/reading", &json!(["temps", 3])).await.unwrap();
    let total = (3 * u128::from(u64::MAX)).to_string();
    assert_eq!(answer, json!({"label": "temps", "count": 3, "total": total, "celsius": 21.5}));
    let typed = reading::call(&client, "temps".to_owned(), 3).await.unwrap();
    assert_eq!(typed, Reading { label: "temps".into(), count: 3, total: 3 * u128::from(u64::MAX), celsius: 21.5 });
    assert_eq!(node.evaluations_of("test/reading"), 1);
    node.shutdown().await;
}

/// Each value has one accepted form, so that it has one identity: text where a number is
/// due, a number a JSON parser could not read exactly, a negative unsigned, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_forms_of_integers_are_refused_with_the_rule() {
    let node = node().await;
    let client = node.client();
    let refused = |result: Result<serde_json::Value, CallError>| match result {
        Err(CallError::BadArguments { message, .. }) => message,
        other => panic!("expected bad arguments, got {other:?}"),
    };
    let small = refused(client.call_json("test/unsigned", &json!(["5"])).await);
    assert!(small.contains("parameter 1 `n`") && small.contains("sent as a number: 5"), "{small}");
    let padded = refused(client.call_json("test/unsigned", &json!(["09007199254740993"])).await);
    assert!(padded.contains("decimal string beyond ±2^53"), "{padded}");
    // u128::MAX as a JSON number is read as a float, which has lost the value.
    let float = refused(client.call_json("test/wide", &json!([3.402_823_669_209_385e38])).await);
    assert!(float.contains("floating point") && float.contains("u128"), "{float}");
    let negative = refused(client.call_json("test/wide", &json!([-1])).await);
    assert!(negative.contains("-1"), "{negative}");
    let out_of_range = refused(client.call_json("test/unsigned", &json!([U128_MAX_TEXT])).await);
    assert!(out_of_range.contains("u64"), "{out_of_range}");
    for function in ["test/unsigned", "test/wide"] {
        assert_eq!(node.evaluations_of(function), 0, "nothing refused was run");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_u128_max_as_a_json_string() {
    use tower::ServiceExt;
    let node = std::sync::Arc::new(node().await);
    assert_eq!(wide::call(&node.client(), u128::MAX).await, Ok(u128::MAX));
    let router = girder::http::router(node.clone(), girder::http::HttpConfig::default());
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/call/test/wide")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(format!("[\"{U128_MAX_TEXT}\"]")))
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
    assert_eq!(std::str::from_utf8(&body).unwrap(), format!("\"{U128_MAX_TEXT}\""));
    assert_eq!(node.evaluations_of("test/wide"), 1, "HTTP got the Rust caller's memoized result");
    node.shutdown().await;
}
