//! One end of a connection: the greeting, frames in and out without needless copies, and
//! a body sent under the peer's credits.
//!
//! Reading: frames land in one `BytesMut`; a chunk's payload is read straight into place
//! (never past its frame, so nothing has to be moved afterwards) and handed out frozen, and
//! the buffer's allocation is reused as soon as the consumer dropped the previous chunk.
//! Writing: small frames are queued and leave together; a chunk leaves at once, its header
//! and its payload in one vectored write.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::frame::{self, Codec, Head, Kind, HEADER_LEN};
use super::{Body, Compression, Counters, DataConfig, DataError, CHUNK_BYTES_MAX};

/// What a connection says first, both ways: the protocol's name and version, then the
/// window it grants and the largest chunk it takes (u32 little-endian each).
const MAGIC: &[u8; 6] = b"GRDP\x00\x02";
const HELLO_LEN: usize = 14;
/// Bytes read at once while waiting for a header: enough for many small frames.
const READ_AHEAD_BYTES: usize = 64 << 10;
/// Small frames are queued up to this many bytes before they are written.
const QUEUE_BYTES: usize = 64 << 10;
/// A receive buffer larger than this is let go when its connection goes idle.
const IDLE_BUFFER_BYTES: usize = 256 << 10;
/// Longest error message sent to a peer.
const ERROR_BYTES_MAX: usize = 4 << 10;

/// What the two ends of a connection agreed on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    /// Chunks this end lets the peer have in flight.
    pub(crate) window: u32,
    /// Chunks the peer lets this end have in flight.
    pub(crate) peer_window: u32,
    /// Largest chunk this end takes.
    pub(crate) chunk_max: usize,
    /// Largest chunk this end sends: the smaller of both ends' chunk sizes.
    pub(crate) send_chunk: usize,
    pub(crate) header_bytes_max: usize,
    pub(crate) frame_timeout: Duration,
}

impl Terms {
    /// Largest frame that may answer a request: a header, or an error.
    pub(crate) fn answer_max(&self) -> usize {
        self.header_bytes_max.max(ERROR_BYTES_MAX)
    }

    /// Largest frame that may come inside a body: a chunk, or an error.
    pub(crate) fn body_frame_max(&self) -> usize {
        self.chunk_max.max(ERROR_BYTES_MAX)
    }
}

/// A frame read and checked.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    /// For a request's header: how to compress the response body.
    pub(crate) reply: Compression,
    pub(crate) payload: Bytes,
}

/// One end of a data-plane connection.
pub(crate) struct Conn {
    reader: OwnedReadHalf,
    inbox: BytesMut,
    writer: OwnedWriteHalf,
    queue: Vec<u8>,
    /// Bytes the socket took so far: none means the peer cannot have seen anything.
    pub(crate) accepted: u64,
    /// The peer said goodbye (and read nothing of what this end sent since).
    goodbye: bool,
    codec: Codec,
    pub(crate) terms: Terms,
    counters: Arc<Counters>,
    /// Held while the connection is checked out of a client's pool.
    pub(crate) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.counters.conns_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    /// Greets the peer on `stream` and learns its terms, within `timeout`.
    pub(crate) async fn open(
        stream: TcpStream,
        config: &DataConfig,
        counters: Arc<Counters>,
        timeout: Duration,
    ) -> Result<Conn, DataError> {
        stream.set_nodelay(true).map_err(io)?;
        let (reader, writer) = stream.into_split();
        Counters::add(&counters.conns_open, 1);
        Counters::add(&counters.conns_opened, 1);
        let terms = Terms {
            window: config.window(),
            peer_window: 1,
            chunk_max: config.chunk(),
            send_chunk: config.chunk(),
            header_bytes_max: config.header_bytes_max,
            frame_timeout: Duration::from_millis(config.frame_timeout_ms),
        };
        let mut conn = Conn {
            reader,
            inbox: BytesMut::new(),
            writer,
            queue: Vec::new(),
            accepted: 0,
            goodbye: false,
            codec: Codec::default(),
            terms,
            counters,
            permit: None,
        };
        tokio::time::timeout(timeout, conn.greet())
            .await
            .map_err(|_| DataError::Timeout(format!("no greeting from the peer in {timeout:?}")))??;
        Ok(conn)
    }

