//! The engine conformance suite: every [`super::Engine`] passes it (the in-memory one and the
//! disk one, in `tests/engine.rs`). Each case gets a fresh, empty engine.

use bytes::Bytes;

use super::{Engine, EngineError, ItemKey};
use crate::store::record::{Record, RecordMeta, Version, HEADER_LEN};

/// An engine under test, and a way to damage what it stores.
pub trait Subject {
    /// The engine.
    fn engine(&self) -> &dyn Engine;
    /// Damages the stored record of `key`, whose value is `value` (at least 64 distinctive
    /// bytes), as a bad disk would. May reopen the engine.
    fn corrupt(&mut self, key: &ItemKey, value: &[u8]);
}

type Case = fn(&mut dyn Subject);

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("put_get_overwrite_and_tombstones", put_get_overwrite_and_tombstones),
    ("batches_write_every_record_and_the_last_of_a_key_wins", batches_write_every_record),
    ("scan_bucket_keeps_buckets_apart_and_pages", scan_bucket_keeps_buckets_apart_and_pages),
    ("scan_bucket_pages_end_at_a_byte_budget", scan_bucket_pages_end_at_a_byte_budget),
    ("scan_flock_orders_and_pages_by_key", scan_flock_orders_and_pages_by_key),
    ("remove_drops_records_outright", remove_drops_records_outright),
    ("usage_follows_writes_overwrites_and_removals", usage_follows_writes),
    ("large_values_round_trip_and_shrink", large_values_round_trip_and_shrink),
    ("corrupt_records_are_reported_never_served", corrupt_records_are_reported),
    ("concurrent_writers_all_land", concurrent_writers_all_land),
];

/// Runs every case against subjects from `factory`, naming the case that fails.
pub fn run_all(factory: &dyn Fn() -> Box<dyn Subject>) {
    for (name, case) in CASES {
        let mut subject = factory();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(subject.as_mut())));
        if let Err(panic) = outcome {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("engine conformance case {name} failed: {}", msg.unwrap_or_default());
        }
    }
}

/// A record of `value` at version `seq`.
pub fn record(seq: u64, value: impl Into<Bytes>) -> Record {
    Record {
        version: Version { seq, epoch: 3 },
        tombstone: false,
        written_ms: 1_700_000_000_000 + seq,
        value: value.into(),
    }
}

/// A tombstone at version `seq`.
pub fn tombstone(seq: u64) -> Record {
    Record { tombstone: true, ..record(seq, Bytes::new()) }
}

