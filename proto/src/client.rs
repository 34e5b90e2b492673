use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[error("talking to doved on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("doved on {path} closed the connection before replying: it may have crashed or been restarted; check its log (`journalctl -u doved`)")]
    Closed { path: PathBuf },
    #[error("doved on {path} sent a malformed reply ({detail}): are dovectl/dove-hook and doved from the same release?")]
    Protocol { path: PathBuf, detail: String },
    #[error("doved refused the request: {0}")]
    Daemon(ProtoError),
}

/// A blocking connection to `doved`, bounded by a per-operation timeout.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(path.to_owned())
            }
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_owned()),
            _ => ClientError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
        let io_err = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            timeout,
        })
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let payload = serde_json::to_vec(&RequestEnvelope::new(request))
            .map_err(|e| self.protocol(format!("encoding request: {e}")))?;
        let written = write_frame(&mut self.stream, &payload);
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