    async fn greet(&mut self) -> Result<(), DataError> {
        let mut hello = [0u8; HELLO_LEN];
        hello[..6].copy_from_slice(MAGIC);
        hello[6..10].copy_from_slice(&self.terms.window.to_le_bytes());
        hello[10..14].copy_from_slice(&(self.terms.chunk_max as u32).to_le_bytes());
        // Both ends speak first; neither waits for the other to read.
        let (wrote, read) =
            tokio::join!(self.writer.write_all(&hello), fill(&mut self.reader, &mut self.inbox, HELLO_LEN, HELLO_LEN));
        wrote.map_err(io)?;
        read?;
        let theirs = self.inbox.split_to(HELLO_LEN);
        if theirs[..4] != MAGIC[..4] {
            return Err(DataError::Protocol("the peer is not a girder data plane".into()));
        }
        if theirs[4..6] != MAGIC[4..6] {
            return Err(DataError::Protocol(format!("the peer speaks data plane version {:?}", &theirs[4..6])));
        }
        let window = u32::from_le_bytes([theirs[6], theirs[7], theirs[8], theirs[9]]);
        let chunk = u32::from_le_bytes([theirs[10], theirs[11], theirs[12], theirs[13]]) as usize;
        if window == 0 || chunk == 0 || chunk > CHUNK_BYTES_MAX {
            return Err(DataError::Protocol(format!("the peer offers a window of {window} chunks of {chunk} bytes")));
        }
        self.terms.peer_window = window;
        self.terms.send_chunk = self.terms.send_chunk.min(chunk);
        Ok(())
    }

    /// Reads the next frame (its payload at most `raw_max` bytes) within the frame timeout.
    pub(crate) async fn read(&mut self, raw_max: usize) -> Result<Frame, DataError> {
        let timeout = self.terms.frame_timeout;
        tokio::time::timeout(timeout, self.read_frame(raw_max))
            .await
            .map_err(|_| DataError::Timeout(format!("the peer sent no frame in {timeout:?}")))?
    }

    async fn read_frame(&mut self, raw_max: usize) -> Result<Frame, DataError> {
        fill(&mut self.reader, &mut self.inbox, HEADER_LEN, READ_AHEAD_BYTES).await?;
        let header: [u8; HEADER_LEN] = self.inbox[..HEADER_LEN].try_into().map_err(|_| DataError::Closed)?;
        let head: Head = frame::parse_head(&header, raw_max)?;
        if head.kind == Kind::Goodbye {
            self.goodbye = true;
            return Err(DataError::Closed);
        }
        let len = HEADER_LEN + head.wire_len;
        // Exactly to the frame's end: what lies beyond would be in the way of reuse.
        fill(&mut self.reader, &mut self.inbox, len, len).await?;
        let mut wire = self.inbox.split_to(len);
        wire.advance(HEADER_LEN);
        frame::check(&head, &header, &wire)?;
        let payload = self.codec.unpack(&head, wire.freeze())?;
        Counters::add(&self.counters.wire_bytes_received, len);
        Counters::add(&self.counters.frames_received, 1);
        Ok(Frame { kind: head.kind, reply: head.reply, payload })
    }

