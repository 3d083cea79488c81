//! One TCP connection to a node, and the bounded pool that keeps a node's connections.
//!
//! The pool is `deadpool`'s managed pool rather than a hand-written one: it is the small,
//! well-kept crate for exactly this (a semaphore bounding the connections, a queue of idle
//! ones, a `recycle` hook run before an idle connection is handed out, and `Object::take` to
//! drop a connection instead of returning it), and it brings no runtime of its own (tokio's
//! `sync` only). bb8 does the same with more machinery (a background reaper, its own timeouts)
//! that a request-scoped timeout makes unnecessary. Timeouts are ours (`tokio::time::timeout`
//! around a whole request), so the pool is built without any and cannot fail to build.
//!
//! A connection is reused only if it is known to be in step with the node:
//! - `in_flight` is set when a request is written and cleared only when its whole reply has
//!   been read and nothing else is buffered. A request abandoned mid-way (its timeout fired,
//!   or the caller dropped the future) leaves it set, so `recycle` refuses the connection and
//!   a late reply can never be read as the answer to the next request.
//! - `recycle` also peeks at the socket without waiting: end of stream (the node closed it,
//!   e.g. it restarted or hit its idle timeout) or unsolicited bytes discard it.
//! - Any error discards it (the caller takes it out of the pool).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{Parsed, ReplyError};
use super::{ClientError, Result};

/// Bodies up to this size are copied behind the command line and sent with one write; larger
/// ones go out as a vectored write of line, body and terminator without a copy.
const INLINE_BODY: usize = 16 * 1024;

/// Initial (and retained) size of a connection's read buffer.
const READ_BUFFER: usize = 16 * 1024;

/// A read buffer grown past this (by a large value) is not kept once the reply is consumed.
const KEEP_BUFFER: usize = 1 << 20;

/// Opens and checks connections to one node for deadpool.
#[derive(Debug)]
pub(crate) struct Connector {
    pub addr: Arc<str>,
    pub connect_timeout: Duration,
}

impl Manager for Connector {
    type Type = Conn;
    type Error = ClientError;

    async fn create(&self) -> Result<Conn> {
        let connect = TcpStream::connect(&*self.addr);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    addr: self.addr.to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    addr: self.addr.to_string(),
                    op: "connect",
                    after: self.connect_timeout,
                });
            }
        };
        // Requests are single small writes answered before the next one: Nagle would only
        // add latency.
        stream
            .set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                addr: self.addr.to_string(),
                source,
            })?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            out: Vec::with_capacity(512),
            in_flight: false,
        })
    }

    async fn recycle(&self, conn: &mut Conn, _: &Metrics) -> RecycleResult<ClientError> {
        if conn.in_flight || !conn.buf.is_empty() {
            return Err(RecycleError::message(
                "a request on it was abandoned mid-reply",
            ));
        }
        let mut probe = [0u8; 1];
        match conn.stream.try_read(&mut probe) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Ok(0) => Err(RecycleError::message("closed by the node")),
            Ok(_) => Err(RecycleError::message(
                "the node sent bytes nobody asked for",
            )),
            Err(err) => Err(RecycleError::message(err.to_string())),
        }
    }
}

/// One connection: a socket, its read buffer, and whether a request is outstanding on it.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    in_flight: bool,
}

/// Why a round trip failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection was closed or reset before any byte of the reply came back: the node
    /// closed it while it sat idle in the pool, and the request was not executed by a node
    /// that closes only between batches. Worth one retry on a fresh connection.
    Closed(io::Error),
    /// Anything else.
    Failed(ClientError),
}

impl Conn {
    /// Sends one request (the line `encode` writes, then `body` and `\r\n` if given) and
    /// reads its reply with `parse`. Returns the parsed reply and the reply's bytes, which
    /// value replies slice without copying.
    pub(crate) async fn roundtrip<T>(
        &mut self,
        addr: &str,
        encode: &impl Fn(&mut Vec<u8>),
        body: Option<&[u8]>,
        parse: &impl Fn(&[u8]) -> Parsed<T>,
    ) -> std::result::Result<(T, Bytes), Failure> {
        let io_failure = |source: io::Error, replied: bool| {
            let closed = matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            );
            if closed && !replied {
                Failure::Closed(source)
            } else {
                Failure::Failed(ClientError::Io {
                    addr: addr.to_string(),
                    source,
                })
            }
        };
        self.in_flight = true;
        self.out.clear();
        encode(&mut self.out);
        let written = match body {
            Some(body) if body.len() > INLINE_BODY => {
                let mut parts = Buf::chain(&self.out[..], body).chain(&b"\r\n"[..]);
                self.stream.write_all_buf(&mut parts).await
            }
            Some(body) => {
                self.out.extend_from_slice(body);
                self.out.extend_from_slice(b"\r\n");
                self.stream.write_all(&self.out).await
            }
            None => self.stream.write_all(&self.out).await,
        };
        written.map_err(|err| io_failure(err, false))?;
        loop {
            let parsed = parse(&self.buf).map_err(|err| {
                Failure::Failed(match err {
                    ReplyError::Protocol(detail) => ClientError::Protocol {
                        addr: addr.to_string(),
                        detail,
                    },
                    ReplyError::Server(message) => ClientError::Server {
                        addr: addr.to_string(),
                        message,
                    },
                })
            })?;
            if let Some((reply, used)) = parsed {
                if used != self.buf.len() {
                    return Err(Failure::Failed(ClientError::Protocol {
                        addr: addr.to_string(),
                        detail: format!("{} bytes followed the reply", self.buf.len() - used),
                    }));
                }
                let frame = self.buf.split_to(used).freeze();
                if self.buf.capacity() > KEEP_BUFFER {
                    self.buf = BytesMut::with_capacity(READ_BUFFER);
                }
                self.in_flight = false;
                return Ok((reply, frame));
            }
            // Grow by doubling, so a large value arrives in O(log n) reallocations; the
            // parser has already bounded how much a reply may announce.
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(self.buf.len().max(READ_BUFFER));
            }
            let replied = !self.buf.is_empty();
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    let eof = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the node closed the connection",
                    );
                    return Err(io_failure(eof, replied));
                }
                Ok(_) => {}
                Err(err) => return Err(io_failure(err, replied)),
            }
        }
    }
}
