//! The abstraction every system under test plugs into, and the one
//! per-stream server behaviour they all share ([`serve_stream`]).
//!
//! A system is started by an async `start()` function returning
//! `anyhow::Result<Option<System>>` (`None`: not available in this build).
//! It runs a server on 127.0.0.1 whose streams are all handed to
//! [`serve_stream`], and an [`Opener`] that opens a new client stream to it.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A bidirectional tokio byte stream. Rust allows only one non-auto trait
/// in a trait object (`dyn AsyncRead + AsyncWrite` does not compile), hence
/// this trait; every `AsyncRead + AsyncWrite + Unpin + Send` type has it.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> AsyncStream for T {}

/// One bidirectional byte stream of any system, client or server side:
/// `Box::new(s)` for any `AsyncRead + AsyncWrite + Unpin + Send` `s`.
pub type BoxedStream = Box<dyn AsyncStream>;

/// What [`Opener::open`] returns.
pub type OpenFut = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>>;

/// Opens a new stream to the benchmark server of one system.
pub trait Opener: Send + Sync + 'static {
    /// Opens a new stream. The stream is ready for writing when this
    /// resolves; whether a round trip happened before is up to the system.
    fn open(&self) -> OpenFut;
}

/// One system under test, started: the opener plus whatever keeps its
/// server alive (dropping it stops it).
pub struct System {
    /// Short name shown in the output, e.g. `"yamux"`.
    pub name: &'static str,
    /// Opens client streams to this system's server.
    pub opener: Arc<dyn Opener>,
    /// Keeps the server (and client connection driver) alive; dropping it
    /// stops them. [`AbortOnDrop`] is a convenient thing to put here.
    pub guard: Box<dyn Any + Send>,
}

/// The future a [`Starter`] returns.
pub type StartFut = Pin<Box<dyn Future<Output = anyhow::Result<Option<System>>> + Send>>;

/// A named way to start one system; `start` resolving to `Ok(None)` means
/// the system is not built in and is reported as skipped.
pub struct Starter {
    /// Name used for skipped/failed systems (a started system reports
    /// [`System::name`]).
    pub name: &'static str,
    /// Starts the system.
    pub start: fn() -> StartFut,
    /// Settings worth reporting next to the numbers (window sizes, stream
    /// limits), as `(key, value)` pairs; may be empty.
    pub settings: fn() -> Vec<(&'static str, String)>,
}

/// Aborts the tasks it holds when dropped: a ready-made [`System::guard`].
#[derive(Default)]
pub struct AbortOnDrop(pub Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Command byte: echo everything back until EOF.
pub const CMD_ECHO: u8 = b'E';
/// Command byte: count bytes until EOF, answer the count as u64 big endian.
pub const CMD_SINK: u8 = b'S';
/// Command byte: answer `b'k'`, then idle until EOF.
pub const CMD_IDLE: u8 = b'I';
/// What the server answers to [`CMD_IDLE`].
pub const IDLE_REPLY: u8 = b'k';

/// Server streams currently inside [`serve_stream`] (all systems; systems
/// run one after the other, so this is the current system's).
static ACTIVE_SERVER_STREAMS: AtomicUsize = AtomicUsize::new(0);
/// Server streams that ended with an error since start.
static SERVER_STREAM_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Server streams currently being served.
pub fn active_server_streams() -> usize {
    ACTIVE_SERVER_STREAMS.load(Ordering::Relaxed)
}

/// Server streams that ended with an I/O error since the process started.
pub fn server_stream_errors() -> u64 {
    SERVER_STREAM_ERRORS.load(Ordering::Relaxed)
}

/// Counts a stream in [`ACTIVE_SERVER_STREAMS`] while alive.
struct ActiveGuard;

impl ActiveGuard {
    fn new() -> Self {
        ACTIVE_SERVER_STREAMS.fetch_add(1, Ordering::Relaxed);
        ActiveGuard
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE_SERVER_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Size of the buffer used by the echo and sink commands.
const IO_BUF: usize = 64 * 1024;

/// Serves one server-side stream: reads a 1-byte command, then
/// - [`CMD_ECHO`]: copies everything read back until EOF, then shuts down
///   the write side (reads and writes alternate: fine for the small echoes
///   of the benchmark, would stall a client that writes megabytes before
///   reading);
/// - [`CMD_SINK`]: reads until EOF counting bytes, writes the count as u64
///   big endian, then shuts down;
/// - [`CMD_IDLE`]: writes [`IDLE_REPLY`], waits for EOF, then shuts down.
///
/// A stream that ends before its command is fine (nothing to do). Errors are
/// returned; [`spawn_serve`] counts them.
pub async fn serve_stream(mut stream: BoxedStream) -> io::Result<()> {
    let _active = ActiveGuard::new();
    let mut cmd = [0u8; 1];
    if stream.read(&mut cmd).await? == 0 {
        return Ok(());
    }
    match cmd[0] {
        CMD_ECHO => {
            let mut buf = vec![0u8; IO_BUF];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
                stream.flush().await?;
            }
        }
        CMD_SINK => {
            let mut buf = vec![0u8; IO_BUF];
            let mut count: u64 = 0;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                count += n as u64;
            }
            stream.write_all(&count.to_be_bytes()).await?;
        }
        CMD_IDLE => {
            stream.write_all(&[IDLE_REPLY]).await?;
            stream.flush().await?;
            // Small on purpose: this future stays alive per idle stream.
            let mut buf = [0u8; 16];
            while stream.read(&mut buf).await? != 0 {}
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown command byte {other:#04x}"),
            ))
        }
    }
    stream.shutdown().await
}

/// Spawns [`serve_stream`] for one accepted stream, counting its error if
/// it fails (the benchmark reports the count per system).
pub fn spawn_serve(stream: BoxedStream) {
    tokio::spawn(async move {
        if serve_stream(stream).await.is_err() {
            SERVER_STREAM_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Counts a server-side failure that happened outside [`serve_stream`]
/// (e.g. a mux refusing to hand over a stream).
pub fn count_server_error() {
    SERVER_STREAM_ERRORS.fetch_add(1, Ordering::Relaxed);
}
