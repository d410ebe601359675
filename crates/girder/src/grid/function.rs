//! Functions: the [`Function`] trait that `#[girder::function]` implements, and the
//! [`Registry`] a node serves them from.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::error::CallError;
use crate::grid::Ctx;
use crate::request::Outcome;

/// How a function runs on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FnKind {
    /// An `async fn`: runs as a task; gives its slot back while it awaits nested requests.
    Async,
    /// A plain `fn`: runs on a slot thread; while it waits on a nested request it works
    /// through its worker's own queue on that thread, then blocks.
    Blocking,
}

/// A function that can be called through the grid. Implemented by `#[girder::function]`;
/// implement it by hand only when the attribute does not fit.
pub trait Function: Send + Sync + 'static {
    /// The namespace-qualified name, e.g. `examples/fib`.
    const NAME: &'static str;
    /// The version; bump it when the code changes so cached results are not reused.
    const VERSION: u32;
    /// Whether the body is `async`.
    const KIND: FnKind;
    /// The parameters' names, in order (the context excluded).
    const PARAMS: &'static [&'static str] = &[];
    /// How the grid retries, limits and memoizes this function (see [`Policy`]); each field
    /// left `None` takes the node's setting.
    const POLICY: Policy = Policy::NODE;
    /// The parameters as a tuple, encoded as a MessagePack array.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The result type.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Runs an [`FnKind::Async`] body. The error is the `Display` text of the body's error.
    fn run_async(ctx: Ctx, args: Self::Args) -> BoxFuture<'static, Result<Self::Output, String>>;

    /// Runs an [`FnKind::Blocking`] body.
    fn run_blocking(ctx: Ctx, args: Self::Args) -> Result<Self::Output, String>;

    /// Why `args` do not decode into the parameters, naming the parameter, what it expects
    /// and what came (see [`crate::codec::explain_args`]); `None` when it cannot tell.
    fn explain_args(args: &[u8]) -> Option<String> {
        let _ = args;
        None
    }

    /// JSON schemas of the parameters and the result, for the catalogue; by default every
    /// value is allowed (`true`).
    fn schemas() -> Schemas {
        Schemas::any(Self::PARAMS.len())
    }
}

/// Per-function policies, set in the attribute (`#[girder::function(retries = 3,
/// timeout_ms = 500, ttl_ms = 60_000)]`) and overridable per node. `None` means "the
/// node's setting".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// How many times an evaluation that panicked, or whose node was lost, is run again
    /// (with backoff) before the call fails.
    pub retries: Option<u32>,
    /// Longest an evaluation may run on a node before the grid abandons it with
    /// [`CallError::TimeLimitExceeded`] (see [`crate::NodeBuilder::time_limit`]).
    pub timeout_ms: Option<u64>,
    /// How long a memoized result of this function is kept; `None` keeps it until evicted.
    pub ttl_ms: Option<u64>,
}

impl Policy {
    /// Every field left to the node.
    pub const NODE: Policy = Policy { retries: None, timeout_ms: None, ttl_ms: None };
}

/// JSON schemas of a function's parameters (in order) and result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Schemas {
    /// One schema per parameter.
    pub params: Vec<serde_json::Value>,
    /// The result's schema.
    pub output: serde_json::Value,
}

impl Schemas {
    /// Schemas that allow any value, for `params` parameters.
    pub fn any(params: usize) -> Schemas {
        Schemas { params: vec![serde_json::Value::Bool(true); params], output: serde_json::Value::Bool(true) }
    }
}

/// A type-erased function: decodes arguments, runs the body, encodes the result.
pub(crate) trait DynFunction: Send + Sync {
    fn version(&self) -> u32;
    fn kind(&self) -> FnKind;
    fn policy(&self) -> Policy;
    fn params(&self) -> &'static [&'static str];
    fn schemas(&self) -> Schemas;
    fn invoke_async(&self, ctx: Ctx, args: &[u8]) -> BoxFuture<'static, Outcome>;
    fn invoke_blocking(&self, ctx: Ctx, args: &[u8]) -> Outcome;
    /// Whether `args` decode into the parameters, without running anything.
    fn check_args(&self, args: &[u8]) -> Result<(), CallError>;
}

