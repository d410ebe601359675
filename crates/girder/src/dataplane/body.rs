//! Connections and bodies: sending a body under the receiver's credits, and receiving one
//! while granting credits as its consumer takes chunks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::frame::{self, Frame, Kind};
use super::{Compression, Counters, DataError};

/// Socket buffer sizes: large enough that a 1 MiB chunk goes out in few system calls.
const IO_BUFFER_BYTES: usize = 256 << 10;

/// One end of a data-plane connection, with what both ends agreed on.
pub(crate) struct Conn {
    pub(crate) reader: BufReader<OwnedReadHalf>,
    pub(crate) writer: BufWriter<OwnedWriteHalf>,
    /// Chunks the peer lets this end have in flight.
    pub(crate) peer_window: u32,
    /// Chunks this end lets the peer have in flight.
    pub(crate) window: u32,
    pub(crate) chunk_max: usize,
    pub(crate) frame_timeout: Duration,
    pub(crate) counters: Arc<Counters>,
    /// Held while the connection is checked out of a client's pool.
    pub(crate) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn {
    pub(crate) fn new(
        stream: tokio::net::TcpStream,
        limits: (u32, u32, usize, Duration),
        counters: Arc<Counters>,
    ) -> Conn {
        let (reader, writer) = stream.into_split();
        let (window, peer_window, chunk_max, frame_timeout) = limits;
        Conn {
            reader: BufReader::with_capacity(IO_BUFFER_BYTES, reader),
            writer: BufWriter::with_capacity(IO_BUFFER_BYTES, writer),
            peer_window,
            window,
            chunk_max,
            frame_timeout,
            counters,
            permit: None,
        }
    }

    /// Reads the next frame, within the frame timeout.
    pub(crate) async fn read(&mut self, raw_max: usize) -> Result<Frame, DataError> {
        let timeout = self.frame_timeout;
        let frame = tokio::time::timeout(timeout, frame::read(&mut self.reader, raw_max))
            .await
            .map_err(|_| DataError::Timeout(format!("no frame from the peer in {timeout:?}")))??;
        self.counters.wire_bytes_received.fetch_add(frame.wire_bytes as u64, Ordering::Relaxed);
        Ok(frame)
    }

    /// Writes one frame (buffered; `flush` sends).
    pub(crate) async fn write(
        &mut self,
        kind: Kind,
        payload: &[u8],
        compression: Compression,
    ) -> Result<(), DataError> {
        let wire = frame::write(&mut self.writer, kind, payload, compression).await?;
        self.counters.wire_bytes_sent.fetch_add(wire as u64, Ordering::Relaxed);
        if kind == Kind::Chunk {
            self.counters.raw_bytes_sent.fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), DataError> {
        let timeout = self.frame_timeout;
        tokio::time::timeout(timeout, self.writer.flush())
            .await
            .map_err(|_| DataError::Timeout(format!("the peer took nothing for {timeout:?}")))?
            .map_err(frame::io)
    }

    /// Sends `body` under the peer's credits, then its end. Returns a frame other than a
    /// credit that arrived meanwhile (the peer answered before reading the whole body): the
    /// caller takes it as the answer and must not reuse the connection.
    pub(crate) async fn send_body(
        &mut self,
        mut body: Body,
        compression: Compression,
    ) -> Result<Option<Frame>, DataError> {
        let mut credits = self.peer_window;
        let chunk_max = self.chunk_max;
        while let Some(chunk) = body.produce().await {
            let chunk = chunk?;
            for piece in chunk.chunks(chunk_max) {
                while credits == 0 {
                    self.flush().await?;
                    let frame = self.read(self.chunk_max).await?;
                    if frame.kind != Kind::Credit {
                        return Ok(Some(frame));
                    }
                    credits = credits.saturating_add(credit_of(&frame.payload)?);
                }
                self.write(Kind::Chunk, piece, compression).await?;
                credits -= 1;
            }
        }
        self.write(Kind::End, &[], Compression::None).await?;
        self.flush().await?;
        Ok(None)
    }
}

fn credit_of(payload: &[u8]) -> Result<u32, DataError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| DataError::Protocol("a malformed credit frame".into()))?;
    Ok(u32::from_le_bytes(bytes))
}

