//! Built-in example functions, shipped in the binary so a grid can be exercised with no
//! code: `examples/echo`, `sleep`, `fail`, `panic`, `fib`, `tree`, `tree_blocking`,
//! `nap_tree`, `chain`, `chain_blocking`, `zigzag`, `zigzag_blocking` and `whoami`.

use futures::future::try_join_all;

use crate::grid::function::Registry;
use crate::grid::Ctx;

/// Longest `examples/sleep` sleeps: ten minutes.
pub const SLEEP_MS_MAX: u64 = 600_000;
/// Largest `n` for which `examples/fib` fits in a `u64`.
pub const FIB_N_MAX: u64 = 93;
/// Most requests one `examples/tree` call may fan out to, itself included.
pub const TREE_REQUESTS_MAX: u64 = 10_000_000;
/// Deepest `examples/chain` (and its twins) may go.
pub const CHAIN_N_MAX: u64 = 10_000_000;

impl Registry {
    /// A registry holding girder's built-in `examples/*` functions.
    pub fn with_examples() -> Registry {
        let mut registry = Registry::new();
        register(&mut registry);
        registry
    }
}

/// Registers every example in `registry`.
pub fn register(registry: &mut Registry) {
    registry
        .register::<echo>()
        .register::<sleep>()
        .register::<fail>()
        .register::<panic>()
        .register::<fib>()
        .register::<tree>()
        .register::<tree_blocking>()
        .register::<nap_tree>()
        .register::<chain>()
        .register::<chain_blocking>()
        .register::<zigzag>()
        .register::<zigzag_blocking>()
        .register::<whoami>();
}

/// Returns the id of the node that ran it; `tag` only tells calls apart.
#[crate::function(name = "examples/whoami")]
pub async fn whoami(ctx: Ctx, tag: String) -> String {
    let _ = tag;
    ctx.node_id().to_owned()
}

/// Returns its argument unchanged: the no-op request.
#[crate::function(name = "examples/echo")]
pub async fn echo(_ctx: Ctx, value: rmpv::Value) -> rmpv::Value {
    value
}

/// Sleeps `ms` milliseconds (at most [`SLEEP_MS_MAX`]) in its slot and returns `ms`.
#[crate::function(name = "examples/sleep")]
pub async fn sleep(_ctx: Ctx, ms: u64) -> Result<u64, String> {
    if ms > SLEEP_MS_MAX {
        return Err(format!("sleep is limited to {SLEEP_MS_MAX} ms, got {ms}"));
    }
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    Ok(ms)
}

/// Returns an error with `message`.
#[crate::function(name = "examples/fail")]
pub async fn fail(_ctx: Ctx, message: String) -> Result<(), String> {
    Err(message)
}

/// Panics; the grid reports it to the caller and the node keeps serving.
#[crate::function(name = "examples/panic")]
pub async fn panic(_ctx: Ctx) {
    std::panic::panic_any("examples/panic was called".to_owned());
}

/// The `n`th Fibonacci number by naive recursion through nested requests; memoization
/// makes it linear. Correct for `n` up to [`FIB_N_MAX`].
#[crate::function(name = "examples/fib", version = 1)]
pub async fn fib(ctx: Ctx, n: u64) -> Result<u64, String> {
    if n > FIB_N_MAX {
        return Err(format!("fib({n}) does not fit in 64 bits; n must be at most {FIB_N_MAX}"));
    }
    if n < 2 {
        return Ok(n);
    }
    let (a, b) = futures::join!(fib::call(&ctx, n - 1), fib::call(&ctx, n - 2));
    let (a, b) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
    a.checked_add(b).ok_or_else(|| format!("fib({n}) overflowed"))
}

fn tree_check(depth: u32, fanout: u32, id: u64) -> Result<(), String> {
    let mut total: u64 = 1;
    let mut level: u64 = 1;
    for _ in 0..depth {
        level = level.saturating_mul(u64::from(fanout));
        total = total.saturating_add(level);
        // Past the limit, or no level left to add: more rounds change nothing (and a huge
        // `depth` must not keep this slot busy).
        if total > TREE_REQUESTS_MAX || level == 0 {
            break;
        }
    }
    if total > TREE_REQUESTS_MAX {
        return Err(format!("tree({depth}, {fanout}) would make more than {TREE_REQUESTS_MAX} requests"));
    }
    // The deepest ids are about id * fanout^depth; refuse before they overflow.
    id.checked_mul(level.max(1))
        .and_then(|x| x.checked_add(total))
        .map(|_| ())
        .ok_or_else(|| format!("tree ids overflow from id {id}"))
}

fn child_id(id: u64, fanout: u32, k: u32) -> u64 {
    id * u64::from(fanout) + u64::from(k)
}