    /// Waits until the peer sends something (`Ok(true)`), closes (`Ok(false)`), or `idle`
    /// passes (`Ok(false)`).
    pub(crate) async fn readable(&mut self, idle: Duration) -> Result<bool, DataError> {
        if !self.inbox.is_empty() {
            return Ok(true);
        }
        match tokio::time::timeout(idle, fill(&mut self.reader, &mut self.inbox, 1, READ_AHEAD_BYTES)).await {
            Ok(Ok(())) => Ok(true),
            Err(_) | Ok(Err(DataError::Closed)) => Ok(false),
            Ok(Err(err)) => Err(err),
        }
    }

    /// Whether the peer said goodbye before it read anything of this end's request: it
    /// did then not act on it. Looks at what already arrived, without waiting.
    pub(crate) fn said_goodbye(&mut self) -> bool {
        if !self.goodbye && self.inbox.len() < HEADER_LEN {
            let mut probe = [0u8; HEADER_LEN];
            let want = HEADER_LEN - self.inbox.len();
            if let Ok(read) = self.reader.try_read(&mut probe[..want]) {
                self.inbox.extend_from_slice(&probe[..read]);
            }
        }
        let header: Option<[u8; HEADER_LEN]> = self.inbox.get(..HEADER_LEN).and_then(|h| h.try_into().ok());
        let goodbye = header.is_some_and(|header| {
            frame::parse_head(&header, 0)
                .is_ok_and(|head| head.kind == Kind::Goodbye && frame::check(&head, &header, &[]).is_ok())
        });
        self.goodbye || goodbye
    }

    /// Tells the requester this idle connection closes (best effort).
    pub(crate) async fn say_goodbye(&mut self) {
        if self.send(Kind::Goodbye, &[], Compression::None).await.is_ok() {
            let _ = self.flush().await;
        }
    }

    /// Whether an idle connection is still usable: the peer sent nothing since (a close
    /// shows as the end of the stream, anything else would break the protocol).
    pub(crate) fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        self.inbox.is_empty()
            && matches!(self.reader.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Lets large buffers go while the connection is idle.
    pub(crate) fn idle(&mut self) {
        if self.inbox.is_empty() && self.inbox.capacity() > IDLE_BUFFER_BYTES {
            self.inbox = BytesMut::new();
        }
        self.codec.idle(IDLE_BUFFER_BYTES);
    }

    /// Sends a frame: a small one is queued until `flush` or the next large one.
    pub(crate) async fn send(&mut self, kind: Kind, payload: &[u8], compression: Compression) -> Result<(), DataError> {
        let (packing, reply) = match kind {
            Kind::Chunk => (compression, Compression::None),
            Kind::Header => (Compression::None, compression),
            _ => (Compression::None, Compression::None),
        };
        let (packing, wire) = self.codec.pack(packing, payload);
        let head = frame::encode_head(kind, packing, reply, wire, payload.len())?;
        let len = HEADER_LEN + wire.len();
        if self.queue.len() + len <= QUEUE_BYTES {
            self.queue.extend_from_slice(&head);
            self.queue.extend_from_slice(wire);
        } else {
            let parts = Buf::chain(Buf::chain(self.queue.as_slice(), &head[..]), wire);
            write_out(&mut self.writer, parts, &mut self.accepted, self.terms.frame_timeout).await?;
            self.queue.clear();
        }
        Counters::add(&self.counters.wire_bytes_sent, len);
        Counters::add(&self.counters.frames_sent, 1);
        if kind == Kind::Chunk {
            Counters::add(&self.counters.raw_bytes_sent, payload.len());
        }
        Ok(())
    }

    /// Writes whatever frames are queued.
    pub(crate) async fn flush(&mut self) -> Result<(), DataError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let result = write_out(&mut self.writer, self.queue.as_slice(), &mut self.accepted, self.terms.frame_timeout);
        let result = result.await;
        self.queue.clear();
        result
    }

    /// Sends an error frame (best effort: the connection closes after it anyway).
    pub(crate) async fn send_error(&mut self, why: &str) {
        let why = &why.as_bytes()[..why.len().min(ERROR_BYTES_MAX)];
        if self.send(Kind::Error, why, Compression::None).await.is_ok() {
            let _ = self.flush().await;
        }
    }

