//! Errors a caller of the grid can get, and the statekeeper's own errors.

use serde::{Deserialize, Serialize};

/// Why a call did not produce a value. Every variant names the function, so a message read
/// in a log or on a terminal says what failed without more context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CallError {
    /// The function ran and returned an error. Under referential transparency this is the
    /// function's value for these arguments, so it is memoized like a success.
    #[error("{function} returned an error: {message}")]
    Function {
        /// The function's name.
        function: String,
        /// The error's `Display` text.
        message: String,
    },
    /// The function panicked. Never memoized: the next call runs it again.
    #[error("{function} panicked: {message}")]
    Panic {
        /// The function's name.
        function: String,
        /// The panic payload when it was a string.
        message: String,
    },
    /// No live node has the function registered.
    #[error("no live node has registered function {function}; register it on a node or check the name")]
    UnknownFunction {
        /// The requested name.
        function: String,
    },
    /// The arguments do not deserialize into the function's parameters.
    #[error("bad arguments for {function}: {message}")]
    BadArguments {
        /// The function's name.
        function: String,
        /// What the decoder said.
        message: String,
    },
    /// The function's result did not decode into the type the caller asked for.
    #[error("the result of {function} does not decode as the expected type: {message}")]
    BadResult {
        /// The function's name.
        function: String,
        /// What the decoder said.
        message: String,
    },
    /// The caller's deadline passed before the result arrived. The evaluation itself goes on
    /// and its result is memoized for later callers.
    #[error("deadline of {deadline_ms} ms passed while waiting for {function}")]
    DeadlineExceeded {
        /// The function's name.
        function: String,
        /// The deadline the caller set, in milliseconds from the call.
        deadline_ms: u64,
    },
    /// The statekeeper could not be reached or refused the operation.
    #[error("statekeeper error while calling {function}: {message}")]
    Statekeeper {
        /// The function's name.
        function: String,
        /// The statekeeper's message.
        message: String,
    },
    /// The node is shutting down and no longer takes or finishes calls.
    #[error("the node is shutting down; {function} was not completed")]
    Shutdown {
        /// The function's name.
        function: String,
    },
    /// The client belongs to a node that declared no pool, so the call has nowhere to go.
    #[error(
        "cannot call {function}: this node declared no pool; declare one (NodeBuilder::pool) or use Node::client_for"
    )]
    NoPool {
        /// The function's name.
        function: String,
    },
    /// A blocking call (`call_blocking`) was made on an async runtime's thread, where
    /// blocking would stall every task of that thread. Nothing was submitted.
    #[error(
        "{function} was called with call_blocking from async code; use `.call(..).await` there, \
         or run the blocking code in a blocking girder function or tokio::task::spawn_blocking"
    )]
    BlockingInAsync {
        /// The function's name.
        function: String,
    },
    /// The call tree went past one of its limits (see [`crate::Budget`]): it created more
    /// new requests, or nested deeper, than it may. Nothing more of it is submitted.
    #[error("{function} was refused: the call tree exceeded its {limit} limit of {max}")]
    BudgetExceeded {
        /// The function whose call was refused.
        function: String,
        /// Which limit: `requests` or `depth`.
        limit: String,
        /// The limit's value.
        max: u64,
    },
    /// Nobody waits for the call tree any more (its callers left, their deadlines passed, or
    /// it was cancelled): its evaluations are dropped and nothing of it is memoized.
    #[error("{function} was cancelled: no caller waits for its call tree any more")]
    Cancelled {
        /// The function's name.
        function: String,
    },
    /// The evaluation ran past its function's time limit on the node; the grid abandoned it
    /// (its result, should it still come, is discarded). Not memoized.
    #[error("{function} ran past its time limit of {limit_ms} ms and was abandoned")]
    TimeLimitExceeded {
        /// The function's name.
        function: String,
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// The nodes evaluating the request were lost (killed, or reaped after their lease)
    /// more often than the function's `retries` policy allows re-runs. Not memoized:
    /// calling again runs it again.
    #[error(
        "{function} was lost with its node {lost} time(s); its policy allows {retries} re-run(s) \
         (not memoized: calling again runs it again)"
    )]
    NodeLost {
        /// The function's name.
        function: String,
        /// How many times a node evaluating it was lost.
        lost: u32,
        /// The re-runs its policy allows.
        retries: u32,
    },
}

