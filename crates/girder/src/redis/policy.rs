//! Whether the Redis server's memory settings are safe for a grid.
//!
//! A grid keeps on Redis both state that must never go (queues, requests, nodes, leases,
//! locks, the function directory) and state that may (memoized results and cache values,
//! which carry a TTL). What Redis does when it runs out of memory decides which it loses:
//!
//! - no `maxmemory` (0): Redis grows until the machine runs out of memory;
//! - `allkeys-*`: Redis may evict any key, grid state included: calls hang or run twice,
//!   locks are lost;
//! - `volatile-*`: Redis evicts only keys with a TTL: results and cache values, which the
//!   grid computes or misses again: safe;
//! - `noeviction`: writes fail once full, and nothing is lost: safe.

use redis::aio::ConnectionLike;

/// The memory policies under which Redis evicts only keys with a TTL, or nothing.
fn policy_is_safe(policy: &str) -> bool {
    policy == "noeviction" || policy.starts_with("volatile-")
}

/// Reads one setting with `CONFIG GET`.
async fn config_get(conn: &mut impl ConnectionLike, name: &str) -> redis::RedisResult<Option<String>> {
    // RESP2 answers a flat [name, value] list, RESP3 a map: both read as pairs.
    let pairs: Vec<(String, String)> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await?;
    Ok(pairs.into_iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value))
}

/// What is unsafe about the server's memory settings for a grid, one sentence each; empty
/// when they are safe or cannot be read (`CONFIG` is often disabled or renamed on managed
/// Redis: that is said at debug level, and is no failure).
pub(crate) async fn memory_warnings(conn: &mut impl ConnectionLike) -> Vec<String> {
    let settings = async {
        let maxmemory = config_get(conn, "maxmemory").await?;
        let policy = config_get(conn, "maxmemory-policy").await?;
        redis::RedisResult::Ok((maxmemory, policy))
    };
    let (maxmemory, policy) = match settings.await {
        Ok(settings) => settings,
        Err(err) => {
            tracing::debug!(%err, "cannot read Redis's maxmemory settings (CONFIG may be disabled): not checked");
            return Vec::new();
        }
    };
    let mut warnings = Vec::new();
    if maxmemory.as_deref().and_then(|m| m.trim().parse::<u64>().ok()) == Some(0) {
        warnings.push(
            "Redis has no maxmemory: memoized results and cache values grow until the machine runs out of memory; \
             set maxmemory, with maxmemory-policy volatile-lru, volatile-ttl or noeviction"
                .to_owned(),
        );
    }
    if let Some(policy) = policy.filter(|p| !policy_is_safe(p)) {
        warnings.push(format!(
            "Redis's maxmemory-policy is {policy}: when full, Redis may evict any key, the grid's queues, requests, \
             nodes and locks included (calls hang or run twice); use volatile-lru, volatile-ttl (evict only results \
             and cache values with a TTL) or noeviction (writes fail when full, nothing is lost)"
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    #[tokio::test]
    async fn warns_about_no_maxmemory_and_policies_that_evict_grid_state() {
        let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
        let client = redis::Client::open(server.url()).expect("url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connects");
        let setter = conn.clone();
        let set = |name: &'static str, value: &'static str| {
            let mut conn = setter.clone();
            async move {
                redis::cmd("CONFIG").arg("SET").arg(name).arg(value).query_async::<()>(&mut conn).await.expect("set");
            }
        };
        set("maxmemory", "0").await;
        set("maxmemory-policy", "noeviction").await;
        let warnings = memory_warnings(&mut conn).await;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("no maxmemory"), "{warnings:?}");

        set("maxmemory", "512mb").await;
        for safe in ["noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"] {
            set("maxmemory-policy", safe).await;
            let warnings = memory_warnings(&mut conn).await;
            assert!(warnings.is_empty(), "{safe}: {warnings:?}");
        }
        for unsafe_policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            set("maxmemory-policy", unsafe_policy).await;
            let warnings = memory_warnings(&mut conn).await;
            assert_eq!(warnings.len(), 1, "{unsafe_policy}: {warnings:?}");
            assert!(warnings[0].contains(unsafe_policy) && warnings[0].contains("volatile-lru"), "{warnings:?}");
        }
        set("maxmemory", "0").await;
        assert_eq!(memory_warnings(&mut conn).await.len(), 2, "both at once");

        // Managed Redis often refuses CONFIG: no warning, no failure, and the connection
        // still serves.
        redis::cmd("ACL")
            .arg(&["SETUSER", "limited", "on", ">secret", "+@all", "-config", "~*", "&*"])
            .query_async::<()>(&mut conn)
            .await
            .expect("acl");
        let limited =
            redis::Client::open(server.url().replacen("redis://", "redis://limited:secret@", 1)).expect("url");
        let mut limited = limited.get_multiplexed_async_connection().await.expect("connects as limited");
        let refused = redis::cmd("CONFIG").arg("GET").arg("maxmemory").query_async::<redis::Value>(&mut limited).await;
        assert!(refused.is_err(), "CONFIG is refused to this user: {refused:?}");
        assert!(memory_warnings(&mut limited).await.is_empty());
        let pong: String = redis::cmd("PING").query_async(&mut limited).await.expect("still serves");
        assert_eq!(pong, "PONG");
    }
}
