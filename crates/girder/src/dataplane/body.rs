//! Bodies: chunks of bytes produced by a sender's source, or read off a connection while
//! credits go back to the sender as the consumer takes them.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;

use super::conn::{Conn, Frame};
use super::frame::Kind;
use super::{Compression, DataError};

/// Where a received body's connection goes once the body was read to its end (`true`) or
/// dropped before (`false`: the rest of the body is still to come). A broken body's
/// connection is closed instead.
pub(crate) type Return = Box<dyn FnOnce(Conn, bool) + Send>;

/// A body arriving on a connection.
pub(crate) struct Incoming {
    conn: Option<Conn>,
    /// Chunks taken since credits were last granted.
    taken: u32,
    back: Option<Return>,
}

impl Incoming {
    pub(crate) fn new(conn: Conn, back: Return) -> Incoming {
        Incoming { conn: Some(conn), taken: 0, back: Some(back) }
    }

    async fn next(&mut self) -> Option<Result<Bytes, DataError>> {
        let conn = self.conn.as_mut()?;
        match Self::take(conn, &mut self.taken).await {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => {
                self.give_back(true);
                None
            }
            Err(err) => {
                // A broken body leaves its connection in an unknown state: it closes, and
                // whoever waits for it back learns so by not getting it.
                self.conn = None;
                self.back = None;
                Some(Err(err))
            }
        }
    }

    async fn take(conn: &mut Conn, taken: &mut u32) -> Result<Option<Bytes>, DataError> {
        // Credits go back in batches of half a window, so that the sender is never short of
        // credits while the consumer keeps up, without a frame per chunk.
        if *taken >= (conn.terms.window / 2).max(1) {
            conn.send(Kind::Credit, &taken.to_le_bytes(), Compression::None).await?;
            conn.flush().await?;
            *taken = 0;
        }
        let Frame { kind, payload, .. } = conn.read(conn.terms.body_frame_max()).await?;
        match kind {
            Kind::Chunk => {
                conn.count_received(payload.len());
                *taken += 1;
                Ok(Some(payload))
            }
            Kind::End => Ok(None),
            Kind::Error => Err(DataError::Remote(String::from_utf8_lossy(&payload).into_owned())),
            other => Err(DataError::Protocol(format!("a {other:?} frame inside a body"))),
        }
    }

    fn give_back(&mut self, finished: bool) {
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take()) {
            back(conn, finished);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.give_back(false);
    }
}

enum Source {
    Empty,
    Bytes(Option<Bytes>),
    Stream(BoxStream<'static, Result<Bytes, DataError>>),
    Incoming(Box<Incoming>),
}

/// A body: chunks of bytes. An outgoing body is sent in frames of the data plane's chunk
/// size, produced only as the receiver's credits allow; an incoming one is read as its
/// consumer takes chunks, so at most a window of chunks waits for it.
pub struct Body(Source);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.0 {
            Source::Empty => "empty",
            Source::Bytes(_) => "bytes",
            Source::Stream(_) => "stream",
            Source::Incoming(_) => "incoming",
        };
        f.debug_tuple("Body").field(&what).finish()
    }
}

impl Body {
    /// No bytes.
    pub fn empty() -> Body {
        Body(Source::Empty)
    }

    /// These bytes, sent in chunk-sized frames without copying them.
    pub fn from_bytes(bytes: Bytes) -> Body {
        Body(Source::Bytes(Some(bytes)))
    }

    /// The chunks `stream` yields, as it yields them: it is polled only as the receiver's
    /// credits allow (at most a window of chunks, and the one waiting for a credit, ahead
    /// of the receiver's consumer). An error ends the transfer (the peer sees it as
    /// [`DataError::Remote`]).
    pub fn from_stream(stream: impl Stream<Item = Result<Bytes, DataError>> + Send + 'static) -> Body {
        Body(Source::Stream(stream.boxed()))
    }

    pub(crate) fn incoming(incoming: Incoming) -> Body {
        Body(Source::Incoming(Box::new(incoming)))
    }

    /// The same body again, when it can be had without consuming this one (bytes in
    /// memory): for sending it once more.
    pub(crate) fn replay(&self) -> Option<Body> {
        match &self.0 {
            Source::Empty => Some(Body::empty()),
            Source::Bytes(bytes) => Some(Body(Source::Bytes(bytes.clone()))),
            Source::Stream(_) | Source::Incoming(_) => None,
        }
    }

    /// The next chunk as received (incoming) or produced (outgoing); `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Bytes, DataError>> {
        self.produce().await
    }

    pub(crate) async fn produce(&mut self) -> Option<Result<Bytes, DataError>> {
        match &mut self.0 {
            Source::Empty => None,
            Source::Bytes(bytes) => bytes.take().filter(|b| !b.is_empty()).map(Ok),
            Source::Stream(stream) => stream.next().await,
            Source::Incoming(incoming) => incoming.next().await,
        }
    }

    /// The whole body, refused with [`DataError::TooLarge`] as soon as it passes
    /// `bytes_max` (nothing past it is buffered; an incoming body's connection closes).
    pub async fn collect(mut self, bytes_max: usize) -> Result<Bytes, DataError> {
        if let Source::Bytes(bytes) = &mut self.0 {
            let bytes = bytes.take().unwrap_or_default();
            if bytes.len() > bytes_max {
                return Err(DataError::too_large("body", bytes.len(), bytes_max));
            }
            return Ok(bytes);
        }
        let mut first: Option<Bytes> = None;
        let mut all = bytes::BytesMut::new();
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            let total = all.len() + first.as_ref().map_or(0, Bytes::len) + chunk.len();
            if total > bytes_max {
                return Err(DataError::too_large("body", total, bytes_max));
            }
            // A body of one chunk is returned as it is, without a copy.
            match first.take() {
                None if all.is_empty() => first = Some(chunk),
                Some(previous) => {
                    all.extend_from_slice(&previous);
                    all.extend_from_slice(&chunk);
                }
                None => all.extend_from_slice(&chunk),
            }
        }
        Ok(first.unwrap_or_else(|| all.freeze()))
    }
}

/// Where a request body hands its connection back to the server that serves it.
pub(crate) type Slot = Arc<Mutex<Option<(Conn, bool)>>>;
