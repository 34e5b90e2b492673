//! NRI's connection multiplexing: every frame on the socket is an 8-byte header (the
//! connection ID and the payload's length, both big-endian `u32`) and the payload; the
//! payloads of one connection form its byte stream. Connection 1 carries the plugin's
//! server (the runtime calls `Configure`, `Synchronize` and the events on it), connection 2
//! the plugin's client of the runtime (`RegisterPlugin`, `UpdateContainers`). Frames for
//! another connection are dropped, as the runtime's own multiplexer does.
//!
//! Frames we send carry at most [`MAX_FRAME`] bytes: the Go runtime reads each connection
//! through a 4 KiB buffer, and its multiplexer refuses a read into a buffer smaller than
//! the frame.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// The connection on which the runtime calls the plugin.
pub const PLUGIN_CONN: u32 = 1;
/// The connection on which the plugin calls the runtime.
pub const RUNTIME_CONN: u32 = 2;
/// The largest payload a frame we send carries.
pub const MAX_FRAME: usize = 4096;
/// The largest payload we accept in a frame: the runtime's own limit.
pub const MAX_INCOMING_FRAME: usize = 16 << 20;
/// How much each connection buffers in either direction before its writer waits.
const CONN_BUFFER: usize = 64 << 10;

/// The two connections over `socket`: ([`PLUGIN_CONN`], [`RUNTIME_CONN`]), and a signal
/// that fires when the runtime's side of the socket is gone. Each connection is a byte
/// stream, ready for a ttrpc server or client. The multiplexer runs on the current tokio
/// runtime until the socket closes and both connections are dropped; a frame too large or
/// a broken socket ends it, and both connections then read end-of-file.
pub fn split<S>(
    socket: S,
) -> (
    DuplexStream,
    DuplexStream,
    tokio::sync::oneshot::Receiver<()>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let (plugin, plugin_far) = tokio::io::duplex(CONN_BUFFER);
    let (runtime, runtime_far) = tokio::io::duplex(CONN_BUFFER);
    let (socket_rx, socket_tx) = tokio::io::split(socket);
    let (plugin_rx, plugin_tx) = tokio::io::split(plugin_far);
    let (runtime_rx, runtime_tx) = tokio::io::split(runtime_far);
    tokio::spawn(async move {
        if let Err(e) = demultiplex(socket_rx, plugin_tx, runtime_tx).await {
            tracing::debug!("NRI socket, reading: {e}");
        }
        let _ = closed_tx.send(());
    });
    tokio::spawn(async move {
        if let Err(e) = multiplex(plugin_rx, runtime_rx, socket_tx).await {
            tracing::debug!("NRI socket, writing: {e}");
        }
    });
    (plugin, runtime, closed)
}

/// Socket → connections, until the socket ends or breaks; then each connection reads
/// end-of-file (a write half's drop would not say so: its read half lives on in
/// [`multiplex`]).
async fn demultiplex<R, W>(socket: R, mut plugin: W, mut runtime: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let result = route(socket, &mut plugin, &mut runtime).await;
    let _ = plugin.shutdown().await;
    let _ = runtime.shutdown().await;
    result
}

async fn route<R, W>(mut socket: R, plugin: &mut W, runtime: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; 8];
    let mut payload = Vec::new();
    loop {
        match socket.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let conn = u32::from_be_bytes(header[..4].try_into().unwrap());
        let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
        if len > MAX_INCOMING_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes for connection {conn} (the limit is {MAX_INCOMING_FRAME})"),
            ));
        }
        payload.resize(len, 0);
        socket.read_exact(&mut payload).await?;
        let target = match conn {
            PLUGIN_CONN => &mut *plugin,
            RUNTIME_CONN => &mut *runtime,
            _ => continue,
        };
        // A connection whose user is gone takes nothing more; the other goes on.
        let _ = target.write_all(&payload).await;
    }
}