/// A recursive fan-out: `tree(depth, fanout, id)` calls the distinct requests
/// `tree(depth-1, fanout, id*fanout+k)` for k in 1..=fanout concurrently and returns the
/// number of requests in its subtree (`tree(7,3,0)` = 3280; depth 0 returns 1).
#[crate::function(name = "examples/tree")]
pub async fn tree(ctx: Ctx, depth: u32, fanout: u32, id: u64) -> Result<u64, String> {
    tree_check(depth, fanout, id)?;
    if depth == 0 {
        return Ok(1);
    }
    let children = (1..=fanout).map(|k| tree::call(&ctx, depth - 1, fanout, child_id(id, fanout, k)));
    let counts = try_join_all(children).await.map_err(|e| e.to_string())?;
    Ok(1 + counts.iter().sum::<u64>())
}

/// [`tree`] whose leaves each sleep `ms` milliseconds (at most [`SLEEP_MS_MAX`]): a tree
/// of slow requests, for watching cancellation and failover. Returns its subtree's size.
#[crate::function(name = "examples/nap_tree")]
pub async fn nap_tree(ctx: Ctx, depth: u32, fanout: u32, id: u64, ms: u64) -> Result<u64, String> {
    tree_check(depth, fanout, id)?;
    if depth == 0 {
        // A leaf is a request of its own (`id` tells leaves apart), so it sleeps itself
        // rather than share one `sleep(ms)` with every other leaf.
        if ms > SLEEP_MS_MAX {
            return Err(format!("nap_tree's leaves sleep at most {SLEEP_MS_MAX} ms, got {ms}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Ok(1);
    }
    let children = (1..=fanout).map(|k| nap_tree::call(&ctx, depth - 1, fanout, child_id(id, fanout, k), ms));
    let counts = try_join_all(children).await.map_err(|e| e.to_string())?;
    Ok(1 + counts.iter().sum::<u64>())
}

/// [`tree`] as a blocking function: its children are called one after another from its
/// thread, which runs them itself from its worker's queue while it waits.
#[crate::function(name = "examples/tree_blocking")]
pub fn tree_blocking(ctx: Ctx, depth: u32, fanout: u32, id: u64) -> Result<u64, String> {
    tree_check(depth, fanout, id)?;
    let mut count = 1;
    if depth > 0 {
        for k in 1..=fanout {
            count += tree_blocking::call_blocking(&ctx, depth - 1, fanout, child_id(id, fanout, k))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(count)
}

fn chain_check(n: u64) -> Result<(), String> {
    if n > CHAIN_N_MAX {
        return Err(format!("chains are limited to depth {CHAIN_N_MAX}, got {n}"));
    }
    Ok(())
}

/// A chain of nested requests `n` deep: 0 for `n = 0`, else `1 + chain(n - 1)`, so
/// `chain(n) = n`. Checks that async functions nest to any depth.
#[crate::function(name = "examples/chain")]
pub async fn chain(ctx: Ctx, n: u64) -> Result<u64, String> {
    chain_check(n)?;
    if n == 0 {
        return Ok(0);
    }
    Ok(1 + chain::call(&ctx, n - 1).await.map_err(|e| e.to_string())?)
}

/// [`chain`] as a blocking function: `chain_blocking(n) = n`. Checks that blocking
/// functions nest to any depth without a thread per level or a stack overflow.
#[crate::function(name = "examples/chain_blocking")]
pub fn chain_blocking(ctx: Ctx, n: u64) -> Result<u64, String> {
    chain_check(n)?;
    if n == 0 {
        return Ok(0);
    }
    Ok(1 + chain_blocking::call_blocking(&ctx, n - 1).map_err(|e| e.to_string())?)
}

/// A chain whose levels alternate between async and blocking functions: `zigzag(n)` is
/// async and calls `zigzag_blocking(n - 1)`, which calls `zigzag(n - 2)`, ...; both
/// return `n`.
#[crate::function(name = "examples/zigzag")]
pub async fn zigzag(ctx: Ctx, n: u64) -> Result<u64, String> {
    chain_check(n)?;
    if n == 0 {
        return Ok(0);
    }
    Ok(1 + zigzag_blocking::call(&ctx, n - 1).await.map_err(|e| e.to_string())?)
}

/// The blocking half of [`zigzag`].
#[crate::function(name = "examples/zigzag_blocking")]
pub fn zigzag_blocking(ctx: Ctx, n: u64) -> Result<u64, String> {
    chain_check(n)?;
    if n == 0 {
        return Ok(0);
    }
    Ok(1 + zigzag::call_blocking(&ctx, n - 1).map_err(|e| e.to_string())?)
}
