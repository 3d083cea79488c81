//! The site's listener: every request knows its client's address ([`ClientAddr`], for the
//! login back-off), and every connection ends with a *lingering close*.
//!
//! Why lingering: when the server closes a connection whose request it did not read to the end
//! — an upload refused with 413 by its `Content-Length`, or cut off at the limit, a bad key
//! answered before the body — the kernel answers the unread bytes with a reset (RST), and a
//! reset that reaches the client before it read the response destroys that response in the
//! client's receive buffer: curl prints "Connection reset by peer", Python's `requests` and
//! `urllib` raise `ConnectionResetError` or `BrokenPipeError`, a browser shows a network error,
//! and nobody reads the 413 that says what to fix. So the site closes the way Apache and nginx
//! do: after the response it shuts its sending half (FIN), then reads and discards whatever the
//! client still sends — until the client closes, at most [`LINGER_BYTES`], at most
//! [`LINGER_TIME`], and no longer than [`LINGER_IDLE`] of silence — and only then closes the
//! socket. A client that sends `Expect: 100-continue` (curl, for bodies over 1 MiB) never sends
//! the refused body at all: the refusal comes before the `100 Continue` it waits for.
//!
//! hyper calls `poll_shutdown` on the connection's I/O when it ends a connection it served, so
//! the linger lives there, under hyper, for every route at once. A connection the client
//! closes first reads its end of file at once and costs nothing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// Most bytes read and discarded after a response before the socket is closed anyway: a body
/// refused by its length is read this far, so a refused upload of up to this size (beyond what
/// the route itself read) still gets its answer read by clients that send before they read.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// Longest a connection lingers after its response.
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest the client may stay silent while the connection lingers. A client still sending a
/// refused body is not silent; an idle one that does not close when the server does (a
/// keep-alive connection the server drops at shutdown, held by a client that does not read)
/// holds the connection this long, which a server stopping waits for: hence short.
pub const LINGER_IDLE: Duration = Duration::from_secs(2);

/// The address of the peer of a request's connection (for `ConnectInfo<ClientAddr>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, SiteListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, SiteListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// A TCP listener whose connections close lingering (see the module's documentation). Serve
/// it with `router.into_make_service_with_connect_info::<ClientAddr>()`.
#[derive(Debug)]
pub struct SiteListener {
    inner: TcpListener,
}

impl SiteListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener) -> SiteListener {
        SiteListener { inner }
    }
}

impl Listener for SiteListener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Lingering, SocketAddr) {
        let (stream, addr) = Listener::accept(&mut self.inner).await;
        // Responses are written whole by hyper; Nagle's delay would only hold back their end.
        let _ = stream.set_nodelay(true);
        (Lingering::new(stream), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream whose shutdown lingers: FIN, then discard what the client still sends, within
/// the bounds, then done.
#[derive(Debug)]
pub struct Lingering {
    stream: TcpStream,
    limits: Limits,
    linger: Option<Linger>,
}

/// How long and how far a connection lingers.
#[derive(Clone, Copy, Debug)]
struct Limits {
    bytes: usize,
    time: Duration,
    idle: Duration,
}

const LIMITS: Limits = Limits {
    bytes: LINGER_BYTES,
    time: LINGER_TIME,
    idle: LINGER_IDLE,
};

#[derive(Debug)]
struct Linger {
    deadline: Pin<Box<Sleep>>,
    idle: Pin<Box<Sleep>>,
    left: usize,
    done: bool,
}

impl Lingering {
    fn new(stream: TcpStream) -> Lingering {
        Lingering::with_limits(stream, LIMITS)
    }

    fn with_limits(stream: TcpStream, limits: Limits) -> Lingering {
        Lingering {
            stream,
            limits,
            linger: None,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            // Everything written is sent, then the FIN: the client reads the whole response
            // and its end.
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            let now = Instant::now();
            this.linger = Some(Linger {
                deadline: Box::pin(tokio::time::sleep_until(now + this.limits.time)),
                idle: Box::pin(tokio::time::sleep_until(now + this.limits.idle)),
                left: this.limits.bytes,
                done: false,
            });
        }
        let Some(linger) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        while !linger.done {
            if linger.left == 0
                || linger.deadline.as_mut().poll(cx).is_ready()
                || linger.idle.as_mut().poll(cx).is_ready()
            {
                linger.done = true;
                break;
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The client's end of file, or an error: nothing more to wait for.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => linger.done = true,
                Poll::Ready(Err(_)) => linger.done = true,
                Poll::Ready(Ok(())) => {
                    linger.left = linger.left.saturating_sub(buf.filled().len());
                    linger
                        .idle
                        .as_mut()
                        .reset(Instant::now() + this.limits.idle);
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn pair() -> (Lingering, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Lingering::new(server), client)
    }

    #[tokio::test]
    async fn shutdown_sends_the_end_then_discards_until_the_client_closes() {
        let (mut server, mut client) = pair().await;
        server.write_all(b"HTTP/1.1 413 ...").await.unwrap();
        // Unread request bytes wait in the server's buffer, as a refused body's do.
        client.write_all(&[7u8; 100_000]).await.unwrap();
        let shutdown = tokio::spawn(async move {
            server.shutdown().await.unwrap();
            server
        });
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(
            answer, b"HTTP/1.1 413 ...",
            "the answer, then the server's end"
        );
        // The client may still send: the lingering server reads it, no reset.
        client.write_all(&[8u8; 100_000]).await.unwrap();
        drop(client);
        let server = tokio::time::timeout(LINGER_IDLE, shutdown)
            .await
            .expect("the linger ends at the client's end of file")
            .unwrap();
        assert!(server.linger.as_ref().is_some_and(|l| l.done));
        assert_eq!(
            server.linger.as_ref().map(|l| l.left),
            Some(LINGER_BYTES - 200_000)
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_given_up_on_after_the_idle_limit() {
        let (server, _client) = pair().await;
        let idle = Duration::from_millis(100);
        let mut server = Lingering::with_limits(server.stream, Limits { idle, ..LIMITS });
        let started = Instant::now();
        server.shutdown().await.unwrap();
        assert!(started.elapsed() >= idle);
        assert!(started.elapsed() < LINGER_IDLE, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_is_cut_off_at_the_byte_limit() {
        let (server, mut client) = pair().await;
        let mut server = Lingering::with_limits(
            server.stream,
            Limits {
                bytes: 1 << 20,
                ..LIMITS
            },
        );
        let sender = tokio::spawn(async move {
            let block = vec![1u8; 64 * 1024];
            // Sends until the server closes under it (a reset, or a broken pipe).
            while client.write_all(&block).await.is_ok() {}
        });
        tokio::time::timeout(LINGER_IDLE, server.shutdown())
            .await
            .expect("the linger ends at the byte limit")
            .unwrap();
        assert_eq!(server.linger.as_ref().map(|l| l.left), Some(0));
        drop(server);
        tokio::time::timeout(LINGER_IDLE, sender)
            .await
            .expect("the sender sees the close")
            .unwrap();
    }
}