/// Connections → socket, a frame per read of at most [`MAX_FRAME`] bytes, until both
/// connections are closed by their users.
async fn multiplex<R, W>(mut plugin: R, mut runtime: R, mut socket: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut plugin_buf, mut runtime_buf) = ([0u8; MAX_FRAME], [0u8; MAX_FRAME]);
    let (mut plugin_open, mut runtime_open) = (true, true);
    let mut frame = Vec::with_capacity(8 + MAX_FRAME);
    while plugin_open || runtime_open {
        // `read` is cancel-safe: the branch not taken loses nothing.
        let (conn, n) = tokio::select! {
            n = plugin.read(&mut plugin_buf), if plugin_open => (PLUGIN_CONN, n?),
            n = runtime.read(&mut runtime_buf), if runtime_open => (RUNTIME_CONN, n?),
        };
        if n == 0 {
            match conn {
                PLUGIN_CONN => plugin_open = false,
                _ => runtime_open = false,
            }
            continue;
        }
        let payload = if conn == PLUGIN_CONN {
            &plugin_buf[..n]
        } else {
            &runtime_buf[..n]
        };
        frame.clear();
        frame.extend_from_slice(&conn.to_be_bytes());
        frame.extend_from_slice(&(n as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        // One write per frame: header and payload never interleave with another frame.
        socket.write_all(&frame).await?;
    }
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    async fn frame(raw: &mut UnixStream, conn: u32, payload: &[u8]) {
        raw.write_all(&conn.to_be_bytes()).await.unwrap();
        raw.write_all(&(payload.len() as u32).to_be_bytes())
            .await
            .unwrap();
        raw.write_all(payload).await.unwrap();
    }

    async fn read_frame(raw: &mut UnixStream) -> Option<(u32, Vec<u8>)> {
        let mut header = [0u8; 8];
        raw.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        raw.read_exact(&mut payload).await.unwrap();
        Some((u32::from_be_bytes(header[..4].try_into().unwrap()), payload))
    }

    #[tokio::test]
    async fn frames_reach_their_connection_and_others_are_dropped() {
        let (ours, mut raw) = UnixStream::pair().unwrap();
        let (mut plugin, mut runtime, _closed) = split(ours);
        frame(&mut raw, RUNTIME_CONN, b"to the ").await;
        frame(&mut raw, PLUGIN_CONN, b"configure").await;
        frame(&mut raw, 7, b"nobody's").await;
        frame(&mut raw, RUNTIME_CONN, b"client").await;
        drop(raw);
        let mut got = String::new();
        plugin.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "configure");
        got.clear();
        runtime.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "to the client", "split across frames, joined in order");
    }

    #[tokio::test]
    async fn what_a_connection_writes_leaves_in_frames_of_at_most_4_kib() {
        let (ours, mut raw) = UnixStream::pair().unwrap();
        let (plugin, mut runtime, _closed) = split(ours);
        let message: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        runtime.write_all(&message).await.unwrap();
        drop((plugin, runtime));
        let mut received = Vec::new();
        while let Some((conn, payload)) = read_frame(&mut raw).await {
            assert_eq!(conn, RUNTIME_CONN);
            assert!(
                !payload.is_empty() && payload.len() <= MAX_FRAME,
                "{}",
                payload.len()
            );
            received.extend_from_slice(&payload);
        }
        assert_eq!(received, message, "every byte, in order, then end-of-file");
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_both_connections() {
        let (ours, mut raw) = UnixStream::pair().unwrap();
        let (mut plugin, mut runtime, _closed) = split(ours);
        raw.write_all(&PLUGIN_CONN.to_be_bytes()).await.unwrap();
        raw.write_all(&(MAX_INCOMING_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert_eq!(plugin.read_to_end(&mut buf).await.unwrap(), 0);
        assert_eq!(runtime.read_to_end(&mut buf).await.unwrap(), 0);
    }
}