/// `len` bytes no other call returns (for a different `seed`), findable on disk.
pub fn distinctive(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn key(flock: u32, bucket: &str, item: &str) -> ItemKey {
    ItemKey::new(flock, bucket, item)
}

fn items(page: &[(String, Record)]) -> Vec<&str> {
    page.iter().map(|(item, _)| item.as_str()).collect()
}

fn put_get_overwrite_and_tombstones(s: &mut dyn Subject) {
    let e = s.engine();
    let k = key(5, "bucket", "item");
    assert_eq!(e.get(&k).unwrap(), None);
    e.write(&[(k.clone(), record(1, "one"))]).unwrap();
    assert_eq!(e.get(&k).unwrap(), Some(record(1, "one")));
    e.write(&[(k.clone(), record(2, "two, longer"))]).unwrap();
    assert_eq!(e.get(&k).unwrap(), Some(record(2, "two, longer")), "an overwrite replaces the record");
    e.write(&[(k.clone(), tombstone(3))]).unwrap();
    assert_eq!(e.get(&k).unwrap(), Some(tombstone(3)), "a tombstone is a record like any other");
    assert_eq!(e.get(&key(5, "bucket", "other")).unwrap(), None);
    assert_eq!(e.get(&key(6, "bucket", "item")).unwrap(), None, "flocks are apart");
    let empty = key(0, "", "");
    e.write(&[(empty.clone(), record(1, ""))]).unwrap();
    assert_eq!(e.get(&empty).unwrap(), Some(record(1, "")), "empty bucket, item and value");
    e.write(&[]).unwrap();
    e.flush().unwrap();
    assert_eq!(e.get(&k).unwrap(), Some(tombstone(3)));
}

fn batches_write_every_record(s: &mut dyn Subject) {
    let e = s.engine();
    let batch = vec![
        (key(1, "b", "x"), record(1, "x1")),
        (key(2, "c", "y"), record(1, "y1")),
        (key(1, "b", "x"), record(2, "x2")),
        (key(1, "b", "z"), tombstone(4)),
    ];
    e.write(&batch).unwrap();
    assert_eq!(e.get(&key(1, "b", "x")).unwrap(), Some(record(2, "x2")), "the last record of a key wins");
    assert_eq!(e.get(&key(2, "c", "y")).unwrap(), Some(record(1, "y1")));
    assert_eq!(e.get(&key(1, "b", "z")).unwrap(), Some(tombstone(4)));
    let usage = e.usage();
    assert_eq!(usage.iter().map(|u| (u.flock, u.items)).collect::<Vec<_>>(), vec![(1, 1), (2, 1)]);
}

fn scan_bucket_keeps_buckets_apart_and_pages(s: &mut dyn Subject) {
    let e = s.engine();
    let mut batch = Vec::new();
    for (bucket, item) in [
        ("a", "bc"),
        ("ab", "c"),
        ("a", ""),
        ("a", "a"),
        ("a", "b\0"),
        ("a\0", "x"),
        ("", "lone"),
        ("b", "a"),
        ("a", "\u{e9}t\u{e9}"),
    ] {
        batch.push((key(9, bucket, item), record(1, format!("{bucket}/{item}"))));
    }
    batch.push((key(8, "a", "other flock"), record(1, "8")));
    batch.push((key(10, "a", "other flock"), record(1, "10")));
    batch.push((key(9, "a", "gone"), tombstone(2)));
    e.write(&batch).unwrap();

    let all = e.scan_bucket(9, "a", None, 100).unwrap();
    assert_eq!(items(&all), vec!["", "a", "b\0", "bc", "gone", "\u{e9}t\u{e9}"], "bucket a holds only its items");
    assert_eq!(all[3].1, record(1, "a/bc"));
    assert!(all[4].1.tombstone, "tombstones are scanned");
    assert_eq!(items(&e.scan_bucket(9, "ab", None, 100).unwrap()), vec!["c"]);
    assert_eq!(items(&e.scan_bucket(9, "a\0", None, 100).unwrap()), vec!["x"]);
    assert_eq!(items(&e.scan_bucket(9, "", None, 100).unwrap()), vec!["lone"]);
    assert_eq!(e.scan_bucket(9, "none", None, 100).unwrap(), vec![]);
    assert_eq!(e.scan_bucket(9, "a", None, 0).unwrap(), vec![]);

    for limit in [1, 2, 5, 6, 7] {
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = e.scan_bucket(9, "a", after.as_deref(), limit).unwrap();
            assert!(page.len() <= limit);
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            paged.extend(page);
        }
        assert_eq!(paged, all, "paging by {limit} gives every record once, in order");
    }
    assert_eq!(items(&e.scan_bucket(9, "a", Some("b"), 2).unwrap()), vec!["b\0", "bc"], "after need not exist");
    assert_eq!(e.scan_bucket(9, "a", Some("\u{10ffff}"), 10).unwrap(), vec![]);
}

fn scan_bucket_pages_end_at_a_byte_budget(s: &mut dyn Subject) {
    let e = s.engine();
    let batch: Vec<_> = (0..10).map(|i| (key(4, "big", &format!("i{i}")), record(1, "x".repeat(1_000)))).collect();
    e.write(&batch).unwrap();
    let page = e.scan_bucket_bytes(4, "big", None, 100, 2_500).unwrap();
    assert_eq!(items(&page), vec!["i0", "i1", "i2"], "the page ends with the record that crosses the budget");
    let page = e.scan_bucket_bytes(4, "big", None, 100, 1).unwrap();
    assert_eq!(items(&page), vec!["i0"], "a page holds at least one record");
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = e.scan_bucket_bytes(4, "big", after.as_deref(), 100, 3_000).unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page);
    }
    assert_eq!(paged.len(), 10, "paging by bytes gives every record once");
}

