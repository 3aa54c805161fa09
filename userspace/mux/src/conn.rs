//! One transport carrying a session: its reader, its writer and its
//! keepalive, until it fails. The session outlives it (resume).
use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_proto::{data_frame, decode, Frame, HEADER_LEN};

use crate::{session::Shared, transport::BoxIo};

/// How a transport ended.
pub(crate) enum Ended {
    /// It failed or was cut: resume on another one.
    Lost(io::Error),
    /// It wrote [`crate::Config::rekey_records`] TLS records: resume on a
    /// new one, with new keys.
    Rekey(u64),
    /// The peer broke the protocol: the session is over.
    Protocol(String),
    /// The session was closed by either side.
    Closed,
}

/// How often acknowledgements are flushed when little arrives.
const ACK_INTERVAL: Duration = Duration::from_millis(50);

/// Runs `io` for `shared` until it ends. `peer_received` is how many of our
/// reliable bytes the peer has (from the handshake): replay starts there.
/// `leftover` holds bytes read past the handshake.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    io: BoxIo,
    peer_received: u64,
    leftover: BytesMut,
) -> Ended {
    let replay = match shared.lock().resume_from(peer_received) {
        Ok(replay) => replay,
        Err(e) => return Ended::Protocol(e),
    };
    let config = &shared.config;
    shared.lock().kernel_tls = crate::transport::is_kernel_tls(&*io);
    let (mut rd, mut wr) = tokio::io::split(io);
    let start = Instant::now();
    let last_rx = AtomicU64::new(0);

    let reader = async {
        let mut buf = leftover;
        loop {
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
            // Frames already in the buffer first (the handshake's leftover).
            let mut wake = false;
            {
                let mut inner = shared.lock();
                loop {
                    if let Some((stream, total)) = data_frame(&buf) {
                        let frame = buf.split_to(total).freeze();
                        inner.recv_seq += total as u64;
                        match inner.on_data(stream, frame.slice(HEADER_LEN..)) {
                            Ok(w) => wake |= w,
                            Err(e) => return Ended::Protocol(e),
                        }
                        continue;
                    }
                    match decode(&buf) {
                        Ok(Some((frame, used))) => {
                            let _ = buf.split_to(used);
                            if frame.is_reliable() {
                                inner.recv_seq += used as u64;
                            }
                            let go_away = matches!(frame, Frame::GoAway { .. });
                            match inner.on_frame(frame, config) {
                                Ok(w) => wake |= w,
                                Err(e) => return Ended::Protocol(e),
                            }
                            if go_away {
                                inner.end(
                                    tpbpf_proto::ResetReason::Aborted,
                                    "the tunnel peer closed the session".to_string(),
                                );
                                shared.closed.notify_waiters();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return Ended::Protocol(format!(
                                "the tunnel peer sent a malformed frame: {e}"
                            ))
                        }
                    }
                }
                wake |= inner.maybe_ack(false);
            }
            if wake {
                shared.write.notify_one();
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    return Ended::Lost(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the tunnel transport was closed by the peer",
                    ))
                }
                Ok(_) => last_rx.store(start.elapsed().as_millis() as u64, Ordering::Relaxed),
                Err(e) => return Ended::Lost(e),
            }
        }
    };

    let writer = async {
        let mut records = 0u64;
        for chunk in replay {
            if let Err(e) = write_counted(&mut wr, &chunk, &mut records).await {
                return Ended::Lost(e);
            }
        }
        loop {
            let out = shared.lock().take_output(config);
            let Some((unreliable, reliable)) = out else {
                if shared.lock().ended.is_some() {
                    let _ = wr.shutdown().await;
                    return Ended::Closed;
                }
                shared.write.notified().await;
                continue;
            };
            if !unreliable.is_empty() {
                if let Err(e) = write_counted(&mut wr, &unreliable, &mut records).await {
                    return Ended::Lost(e);
                }
            }
            if !reliable.is_empty() {
                if let Err(e) = write_counted(&mut wr, &reliable, &mut records).await {
                    return Ended::Lost(e);
                }
            }
            if records >= config.rekey_records {
                // What this batch wrote is kept for replay until the peer
                // acknowledges it: nothing is lost with the transport.
                let _ = wr.flush().await;
                return Ended::Rekey(records);
            }
        }
    };

    let ticker = async {
        let mut tick = tokio::time::interval(ACK_INTERVAL);
        // The first ping goes at once: the RTT is known from the start.
        let mut last_ping = Instant::now()
            .checked_sub(config.keepalive)
            .unwrap_or_else(Instant::now);
        let mut nonce = 0u64;
        loop {
            tick.tick().await;
            let mut wake = false;
            {
                let mut inner = shared.lock();
                wake |= inner.maybe_ack(true);
                if last_ping.elapsed() >= config.keepalive {
                    last_ping = Instant::now();
                    nonce += 1;
                    inner.ping_started = Some((nonce, Instant::now()));
                    inner.unreliable.push(Frame::Ping { nonce });
                    wake = true;
                }
            }
            if wake {
                shared.write.notify_one();
            }
            let idle = start.elapsed().as_millis() as u64 - last_rx.load(Ordering::Relaxed);
            if idle > config.keepalive_timeout.as_millis() as u64 {
                return Ended::Lost(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nothing received on the tunnel transport for {} ms (keepalive)",
                        idle
                    ),
                ));
            }
        }
    };

    let ended = tokio::select! {
        e = reader => e,
        e = writer => e,
        e = ticker => e,
    };
    let mut inner = shared.lock();
    inner.connected = false;
    shared.transport_ended.notify_waiters();
    match ended {
        Ended::Lost(_) if inner.ended.is_some() => Ended::Closed,
        e => e,
    }
}

/// TLS records one write can make at most: one per 16 KiB of plaintext,
/// one more for the remainder, one more for a record the kernel left open.
fn records_for(n: usize) -> u64 {
    2 + (n / (16 * 1024)) as u64
}

/// `write_all`, counting the TLS records it can have made into `records`.
async fn write_counted<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    records: &mut u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        let n = wr.write(buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *records += records_for(n);
        buf = &buf[n..];
    }
    Ok(())
}
