//! Property tests for every decoder of outside input: JSON and MessagePack arguments and
//! results, stored cache frames, configuration values and statekeeper URLs. Each must answer
//! an error, never panic, and round-trip what it accepts. Bounded case counts keep them
//! fast in CI; `PROPTEST_CASES=N` runs more.

use std::time::Duration;

use girder::structures::{Cache, CacheConfig, Kind};
use girder::{codec, config, redacted, Embedded, Statekeeper};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        edge_int().prop_map(serde_json::Value::from),
        // The text of an integer, as JSON output writes those beyond ±2^53.
        edge_int().prop_map(|n| serde_json::Value::from(n.to_string())),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Integers around every boundary of the canonical form (±2^53, the 64-bit and 128-bit
/// limits) and anywhere within 128 bits.
fn edge_int() -> impl Strategy<Value = i64> {
    let exact = 1i64 << 53;
    prop_oneof![
        (-3i64..=3).prop_map(move |d| exact + d),
        (-3i64..=3).prop_map(move |d| -exact + d),
        Just(i64::MIN),
        Just(i64::MAX),
        any::<i64>(),
    ]
}

/// A `u128` near 0, 2^53, 2^64 or `u128::MAX`, or anywhere.
fn edge_u128() -> impl Strategy<Value = u128> {
    let near = |at: u128| (0u128..=6).prop_map(move |d| at.saturating_add(d).saturating_sub(3));
    prop_oneof![
        near(0),
        near(1 << 53),
        near(1 << 64),
        near(u128::MAX),
        any::<u128>(),
        any::<u64>().prop_map(u128::from)
    ]
}

/// An `i128` near the same boundaries, on both sides of zero, or anywhere.
fn edge_i128() -> impl Strategy<Value = i128> {
    let near = |at: i128| (0i128..=6).prop_map(move |d| at.saturating_add(d).saturating_sub(3));
    prop_oneof![
        near(0),
        near(1 << 53),
        near(-(1 << 53)),
        near(i128::from(i64::MIN)),
        near(i128::MIN),
        near(i128::MAX),
        any::<i128>(),
    ]
}

/// Equal JSON, numbers compared by value (`1` and `1.0` alike; an integer beyond ±2^53 and
/// its decimal text alike, as the canonical form writes it).
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    let as_text = |n: &serde_json::Number| beyond_exact(n).then(|| n.to_string());
    match (a, b) {
        (J::Number(x), J::String(y)) | (J::String(y), J::Number(x)) => as_text(x).as_deref() == Some(y.as_str()),
        (J::Number(x), J::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (J::Array(x), J::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y)),
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// A result or argument with every kind of field JSON can carry, 128-bit integers included.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Wide {
    unsigned: u128,
    signed: i128,
    big: u64,
    negative: i64,
    small: u32,
    ratio: f64,
    single: f32,
    label: String,
    list: Vec<u128>,
    named: std::collections::BTreeMap<String, i64>,
    maybe: Option<i128>,
    shape: Shape,
    flag: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum Shape {
    Dot,
    Size(u128),
    Span { from: i128, to: u64 },
}

/// Floats JSON can carry (no NaN or infinity), integral ones among them.
fn finite_f64() -> impl Strategy<Value = f64> {
    prop_oneof![any::<f64>().prop_filter("finite", |f| f.is_finite()), any::<i64>().prop_map(|i| i as f64)]
}

fn wide() -> impl Strategy<Value = Wide> {
    let shape = prop_oneof![
        Just(Shape::Dot),
        edge_u128().prop_map(Shape::Size),
        (edge_i128(), any::<u64>()).prop_map(|(from, to)| Shape::Span { from, to }),
    ];
    let numbers = (edge_u128(), edge_i128(), any::<u64>(), edge_int(), any::<u32>(), finite_f64());
    let rest = (
        any::<f32>().prop_filter("finite", |f| f.is_finite()),
        ".{0,12}",
        prop::collection::vec(edge_u128(), 0..4),
        prop::collection::btree_map(".{0,6}", edge_int(), 0..4),
        prop::option::of(edge_i128()),
        shape,
        any::<bool>(),
    );
    (numbers, rest).prop_map(
        |((unsigned, signed, big, negative, small, ratio), (single, label, list, named, maybe, shape, flag))| Wide {
            unsigned,
            signed,
            big,
            negative,
            small,
            ratio,
            single,
            label,
            list,
            named,
            maybe,
            shape,
            flag,
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Whether a JSON number is an integer beyond ±2^53, which JSON output writes as text.
fn beyond_exact(n: &serde_json::Number) -> bool {
    let magnitude = n.as_u64().or(n.as_i64().map(i64::unsigned_abs));
    magnitude.is_some_and(|m| m > codec::JSON_EXACT_INT_MAX)
}

/// Whether every JSON number that is an integer is one a parser reading 64-bit floats reads
/// exactly (within ±2^53).
fn integers_read_exactly(json: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match json {
        J::Number(n) => !beyond_exact(n),
        J::Array(items) => items.iter().all(integers_read_exactly),
        J::Object(map) => map.values().all(integers_read_exactly),
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn json_arguments_round_trip_through_msgpack(args in prop::collection::vec(json_value(), 0..6)) {
        let json = serde_json::Value::Array(args);
        let packed = codec::json_args_to_msgpack(&json).expect("an array of JSON values encodes");
        let back = codec::msgpack_to_json(&packed).expect("what we encoded decodes");
        // The canonical form writes an integral float as an integer: equal as values.
        prop_assert!(same_value(&back, &json), "{back} != {json}");
        prop_assert_eq!(codec::json_args_to_msgpack(&back).expect("encodes again"), packed, "canonical is stable");
    }

    /// JSON arguments, through MessagePack and back to JSON, stay the same JSON.
    #[test]
    fn json_through_msgpack_and_back_is_stable(args in prop::collection::vec(json_value(), 0..6)) {
        let once = codec::msgpack_to_json(&codec::json_args_to_msgpack(&serde_json::Value::Array(args)).expect("encodes"))
            .expect("decodes");
        let twice = codec::msgpack_to_json(&codec::json_args_to_msgpack(&once).expect("encodes again")).expect("decodes");
        prop_assert_eq!(twice, once);
    }

    /// A Rust caller and a JSON caller sending the value's JSON form ask for the same
    /// request; the value decodes back whole from either, and from its result encoding. (The JSON value, not its text:
    /// serde_json reads some float texts 1 ULP off unless its `float_roundtrip` feature is on.)
    #[test]
    fn a_rust_value_and_its_json_form_are_one_identity(value in wide()) {
        let typed = codec::encode_canonical(&(value.clone(),)).expect("encodes");
        let json = codec::msgpack_to_json(&typed).expect("decodes as JSON");
        let text = json.to_string();
        let from_json = codec::json_args_to_msgpack(&json).expect("encodes");
        prop_assert_eq!(&from_json, &typed, "{}", text);
        let (back,): (Wide,) = codec::decode(&from_json).expect("decodes");
        prop_assert_eq!(&back, &value);
        prop_assert!(integers_read_exactly(&json), "{}", text);
        // As a result it decodes back too, and its JSON form sent back as an argument is
        // the same request again.
        let result = codec::encode_result(&value).expect("encodes");
        prop_assert_eq!(codec::decode::<Wide>(&result).expect("decodes"), value);
        let result_json = codec::msgpack_to_json(&result).expect("decodes as JSON");
        prop_assert!(integers_read_exactly(&result_json), "{}", result_json);
        let sent_back = serde_json::Value::Array(vec![result_json]);
        prop_assert_eq!(codec::json_args_to_msgpack(&sent_back).expect("encodes"), typed);
    }

    /// Every integer alone: `u128`, `i128`, `u64` and `i64` of one value are one identity,
    /// the JSON number or decimal text of the rule.
    #[test]
    fn every_integer_type_of_one_value_is_one_identity(n in edge_i128()) {
        let typed = codec::encode_canonical(&(n,)).expect("encodes");
        let text = if n.unsigned_abs() <= u128::from(codec::JSON_EXACT_INT_MAX) { format!("[{n}]") } else { format!("[\"{n}\"]") };
        // As HTTP receives it: text.
        let json: serde_json::Value = serde_json::from_str(&text).expect("parses");
        prop_assert_eq!(&codec::json_args_to_msgpack(&json).expect("encodes"), &typed);
        prop_assert_eq!(codec::msgpack_to_json(&typed).expect("decodes"), json);
        prop_assert_eq!(codec::decode::<(i128,)>(&typed).expect("decodes"), (n,));
        if let Ok(u) = u128::try_from(n) {
            prop_assert_eq!(&codec::encode_canonical(&(u,)).expect("encodes"), &typed);
            prop_assert_eq!(codec::decode::<(u128,)>(&typed).expect("decodes"), (u,));
        } else {
            prop_assert!(codec::decode::<(u128,)>(&typed).is_err(), "a negative u128");
        }
        match i64::try_from(n) {
            Ok(i) => {
                prop_assert_eq!(&codec::encode_canonical(&(i,)).expect("encodes"), &typed);
                prop_assert_eq!(codec::decode::<(i64,)>(&typed).expect("decodes"), (i,));
            }
            Err(_) => prop_assert!(codec::decode::<(i64,)>(&typed).is_err(), "out of the i64 range"),
        }
        if let Ok(u) = u64::try_from(n) {
            prop_assert_eq!(&codec::encode_canonical(&(u,)).expect("encodes"), &typed);
            prop_assert_eq!(codec::decode::<(u64,)>(&typed).expect("decodes"), (u,));
        }
    }

    #[test]
    fn arbitrary_json_arguments_are_an_error_or_an_encoding(value in json_value()) {
        let _ = codec::json_args_to_msgpack(&value);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_msgpack_decoders(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = codec::msgpack_to_json(&bytes);
        let _ = codec::decode::<(u64, String)>(&bytes);
        let _ = codec::decode::<Vec<rmpv::Value>>(&bytes);
    }

    #[test]
    fn corrupt_stored_cache_values_are_errors(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        runtime().block_on(async {
            let store = Embedded::default().structures();
            store.value_set(Kind::Value, "fuzzed", &bytes, None).await.expect("raw write");
            let cache = Cache::new(store, CacheConfig::default());
            // Whatever is stored, reading it answers (a value or a decode error).
            let _ = cache.get_bytes("fuzzed").await;
            let _ = cache.get::<String>("fuzzed").await;
            let _ = cache.append("fuzzed", b"more").await;
        });
    }

    #[test]
    fn cache_values_round_trip_through_frames(value in prop::collection::vec(any::<u8>(), 0..4096), appended in prop::collection::vec(any::<u8>(), 0..512)) {
        runtime().block_on(async {
            let store = Embedded::default().structures();
            let cache = Cache::new(store, CacheConfig::default());
            cache.set_bytes("k", &value, Some(Duration::from_secs(60))).await.expect("set");
            cache.append("k", &appended).await.expect("append");
            let read = cache.get_bytes("k").await.expect("get").expect("present");
            let mut expected = value.clone();
            expected.extend_from_slice(&appended);
            assert_eq!(read.as_ref(), expected.as_slice());
        });
    }

    #[test]
    fn configuration_values_are_parsed_or_refused(text in ".{0,32}", key in prop_oneof![Just("slots".to_owned()), Just("max-memory".to_owned()), Just("cpus".to_owned()), ".{0,12}"]) {
        let _ = config::parse_bytes(&text);
        runtime().block_on(async {
            let store = Embedded::default().structures();
            if config::set(&store, "n1", &key, &text).await.is_err() {
                // Refused means unchanged.
                let stored = config::get(&store, "n1").await.expect("readable");
                assert!(!stored.contains_key(&*key), "a refused value was stored: {key} = {text:?}");
            }
        });
    }

    #[test]
    fn redacted_urls_never_show_the_password(user in "[a-z]{0,8}", password in "[^@]{1,24}", host in "[a-z0-9.]{1,20}", scheme in prop_oneof![Just("redis://"), Just("rediss://"), Just("redis:/"), Just("redis//"), Just("")]) {
        let url = format!("{scheme}{user}:{password}@{host}:6379/0");
        let shown = redacted(&url);
        prop_assert!(!shown.contains(&format!(":{password}@")), "{} shows the password", shown);
        prop_assert!(shown.ends_with(&format!("@{host}:6379/0")), "{} lost the host", shown);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any path, method and body against the HTTP API: a response with a fitting status,
    /// and a JSON body for every error; never a panic, never a 500 outside a function panic.
    #[test]
    fn http_requests_of_any_shape_get_a_clear_answer(
        method in prop_oneof![Just("GET"), Just("PUT"), Just("POST"), Just("DELETE"), Just("PATCH")],
        path in prop_oneof![
            "/v1/call/[a-z/%]{0,24}",
            "/v1/cache/[a-zA-Z0-9%/._-]{0,24}",
            "/v1/placement/[a-zA-Z0-9%._-]{0,24}",
            "/[a-z0-9/%]{0,24}",
        ],
        query in prop_oneof![Just(String::new()), "\\?[a-z_=0-9&%]{0,24}"],
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        use tower::ServiceExt;
        let answered = runtime().block_on(async {
            let node = std::sync::Arc::new(
                girder::Node::builder()
                    .registry(girder::Registry::with_examples())
                    .pool(girder::PoolSpec::new("main"))
                    .workers(girder::WorkerSpec::new("main", 1, 1))
                    .start()
                    .await
                    .expect("node starts"),
            );
            let router = girder::http::router(node.clone(), girder::http::HttpConfig::default());
            let uri = format!("{path}{query}");
            let Ok(request) = axum::http::Request::builder().method(method).uri(&uri).body(axum::body::Body::from(body))
            else {
                return None; // Not even a valid HTTP request line: nothing to send.
            };
            let response = tokio::time::timeout(Duration::from_secs(10), router.oneshot(request))
                .await
                .expect("answered in time")
                .expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
            node.shutdown().await;
            Some((uri, status, bytes))
        });
        if let Some((uri, status, bytes)) = answered {
            let panicked = uri.starts_with("/v1/call/examples/panic");
            prop_assert!(status != 500 || panicked, "{} {} -> 500: {:?}", method, uri, bytes);
            if status.is_client_error() || status.is_server_error() {
                let body: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| TestCaseError::fail(format!("{method} {uri} -> {status} without JSON: {e}")))?;
                prop_assert!(body["kind"].is_string() && body["message"].is_string(), "{}", body);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Requests and outcomes as read back from a statekeeper: corrupt bytes are an error,
    /// and what decodes encodes to bytes that decode to the same value.
    #[test]
    fn stored_requests_and_outcomes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(request) = codec::decode::<girder::Request>(&bytes) {
            let again = codec::encode(&request).expect("encodes");
            prop_assert_eq!(codec::decode::<girder::Request>(&again).expect("decodes"), request);
        }
        if let Ok(outcome) = codec::decode::<girder::Outcome>(&bytes) {
            let again = codec::encode(&outcome).expect("encodes");
            prop_assert_eq!(codec::decode::<girder::Outcome>(&again).expect("decodes"), outcome);
        }
    }

    #[test]
    fn requests_round_trip(function in "[a-z/_]{1,24}", version in any::<u32>(), args in prop::collection::vec(json_value(), 0..4)) {
        let args = codec::json_args_to_msgpack(&serde_json::Value::Array(args)).expect("encodes");
        let request = girder::Request::new(function, version, args);
        let decoded: girder::Request = codec::decode(&codec::encode(&request).expect("encodes")).expect("decodes");
        prop_assert_eq!(decoded, request);
    }

    /// Any writes to a small in-memory store: the byte count stays exact and under the
    /// budget, and a write refused for lack of room changes nothing it can see.
    #[test]
    fn the_in_memory_byte_budget_holds_under_any_writes(
        writes in prop::collection::vec((0u8..6, 0u8..8, 0usize..3_000, any::<bool>()), 1..120),
    ) {
        use girder::structures::memory::{InMemory, InMemoryConfig};
        use girder::structures::Structures;
        let bytes_max = 16 << 10;
        let store = InMemory::with_config(InMemoryConfig { bytes_max });
        runtime().block_on(async {
            for (op, key, len, ttl) in writes {
                let key = format!("k{key}");
                let value = vec![op; len];
                let before = store.value_get(Kind::Value, &key).await;
                let used_before = store.bytes_used();
                let result = match op {
                    0 => store.value_set(Kind::Value, &key, &value, ttl.then_some(60_000)).await.map(drop),
                    1 => store.value_append(&key, &value, 8_000).await.map(drop),
                    2 => store.map_put(Kind::Map, &key, &value[..len.min(4)], &value).await.map(drop),
                    3 => store.set_add(&key, &value).await.map(drop),
                    4 => store.list_push(Kind::List, &key, &value, ttl, None).await.map(drop),
                    _ => store.list_pop(Kind::List, &key, ttl).await.map(drop),
                };
                if result.as_ref().is_err_and(|e| e.is_full()) {
                    // Refused: the key reads as before and nothing was evicted (no TTL
                    // here expires within the test).
                    prop_assert_eq!(store.value_get(Kind::Value, &key).await, before);
                    prop_assert_eq!(store.bytes_used(), used_before);
                }
                let (recounted, used) = store.bytes_recounted();
                prop_assert_eq!(recounted, used);
                prop_assert!(used <= bytes_max, "{} bytes held, over {}", used, bytes_max);
            }
            Ok(())
        })?;
    }
}