fn scan_flock_orders_and_pages_by_key(s: &mut dyn Subject) {
    let e = s.engine();
    let mut written = Vec::new();
    for (i, (bucket, item)) in
        [("b", "1"), ("a", "2"), ("ab", ""), ("a", "1"), ("", "z"), ("a\0", "")].into_iter().enumerate()
    {
        let r = if i == 2 { tombstone(7) } else { record(i as u64 + 1, format!("v{i}")) };
        written.push((key(4, bucket, item), r));
    }
    written.push((key(3, "a", "before"), record(1, "3")));
    written.push((key(5, "a", "after"), record(1, "5")));
    e.write(&written).unwrap();

    let mut expected: Vec<(ItemKey, RecordMeta)> =
        written.iter().filter(|(k, _)| k.flock == 4).map(|(k, r)| (k.clone(), r.meta())).collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(e.scan_flock(4, None, 100).unwrap(), expected, "in key order, with metadata, tombstones too");
    for limit in [1, 3, 6] {
        let mut paged = Vec::new();
        let mut after: Option<ItemKey> = None;
        loop {
            let page = e.scan_flock(4, after.as_ref(), limit).unwrap();
            assert!(page.len() <= limit);
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            paged.extend(page);
        }
        assert_eq!(paged, expected, "paging by {limit}");
    }
    assert_eq!(e.scan_flock(4, Some(&key(3, "zzz", "zzz")), 100).unwrap(), expected, "after in an earlier flock");
    assert_eq!(e.scan_flock(4, Some(&key(5, "", "")), 100).unwrap(), vec![], "after in a later flock");
    assert_eq!(e.scan_flock(6, None, 100).unwrap(), vec![]);
    assert_eq!(e.scan_flock(4, None, 0).unwrap(), vec![]);
}

fn remove_drops_records_outright(s: &mut dyn Subject) {
    let e = s.engine();
    e.write(&[
        (key(1, "b", "x"), record(1, "x")),
        (key(1, "b", "y"), tombstone(2)),
        (key(2, "b", "x"), record(1, "x")),
    ])
    .unwrap();
    e.remove(&[key(1, "b", "x"), key(1, "b", "y"), key(1, "b", "never")]).unwrap();
    assert_eq!(e.get(&key(1, "b", "x")).unwrap(), None);
    assert_eq!(e.get(&key(1, "b", "y")).unwrap(), None, "tombstones are removed too, leaving nothing");
    assert_eq!(e.scan_bucket(1, "b", None, 10).unwrap(), vec![]);
    assert_eq!(e.scan_flock(1, None, 10).unwrap(), vec![]);
    assert_eq!(e.get(&key(2, "b", "x")).unwrap(), Some(record(1, "x")), "other flocks are untouched");
    assert_eq!(e.usage().iter().map(|u| u.flock).collect::<Vec<_>>(), vec![2], "an emptied flock leaves usage");
    e.remove(&[]).unwrap();
}

fn usage_follows_writes(s: &mut dyn Subject) {
    let e = s.engine();
    let h = HEADER_LEN as u64;
    assert_eq!(e.usage(), vec![]);
    e.write(&[(key(7, "b", "x"), record(1, "12345")), (key(7, "b", "y"), record(1, "12"))]).unwrap();
    let usage = e.usage();
    assert_eq!((usage[0].flock, usage[0].items, usage[0].bytes), (7, 2, 2 * h + 7));
    e.write(&[(key(7, "b", "x"), record(2, "1234567890"))]).unwrap();
    assert_eq!((e.usage()[0].items, e.usage()[0].bytes), (2, 2 * h + 12), "an overwrite counts its new size");
    e.write(&[(key(7, "b", "y"), tombstone(2))]).unwrap();
    assert_eq!((e.usage()[0].items, e.usage()[0].bytes), (1, 2 * h + 10), "a tombstone is not a live item");
    e.write(&[(key(1, "c", "z"), record(1, "z"))]).unwrap();
    assert_eq!(e.usage().iter().map(|u| u.flock).collect::<Vec<_>>(), vec![1, 7], "in flock order");
    e.remove(&[key(7, "b", "x"), key(7, "b", "y")]).unwrap();
    assert_eq!(e.usage().iter().map(|u| (u.flock, u.items, u.bytes)).collect::<Vec<_>>(), vec![(1, 1, h + 1)]);
}