struct Adapter<F>(std::marker::PhantomData<fn() -> F>);

fn decode_args<F: Function>(args: &[u8]) -> Result<F::Args, CallError> {
    codec::decode::<F::Args>(args).map_err(|message| {
        // The decoder's message names neither the parameter nor the value: say which.
        let message = F::explain_args(args).unwrap_or(message);
        CallError::BadArguments { function: F::NAME.to_owned(), message }
    })
}

fn encode_output<F: Function>(result: Result<F::Output, String>) -> Outcome {
    match result {
        Ok(value) => codec::encode_result(&value)
            .map_err(|message| CallError::BadResult { function: F::NAME.to_owned(), message }),
        Err(message) => Err(CallError::Function { function: F::NAME.to_owned(), message }),
    }
}

impl<F: Function> DynFunction for Adapter<F> {
    fn version(&self) -> u32 {
        F::VERSION
    }

    fn kind(&self) -> FnKind {
        F::KIND
    }

    fn policy(&self) -> Policy {
        F::POLICY
    }

    fn params(&self) -> &'static [&'static str] {
        F::PARAMS
    }

    fn schemas(&self) -> Schemas {
        F::schemas()
    }

    fn invoke_async(&self, ctx: Ctx, args: &[u8]) -> BoxFuture<'static, Outcome> {
        match decode_args::<F>(args) {
            Ok(args) => {
                let running = F::run_async(ctx, args);
                Box::pin(async move { encode_output::<F>(running.await) })
            }
            Err(err) => Box::pin(futures::future::ready(Err(err))),
        }
    }

    fn invoke_blocking(&self, ctx: Ctx, args: &[u8]) -> Outcome {
        encode_output::<F>(F::run_blocking(ctx, decode_args::<F>(args)?))
    }

    fn check_args(&self, args: &[u8]) -> Result<(), CallError> {
        decode_args::<F>(args).map(|_| ())
    }
}

/// One registered function.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) name: &'static str,
    pub(crate) function: Arc<dyn DynFunction>,
}

/// The functions a node can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    functions: HashMap<&'static str, Registered>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `F`, replacing any function of the same name.
    pub fn register<F: Function>(&mut self) -> &mut Registry {
        let function: Arc<dyn DynFunction> = Arc::new(Adapter::<F>(std::marker::PhantomData));
        self.functions.insert(F::NAME, Registered { name: F::NAME, function });
        self
    }

    /// Registers `F` and returns the registry, for chaining.
    pub fn with<F: Function>(mut self) -> Registry {
        self.register::<F>();
        self
    }

    /// Keeps only the functions named in `names`; fails, naming it, on a name that is not
    /// registered.
    pub fn only(mut self, names: &[&str]) -> Result<Registry, String> {
        if let Some(missing) = names.iter().find(|n| !self.functions.contains_key(**n)) {
            let known: Vec<&str> = self.names().into_iter().map(|(n, _)| n).collect();
            return Err(format!("function {missing:?} is not registered here; known: {}", known.join(", ")));
        }
        self.functions.retain(|name, _| names.contains(name));
        Ok(self)
    }

    /// The version of `name`, if registered here.
    pub fn version_of(&self, name: &str) -> Option<u32> {
        self.functions.get(name).map(|r| r.function.version())
    }

    /// The registered names with their versions, sorted by name.
    pub fn names(&self) -> Vec<(&'static str, u32)> {
        let mut names: Vec<_> = self.functions.values().map(|r| (r.name, r.function.version())).collect();
        names.sort_unstable();
        names
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Registered> {
        self.functions.get(name)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// Turns a function's returned error into the text stored with its memoized outcome.
pub fn error_text<E: fmt::Display>(error: E) -> String {
    error.to_string()
}

/// Encodes typed arguments for [`crate::Request::new`].
pub fn encode_args<F: Function>(args: &F::Args) -> Result<Bytes, CallError> {
    codec::encode_canonical(args).map_err(|message| CallError::BadArguments { function: F::NAME.to_owned(), message })
}
