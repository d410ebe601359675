//! `GirderSessionStore` against the embedded statekeeper: the `SessionStore` contract,
//! expiry by the store's TTL and by the record's own date, ids never overwritten, limits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use girder::structures::{Kind, Store};
use girder::{Embedded, EmbeddedConfig, Statekeeper};
use girder_sessions::{GirderSessionStore, SessionStoreConfig, SESSION_KIND};
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{Error, SessionStore};

fn store() -> (GirderSessionStore, Store) {
    let structures = Embedded::new(EmbeddedConfig::default()).structures();
    let config = SessionStoreConfig { record_bytes_max: 4_096, ..Default::default() };
    let sessions = GirderSessionStore::with_config(structures.clone(), config).expect("valid config");
    (sessions, structures)
}

fn record(count: u64, lifetime: time::Duration) -> Record {
    let data = HashMap::from([("count".to_owned(), serde_json::json!(count))]);
    Record { id: Id::default(), data, expiry_date: OffsetDateTime::now_utc() + lifetime }
}

#[tokio::test]
async fn create_save_load_delete() {
    let (sessions, _) = store();
    let mut first = record(1, time::Duration::minutes(5));
    sessions.create(&mut first).await.expect("created");
    assert_eq!(sessions.load(&first.id).await.expect("loads"), Some(first.clone()));

    first.data.insert("count".to_owned(), serde_json::json!(2));
    sessions.save(&first).await.expect("saved");
    assert_eq!(sessions.load(&first.id).await.expect("loads"), Some(first.clone()));

    sessions.delete(&first.id).await.expect("deleted");
    assert_eq!(sessions.load(&first.id).await.expect("loads"), None);
    sessions.delete(&first.id).await.expect("deleting a missing session is fine");
    assert_eq!(sessions.load(&Id::default()).await.expect("loads"), None);
}

#[tokio::test]
async fn create_never_overwrites_a_stored_session() {
    let (sessions, _) = store();
    let stored = record(1, time::Duration::minutes(5));
    sessions.save(&stored).await.expect("saved");

    let mut newcomer = record(99, time::Duration::minutes(5));
    newcomer.id = stored.id;
    sessions.create(&mut newcomer).await.expect("created");
    assert_ne!(newcomer.id, stored.id, "create must draw a fresh id for a taken one");
    assert_eq!(sessions.load(&stored.id).await.expect("loads"), Some(stored));
    assert_eq!(sessions.load(&newcomer.id).await.expect("loads"), Some(newcomer));
}

#[tokio::test]
async fn a_session_expires_with_its_ttl() {
    let (sessions, structures) = store();
    let session = record(1, time::Duration::milliseconds(300));
    let begun = Instant::now();
    sessions.save(&session).await.expect("saved");
    assert!(sessions.load(&session.id).await.expect("loads").is_some());
    tokio::time::sleep(Duration::from_millis(350).saturating_sub(begun.elapsed())).await;
    assert_eq!(sessions.load(&session.id).await.expect("loads"), None);
    let key = sessions.key(&session.id);
    assert!(!structures.exists(SESSION_KIND, &key).await.expect("exists"), "the stored value expired too");
}

#[tokio::test]
async fn a_record_past_its_date_is_not_returned_while_the_cache_still_holds_it() {
    let (sessions, structures) = store();
    let session = record(1, time::Duration::milliseconds(200));
    sessions.save(&session).await.expect("saved");
    // As if a process whose clock runs late had stored it: the store keeps it for an hour.
    let key = sessions.key(&session.id);
    let stored = structures.value_get(SESSION_KIND, &key).await.expect("reads").expect("stored");
    structures.value_set(SESSION_KIND, &key, &stored.bytes, Some(3_600_000)).await.expect("rewritten");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(structures.exists(SESSION_KIND, &key).await.expect("exists"));
    assert_eq!(sessions.load(&session.id).await.expect("loads"), None);
}

#[tokio::test]
async fn saving_an_expired_record_removes_it() {
    let (sessions, structures) = store();
    let mut session = record(1, time::Duration::minutes(5));
    sessions.save(&session).await.expect("saved");
    session.expiry_date = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    sessions.save(&session).await.expect("saved");
    assert!(!structures.exists(SESSION_KIND, &sessions.key(&session.id)).await.expect("exists"));
    assert_eq!(sessions.load(&session.id).await.expect("loads"), None);
}

#[tokio::test]
async fn a_record_over_the_limit_is_refused_and_changes_nothing() {
    let (sessions, _) = store();
    let mut session = record(1, time::Duration::minutes(5));
    sessions.save(&session).await.expect("saved");
    session.data.insert("blob".to_owned(), serde_json::json!("x".repeat(5_000)));
    match sessions.save(&session).await {
        Err(Error::Backend(message)) => assert!(message.contains("limit is 4096"), "{message}"),
        other => panic!("expected a Backend error, got {other:?}"),
    }
    let mut fresh = session.clone();
    assert!(matches!(sessions.create(&mut fresh).await, Err(Error::Backend(_))));
    let kept = sessions.load(&session.id).await.expect("loads").expect("still there");
    assert_eq!(kept.data.get("count"), Some(&serde_json::json!(1)));
    assert!(!kept.data.contains_key("blob"));
}

#[tokio::test]
async fn garbage_or_another_kind_under_a_session_key_is_an_error() {
    let (sessions, structures) = store();
    let id = Id::default();
    structures.value_set(SESSION_KIND, &sessions.key(&id), b"not a session", None).await.expect("written");
    assert!(matches!(sessions.load(&id).await, Err(Error::Decode(_))));
    // A key holding another kind of structure is refused, and left alone.
    let other = Id::default();
    structures.value_set(Kind::Value, &sessions.key(&other), b"a cache value", None).await.expect("written");
    assert!(matches!(sessions.load(&other).await, Err(Error::Backend(_))));
    let mut overwrite = record(1, time::Duration::minutes(5));
    overwrite.id = other;
    assert!(matches!(sessions.save(&overwrite).await, Err(Error::Backend(_))));
    let kept = structures.value_get(Kind::Value, &sessions.key(&other)).await.expect("reads").expect("kept");
    assert_eq!(&kept.bytes[..], b"a cache value");
}

#[tokio::test]
async fn keys_use_the_configured_prefix() {
    let (sessions, structures) = store();
    let session = record(1, time::Duration::minutes(5));
    sessions.save(&session).await.expect("saved");
    let key = format!("sessions/{}", session.id);
    assert_eq!(sessions.key(&session.id), key);
    assert!(structures.exists(SESSION_KIND, &key).await.expect("exists"));

    let config = SessionStoreConfig { key_prefix: "girder/sessions/".to_owned(), ..Default::default() };
    assert!(GirderSessionStore::with_config(structures, config).is_err(), "girder/ is reserved");
}