/// A short, stable name for each [`CallError`] variant: the `kind` field of HTTP errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`CallError::Function`].
    FunctionError,
    /// [`CallError::Panic`].
    Panic,
    /// [`CallError::UnknownFunction`].
    UnknownFunction,
    /// [`CallError::BadArguments`].
    BadArguments,
    /// [`CallError::BadResult`].
    BadResult,
    /// [`CallError::DeadlineExceeded`].
    DeadlineExceeded,
    /// [`CallError::Statekeeper`].
    Statekeeper,
    /// [`CallError::Shutdown`].
    Shutdown,
    /// [`CallError::BlockingInAsync`].
    BlockingInAsync,
    /// [`CallError::NoPool`].
    NoPool,
    /// [`CallError::BudgetExceeded`].
    BudgetExceeded,
    /// [`CallError::Cancelled`].
    Cancelled,
    /// [`CallError::TimeLimitExceeded`].
    TimeLimitExceeded,
    /// [`CallError::NodeLost`].
    NodeLost,
    /// A malformed HTTP request (not valid JSON, not an array): it never reached the grid.
    BadRequest,
    /// A cache key or structure that does not exist.
    NotFound,
    /// A key used as a kind of structure it does not hold.
    WrongKind,
    /// A value over the configured size limit.
    TooLarge,
    /// A request without the node's bearer token.
    Unauthorized,
    /// The node takes no more calls or connections now (its caps, or the caller's share);
    /// retry later.
    Overloaded,
    /// A write the store has no room for (its byte budget); it changed nothing.
    Full,
    /// A conditional write found another version.
    Conflict,
    /// Stored data failed its checksum on every copy reachable.
    Corrupt,
    /// The bucket store could not serve the request in time; retry later.
    Unavailable,
}

impl ErrorKind {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::FunctionError => "function_error",
            ErrorKind::Panic => "panic",
            ErrorKind::UnknownFunction => "unknown_function",
            ErrorKind::BadArguments => "bad_arguments",
            ErrorKind::BadResult => "bad_result",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Statekeeper => "statekeeper",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::BlockingInAsync => "blocking_in_async",
            ErrorKind::NoPool => "no_pool",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::TimeLimitExceeded => "time_limit_exceeded",
            ErrorKind::NodeLost => "node_lost",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::WrongKind => "wrong_kind",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Full => "full",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl CallError {
    /// The variant's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::Function { .. } => ErrorKind::FunctionError,
            CallError::Panic { .. } => ErrorKind::Panic,
            CallError::UnknownFunction { .. } => ErrorKind::UnknownFunction,
            CallError::BadArguments { .. } => ErrorKind::BadArguments,
            CallError::BadResult { .. } => ErrorKind::BadResult,
            CallError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            CallError::Statekeeper { .. } => ErrorKind::Statekeeper,
            CallError::Shutdown { .. } => ErrorKind::Shutdown,
            CallError::BlockingInAsync { .. } => ErrorKind::BlockingInAsync,
            CallError::NoPool { .. } => ErrorKind::NoPool,
            CallError::BudgetExceeded { .. } => ErrorKind::BudgetExceeded,
            CallError::Cancelled { .. } => ErrorKind::Cancelled,
            CallError::TimeLimitExceeded { .. } => ErrorKind::TimeLimitExceeded,
            CallError::NodeLost { .. } => ErrorKind::NodeLost,
        }
    }

    /// Whether this outcome is the function's value for its arguments and may be memoized.
    /// Only a returned error is; panics, bad arguments and infrastructure errors are not.
    pub fn is_memoizable(&self) -> bool {
        matches!(self, CallError::Function { .. })
    }

    pub(crate) fn statekeeper(function: &str, err: &StatekeeperError) -> CallError {
        CallError::Statekeeper { function: function.to_owned(), message: err.to_string() }
    }
}

/// An error from a statekeeper operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StatekeeperError {
    /// The backing store could not be reached; the operation may be retried.
    #[error("statekeeper unavailable: {0}")]
    Unavailable(String),
    /// The operation names a pool that was never declared.
    #[error("pool {0:?} is not declared; declare it before adding members or submitting to it")]
    UnknownPool(String),
    /// A value read back from the store did not decode; the store holds data girder did
    /// not write, or a different version wrote it.
    #[error("corrupt statekeeper data: {0}")]
    Corrupt(String),
    /// Too many requests are in flight; the submission was refused rather than queued
    /// without bound. Retry later or raise the limit.
    #[error("statekeeper overloaded: {0} requests already in flight")]
    Overloaded(usize),
    /// A node id is already registered by a live node.
    #[error("node id {0:?} is already in use by a live node; pick another id or stop that node")]
    DuplicateNode(String),
}
