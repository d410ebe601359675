//! Many calls at once: [`Client::map`] (results as they complete), [`Client::map_ordered`]
//! and [`Client::gather`] (in input order), at most `concurrency` calls in flight.
//!
//! Each input is a call of its own: identical inputs are computed once, each result is
//! memoized, and dropping the stream withdraws every call still in flight (so their
//! evaluations stop unless another caller waits for them).

use std::sync::Arc;

use futures::stream::{BoxStream, Stream, StreamExt};

use crate::error::CallError;
use crate::grid::client::{call, Client};
use crate::grid::function::Function;

/// Most calls one map keeps in flight at once, whatever it asks for.
pub const MAP_CONCURRENCY_MAX: usize = 4_096;

fn bounded(concurrency: usize) -> usize {
    concurrency.clamp(1, MAP_CONCURRENCY_MAX)
}

impl Client {
    /// Calls `F` once per input, at most `concurrency` (1 to [`MAP_CONCURRENCY_MAX`]) at
    /// once, and yields `(index of the input, result)` as each completes. Inputs are
    /// taken from the iterator only as slots free up, so it may be long or endless.
    pub fn map<F, I>(&self, inputs: I, concurrency: usize) -> impl Stream<Item = (usize, Result<F::Output, CallError>)>
    where
        F: Function,
        I: IntoIterator<Item = F::Args>,
        I::IntoIter: Send + 'static,
    {
        let client = self.clone();
        futures::stream::iter(inputs.into_iter().enumerate())
            .map(move |(index, args)| {
                let client = client.clone();
                async move { (index, call::<F, Client>(&client, args).await) }
            })
            .buffer_unordered(bounded(concurrency))
    }

    /// [`Client::map`] with results in input order: a result waits for those of earlier
    /// inputs (at most `concurrency` calls are in flight or waiting).
    pub fn map_ordered<F, I>(&self, inputs: I, concurrency: usize) -> impl Stream<Item = Result<F::Output, CallError>>
    where
        F: Function,
        I: IntoIterator<Item = F::Args>,
        I::IntoIter: Send + 'static,
    {
        let client = self.clone();
        futures::stream::iter(inputs)
            .map(move |args| {
                let client = client.clone();
                async move { call::<F, Client>(&client, args).await }
            })
            .buffered(bounded(concurrency))
    }

    /// Calls `F` once per input, at most `concurrency` at once, and returns every result
    /// in input order.
    pub async fn gather<F, I>(&self, inputs: I, concurrency: usize) -> Vec<Result<F::Output, CallError>>
    where
        F: Function,
        I: IntoIterator<Item = F::Args>,
        I::IntoIter: Send + 'static,
    {
        self.map_ordered::<F, I>(inputs, concurrency).collect().await
    }

    /// [`Client::map`] of the function `name` (of `version`) with JSON argument arrays,
    /// in completion order or, when `ordered`, in input order.
    pub(crate) fn map_json(
        &self,
        name: Arc<str>,
        version: u32,
        inputs: Vec<serde_json::Value>,
        concurrency: usize,
        ordered: bool,
    ) -> BoxStream<'static, (usize, Result<serde_json::Value, CallError>)> {
        let client = self.clone();
        let calls = futures::stream::iter(inputs.into_iter().enumerate()).map(move |(index, args)| {
            let (client, name) = (client.clone(), name.clone());
            async move { (index, client.call_json_version(&name, version, &args).await) }
        });
        if ordered {
            calls.buffered(bounded(concurrency)).boxed()
        } else {
            calls.buffer_unordered(bounded(concurrency)).boxed()
        }
    }
}