/// Where a received body's connection goes once the body was read (or dropped).
pub(crate) type Return = Box<dyn FnOnce(Conn, bool) + Send>;

/// A body arriving on a connection.
pub(crate) struct Incoming {
    conn: Option<Conn>,
    /// Chunks taken since the last credit was granted.
    taken: u32,
    finished: bool,
    back: Option<Return>,
}

impl Incoming {
    pub(crate) fn new(conn: Conn, back: Return) -> Incoming {
        Incoming { conn: Some(conn), taken: 0, finished: false, back: Some(back) }
    }

    async fn next(&mut self) -> Option<Result<Bytes, DataError>> {
        let conn = self.conn.as_mut()?;
        let result = async {
            // Credits go back in batches of half a window, so the sender never stalls on a
            // full window while the consumer keeps up.
            if self.taken >= (conn.window / 2).max(1) {
                conn.write(Kind::Credit, &self.taken.to_le_bytes(), Compression::None).await?;
                conn.flush().await?;
                self.taken = 0;
            }
            let frame = conn.read(conn.chunk_max).await?;
            match frame.kind {
                Kind::Chunk => {
                    conn.counters.raw_bytes_received.fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
                    self.taken += 1;
                    Ok(Some(frame.payload))
                }
                Kind::End => Ok(None),
                other => Err(DataError::Protocol(format!("a {other:?} frame inside a body"))),
            }
        }
        .await;
        match result {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => {
                self.finished = true;
                self.give_back();
                None
            }
            Err(err) => {
                // A broken body leaves the connection in an unknown state: close it.
                self.conn = None;
                self.back = None;
                Some(Err(err))
            }
        }
    }

    fn give_back(&mut self) {
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take()) {
            back(conn, self.finished);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.give_back();
    }
}

enum Source {
    Empty,
    Bytes(Option<Bytes>),
    Stream(BoxStream<'static, Result<Bytes, DataError>>),
    Incoming(Box<Incoming>),
}

/// A body: chunks of bytes. Outgoing bodies are sent in chunks of the data plane's chunk
/// size; incoming ones are read as they arrive, under credits.
pub struct Body(Source);

impl Body {
    /// No bytes.
    pub fn empty() -> Body {
        Body(Source::Empty)
    }

    /// These bytes (sent in chunks without copying them).
    pub fn from_bytes(bytes: Bytes) -> Body {
        Body(Source::Bytes(Some(bytes)))
    }

    /// The chunks `stream` yields, as it yields them (it is polled only as credits allow).
    pub fn from_stream(stream: impl Stream<Item = Result<Bytes, DataError>> + Send + 'static) -> Body {
        Body(Source::Stream(stream.boxed()))
    }

    pub(crate) fn incoming(incoming: Incoming) -> Body {
        Body(Source::Incoming(Box::new(incoming)))
    }

    /// The next chunk, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Bytes, DataError>> {
        self.produce().await
    }

    async fn produce(&mut self) -> Option<Result<Bytes, DataError>> {
        match &mut self.0 {
            Source::Empty => None,
            Source::Bytes(bytes) => bytes.take().filter(|b| !b.is_empty()).map(Ok),
            Source::Stream(stream) => stream.next().await,
            Source::Incoming(incoming) => incoming.next().await,
        }
    }

    /// The whole body, refused with [`DataError::TooLarge`] as soon as it passes
    /// `bytes_max` (nothing past it is buffered).
    pub async fn collect(mut self, bytes_max: usize) -> Result<Bytes, DataError> {
        if let Source::Bytes(bytes) = &mut self.0 {
            let bytes = bytes.take().unwrap_or_default();
            if bytes.len() > bytes_max {
                return Err(DataError::TooLarge(format!("a body over {bytes_max} bytes")));
            }
            return Ok(bytes);
        }
        let mut first: Option<Bytes> = None;
        let mut all = bytes::BytesMut::new();
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            let total = all.len() + first.as_ref().map_or(0, Bytes::len) + chunk.len();
            if total > bytes_max {
                return Err(DataError::TooLarge(format!("a body over {bytes_max} bytes")));
            }
            // One chunk is returned as it is, without a copy.
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

/// A connection handed back by a finished body, for the one waiting for it.
pub(crate) type Slot = Arc<Mutex<Option<(Conn, bool)>>>;