fn large_values_round_trip_and_shrink(s: &mut dyn Subject) {
    let e = s.engine();
    let big = distinctive(1, 600 << 10);
    let k = key(2, "big", "one");
    e.write(&[(k.clone(), record(1, big.clone())), (key(2, "big", "small"), record(1, "s"))]).unwrap();
    assert_eq!(e.get(&k).unwrap().map(|r| r.value), Some(Bytes::from(big.clone())));
    let page = e.scan_bucket(2, "big", None, 10).unwrap();
    assert_eq!(page[0].1.value.len(), big.len());
    assert_eq!(e.scan_flock(2, None, 10).unwrap()[0].1, record(1, big.clone()).meta());
    let bigger = distinctive(2, 900 << 10);
    e.write(&[(k.clone(), record(2, bigger.clone()))]).unwrap();
    assert_eq!(e.get(&k).unwrap().map(|r| r.value), Some(Bytes::from(bigger)));
    e.write(&[(k.clone(), record(3, "now small"))]).unwrap();
    assert_eq!(e.get(&k).unwrap(), Some(record(3, "now small")), "a long value shrinks to a short one");
    assert_eq!(e.usage()[0].bytes, 2 * HEADER_LEN as u64 + 10);
    e.write(&[(k.clone(), record(4, big.clone()))]).unwrap();
    e.remove(std::slice::from_ref(&k)).unwrap();
    assert_eq!(e.get(&k).unwrap(), None);
    assert_eq!(e.usage()[0].bytes, HEADER_LEN as u64 + 1);
}

fn corrupt_records_are_reported(s: &mut dyn Subject) {
    let values: Vec<Vec<u8>> = (0..3).map(|i| distinctive(10 + i, 200)).collect();
    let keys: Vec<ItemKey> = ["i0", "i1", "i2"].iter().map(|item| key(3, "bkt", item)).collect();
    let batch: Vec<_> = keys.iter().zip(&values).map(|(k, v)| (k.clone(), record(1, v.clone()))).collect();
    s.engine().write(&batch).unwrap();
    s.corrupt(&keys[1], &values[1]);
    let e = s.engine();
    match e.get(&keys[1]) {
        Err(EngineError::Corrupt { key, reason }) => assert!(key == keys[1] && !reason.is_empty()),
        other => panic!("a damaged record was served: {other:?}"),
    }
    assert_eq!(e.get(&keys[0]).unwrap(), Some(record(1, values[0].clone())), "its neighbours are fine");
    match e.scan_bucket(3, "bkt", None, 10) {
        Err(EngineError::Corrupt { key, .. }) => assert_eq!(key, keys[1]),
        other => panic!("a scan served a damaged record: {other:?}"),
    }
    assert_eq!(items(&e.scan_bucket(3, "bkt", None, 1).unwrap()), vec!["i0"], "a page before it is fine");
    assert_eq!(items(&e.scan_bucket(3, "bkt", Some("i1"), 10).unwrap()), vec!["i2"], "a scan goes on past it");
    let metas = e.scan_flock(3, None, 10).unwrap();
    assert_eq!(metas.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), keys, "scan_flock lists every key");
    assert!(metas[1].1 == record(1, values[1].clone()).meta() || metas[1].1 == RecordMeta::CORRUPT);
    assert_eq!(e.usage()[0].items, 3);
    e.write(&[(keys[1].clone(), record(2, "repaired"))]).unwrap();
    assert_eq!(e.get(&keys[1]).unwrap(), Some(record(2, "repaired")), "a rewrite repairs it");
    assert_eq!(e.scan_bucket(3, "bkt", None, 10).unwrap().len(), 3);
    assert_eq!(e.usage()[0].items, 3);
}

fn concurrent_writers_all_land(s: &mut dyn Subject) {
    let e = s.engine();
    let (threads, each) = (4, 40);
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for i in 0..each {
                    let k = key(t % 2, "shared", &format!("t{t}-{i:03}"));
                    e.write(&[(k, record(1, format!("{t}/{i}"))), (key(9, "hot", "one"), record(1, "hot"))]).unwrap();
                }
            });
        }
    });
    for t in 0..threads {
        let page = e.scan_bucket(t % 2, "shared", Some(&format!("t{t}-")), 1000).unwrap();
        let mine: Vec<_> = page.iter().filter(|(item, _)| item.starts_with(&format!("t{t}-"))).collect();
        assert_eq!(mine.len(), each as usize, "writer {t} lost writes");
        assert_eq!(mine[7].1.value, Bytes::from(format!("{t}/7")));
    }
    let usage = e.usage();
    assert_eq!(usage.iter().map(|u| u.items).sum::<u64>(), (threads * each) as u64 + 1);
}