    /// Sends `body` under the peer's credits, then its end. With `answerable`, a frame
    /// other than a credit that arrives meanwhile is the peer's early answer (it did not
    /// read the whole body): the body stops there and the frame is returned; after a
    /// header, an end frame tells the peer where the body stopped, so the connection stays
    /// usable. Without, such a frame breaks the protocol.
    pub(crate) async fn send_body(
        &mut self,
        mut body: Body,
        compression: Compression,
        answerable: bool,
    ) -> Result<Option<Frame>, DataError> {
        let mut credits = self.terms.peer_window;
        while let Some(chunk) = body.produce().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(err) => {
                    self.send_error(&format!("the body's producer failed: {err}")).await;
                    return Err(err);
                }
            };
            for piece in chunk.chunks(self.terms.send_chunk) {
                while credits == 0 {
                    self.flush().await?;
                    let frame = self.read(self.terms.answer_max()).await?;
                    match frame.kind {
                        Kind::Credit => credits = credits.saturating_add(credit_of(&frame.payload)?),
                        Kind::Header if answerable => {
                            self.send(Kind::End, &[], Compression::None).await?;
                            self.flush().await?;
                            return Ok(Some(frame));
                        }
                        Kind::Error if answerable => return Ok(Some(frame)),
                        other => return Err(DataError::Protocol(format!("a {other:?} frame while sending a body"))),
                    }
                }
                self.send(Kind::Chunk, piece, compression).await?;
                credits -= 1;
            }
        }
        self.send(Kind::End, &[], Compression::None).await?;
        self.flush().await?;
        Ok(None)
    }

    /// Reads and discards what is left of a body the consumer dropped, up to its end.
    pub(crate) async fn discard_body(&mut self) -> Result<(), DataError> {
        loop {
            match self.read(self.terms.body_frame_max()).await?.kind {
                Kind::Chunk | Kind::Credit => {}
                Kind::End => return Ok(()),
                other => return Err(DataError::Protocol(format!("a {other:?} frame inside a body"))),
            }
        }
    }

    pub(crate) fn count_received(&self, raw_bytes: usize) {
        Counters::add(&self.counters.raw_bytes_received, raw_bytes);
    }
}

pub(crate) fn credit_of(payload: &[u8]) -> Result<u32, DataError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| DataError::Protocol("a malformed credit frame".into()))?;
    Ok(u32::from_le_bytes(bytes))
}

/// Reads until `inbox` holds at least `want` bytes, never more than `upto` in all.
async fn fill(reader: &mut OwnedReadHalf, inbox: &mut BytesMut, want: usize, upto: usize) -> Result<(), DataError> {
    while inbox.len() < want {
        let room = upto.max(want) - inbox.len();
        // Reuses the allocation when the chunks handed out from it were dropped.
        inbox.reserve(room);
        let read = reader.read_buf(&mut (&mut *inbox).limit(room)).await.map_err(io)?;
        if read == 0 {
            return Err(DataError::Closed);
        }
    }
    Ok(())
}

/// Writes `parts` whole (vectored), counting what the socket took, within `timeout`.
async fn write_out(
    writer: &mut OwnedWriteHalf,
    mut parts: impl Buf,
    accepted: &mut u64,
    timeout: Duration,
) -> Result<(), DataError> {
    let total = parts.remaining();
    let result = tokio::time::timeout(timeout, writer.write_all_buf(&mut parts)).await;
    *accepted += (total - parts.remaining()) as u64;
    match result {
        Ok(written) => written.map_err(io),
        Err(_) => Err(DataError::Timeout(format!("the peer took nothing for {timeout:?}"))),
    }
}

pub(crate) fn io(err: std::io::Error) -> DataError {
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => DataError::Closed,
        _ => DataError::Io(err.to_string()),
    }
}
