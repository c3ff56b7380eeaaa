//! A TCP proxy in front of PostgreSQL that counts what crosses the wire, so a test can
//! state how many round trips, statement parses and result rows one RPC costs. It
//! reads the PostgreSQL wire protocol (v3, no TLS) without changing a byte.
//!
//! A round trip is a wait on the server: a Sync (extended protocol) or a simple Query
//! sent while no earlier one on that connection is still unanswered. Statements
//! pipelined behind an unanswered one ride the same round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What crossed the wire so far, summed over every proxied connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireCounts {
    /// Waits on the server (see the module docs).
    pub round_trips: u64,
    /// Parse messages: statements the server had to parse (not reused).
    pub parses: u64,
    /// DataRow messages: result rows sent to the client.
    pub rows: u64,
}

impl std::ops::Sub for WireCounts {
    type Output = WireCounts;
    fn sub(self, rhs: WireCounts) -> WireCounts {
        WireCounts {
            round_trips: self.round_trips - rhs.round_trips,
            parses: self.parses - rhs.parses,
            rows: self.rows - rhs.rows,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    round_trips: AtomicU64,
    parses: AtomicU64,
    rows: AtomicU64,
}

/// A counting proxy listening on 127.0.0.1 port 0, forwarding to one PostgreSQL.
#[derive(Debug)]
pub struct CountingProxy {
    /// Where it listens.
    pub port: u16,
    /// A database URL through the proxy, when a test kit set one.
    pub database_url: String,
    counters: Arc<Counters>,
    handle: JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl CountingProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let handle = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, c).await;
                    }
                });
            }
        });
        Ok(CountingProxy {
            port,
            database_url: String::new(),
            counters,
            handle,
        })
    }

    /// The counts so far.
    pub fn counts(&self) -> WireCounts {
        WireCounts {
            round_trips: self.counters.round_trips.load(Ordering::SeqCst),
            parses: self.counters.parses.load(Ordering::SeqCst),
            rows: self.counters.rows.load(Ordering::SeqCst),
        }
    }
}

async fn relay(client: TcpStream, server: TcpStream, counters: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Requests sent and not yet answered by ReadyForQuery on this connection.
    let pending = Arc::new(AtomicI64::new(0));
    let p = pending.clone();
    let c = counters.clone();
    let up = async move {
        let mut parser = Parser::new(true);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Count before forwarding, so an answer can never be seen first.
            for kind in parser.feed(&buf[..n]) {
                match kind {
                    b'S' | b'Q' if p.fetch_add(1, Ordering::SeqCst) == 0 => {
                        c.round_trips.fetch_add(1, Ordering::SeqCst);
                    }
                    b'P' => {
                        c.parses.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let c = counters;
    let down = async move {
        let mut parser = Parser::new(false);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for kind in parser.feed(&buf[..n]) {
                match kind {
                    b'Z' => {
                        // The ReadyForQuery after start-up answers no request.
                        let _ = pending.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            Some((v - 1).max(0))
                        });
                    }
                    b'D' => {
                        c.rows.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Splits a byte stream into protocol messages and yields their type bytes.
struct Parser {
    /// The client's first message (start-up) has no type byte.
    untyped_first: bool,
    header: Vec<u8>,
    /// Body bytes of the current message still to skip.
    skip: usize,
}

impl Parser {
    fn new(client: bool) -> Parser {
        Parser {
            untyped_first: client,
            header: Vec::with_capacity(5),
            skip: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> Vec<u8> {
        let mut kinds = Vec::new();
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = if self.untyped_first { 4 } else { 5 };
            let n = (want - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < want {
                break;
            }
            let len_bytes = &self.header[want - 4..want];
            let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]])
                as usize;
            if !self.untyped_first {
                kinds.push(self.header[0]);
            }
            self.untyped_first = false;
            self.skip = len.saturating_sub(4);
            self.header.clear();
        }
        kinds
    }
}
