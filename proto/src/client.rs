use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::{
    read_frame, write_frame, FrameError, Outcome, ProtoError, Reply, Request, RequestEnvelope,
    ResponseEnvelope, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

/// Why a call to the daemon failed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no doved is listening on {0}: start it (`systemctl start doved`, or run `doved`) or point --socket / DOVE_SOCKET at the socket it serves")]
    NotRunning(PathBuf),
    #[error("permission denied connecting to {0}: the socket admits root (and the group set as socket_group in doved.toml); run as root")]
    PermissionDenied(PathBuf),
    #[error("doved on {path} did not answer within {timeout:?}: it may be overloaded or stuck; check its log (`journalctl -u doved`)")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("doved on {path} accepted no connection within {timeout:?} (its queue is full): it may be stopped or stuck; check its log (`journalctl -u doved`)")]
    QueueFull { path: PathBuf, timeout: Duration },
    #[error("talking to doved on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("doved on {path} closed the connection before replying: it may have crashed or been restarted; check its log (`journalctl -u doved`)")]
    Closed { path: PathBuf },
    #[error("doved on {path} sent a malformed reply ({detail}): are dovectl/dove-hook and doved from the same release?")]
    Protocol { path: PathBuf, detail: String },
    #[error("doved refused the request: {0}")]
    Daemon(ProtoError),
}

/// A blocking connection to `doved`. Every operation, the connect included, is bounded:
/// by a timeout each, or by one deadline for all of them.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    deadline: Option<Instant>,
}

/// How often a connect to a daemon whose accept queue is full is retried.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

impl Client {
    /// Connect with `timeout` for the connect and for each later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let mut client = Self::connect_until(path, Instant::now() + timeout)?;
        client.deadline = None;
        client.timeout = timeout;
        Ok(client)
    }

    /// Connect, and bound this connection's every operation by one `deadline`.
    ///
    /// The connect is non-blocking: a daemon that stops accepting (stopped, stuck) fills
    /// its accept queue, and a blocking `connect` on a Unix socket then waits for ever.
    pub fn connect_until(path: &Path, deadline: Instant) -> Result<Self, ClientError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let io_err = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_err(e.into()))?;
        loop {
            match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                // The listener's backlog is full (Unix sockets never say EINPROGRESS).
                Err(Errno::EAGAIN) if Instant::now() + CONNECT_RETRY < deadline => {
                    std::thread::sleep(CONNECT_RETRY)
                }
                Err(Errno::EAGAIN) => {
                    return Err(ClientError::QueueFull {
                        path: path.to_owned(),
                        timeout,
                    })
                }
                Err(Errno::ENOENT | Errno::ECONNREFUSED) => {
                    return Err(ClientError::NotRunning(path.to_owned()))
                }
                Err(Errno::EACCES | Errno::EPERM) => {
                    return Err(ClientError::PermissionDenied(path.to_owned()))
                }
                Err(e) => return Err(io_err(e.into())),
            }
        }
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(false).map_err(io_err)?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            timeout,
            deadline: Some(deadline),
        })
    }

    /// Arm the socket's timeouts for the next operation: what is left of the deadline,
    /// or the per-operation timeout.
    fn arm(&mut self) -> Result<(), ClientError> {
        let left = match self.deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => self.timeout,
        };
        if left.is_zero() {
            return Err(ClientError::Timeout {
                path: self.path.clone(),
                timeout: self.timeout,
            });
        }
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        self.stream.set_read_timeout(Some(left)).map_err(io_err)?;
        self.stream.set_write_timeout(Some(left)).map_err(io_err)?;
        Ok(())
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let payload = serde_json::to_vec(&RequestEnvelope::new(request))
            .map_err(|e| self.protocol(format!("encoding request: {e}")))?;
        self.arm()?;
        let written = write_frame(&mut self.stream, &payload);
        self.arm()?;
        // A daemon that refuses us (e.g. an unauthorised peer) replies and closes without
        // reading; its reply is still ours to read even though our write failed.
        let reply =
            read_frame(&mut self.stream, MAX_FRAME_BYTES).map_err(|read_err| match written {
                Err(write_err) => self.frame_error(write_err),
                Ok(()) => self.frame_error(read_err),
            })?;
        let envelope: ResponseEnvelope = serde_json::from_slice(&reply)
            .map_err(|e| self.protocol(format!("undecodable JSON: {e}")))?;
        if envelope.version != PROTOCOL_VERSION {
            return Err(self.protocol(format!(
                "protocol version {} where {PROTOCOL_VERSION} was expected",
                envelope.version
            )));
        }
        match envelope.outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Error(e) => Err(ClientError::Daemon(e)),
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    fn frame_error(&self, e: FrameError) -> ClientError {
        match e {
            FrameError::Closed | FrameError::Truncated { .. } => ClientError::Closed {
                path: self.path.clone(),
            },
            FrameError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::Timeout {
                    path: self.path.clone(),
                    timeout: self.timeout,
                }
            }
            FrameError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                ClientError::Closed {
                    path: self.path.clone(),
                }
            }
            FrameError::Io(source) => ClientError::Io {
                path: self.path.clone(),
                source,
            },
            other => self.protocol(other.to_string()),
        }
    }
}
