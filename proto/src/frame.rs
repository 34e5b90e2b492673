use std::io::{self, Read, Write};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame: a frame must carry a JSON message")]
    Empty,
    #[error("connection closed before a complete frame arrived ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Prefix `payload` with its length.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and the payload with the
/// number of bytes consumed otherwise. The length is checked against `max` before any
/// payload is examined, so a huge declared length fails fast.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    check_frame_len(len, max)?;
    match buf.get(4..4 + len) {
        Some(payload) => Ok(Some((payload, 4 + len))),
        None => Ok(None),
    }
}

/// Check a frame's declared payload length against `max` (for async readers).
pub fn check_frame_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(())
}

/// Read one whole frame (blocking). Timeouts are the caller's socket settings.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < 4 {
        return Err(FrameError::Truncated { got, want: 4 });
    }
    let len = u32::from_be_bytes(header) as usize;
    check_frame_len(len, max)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Ok(payload)
}

/// Write `payload` as one frame with a single `write_all`, so a frame is never interleaved.
pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    w.write_all(&encode_frame(payload)?)?;
    w.flush()?;
    Ok(())
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let framed = encode_frame(b"{\"a\":1}").unwrap();
        let (payload, used) = decode_frame(&framed, 64).unwrap().unwrap();
        assert_eq!(payload, b"{\"a\":1}");
        assert_eq!(used, framed.len());
        let mut cursor = io::Cursor::new(framed);
        assert_eq!(read_frame(&mut cursor, 64).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn oversized_length_is_refused_before_reading_payload() {
        let mut cursor = io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
        match read_frame(&mut cursor, 1024) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_and_empty_frames() {
        let mut cursor = io::Cursor::new(vec![0, 0, 0, 10, b'{']);
        assert!(matches!(
            read_frame(&mut cursor, 64),
            Err(FrameError::Truncated { got: 1, want: 10 })
        ));
        let mut cursor = io::Cursor::new(vec![0, 0]);
        assert!(matches!(
            read_frame(&mut cursor, 64),
            Err(FrameError::Truncated { got: 2, want: 4 })
        ));
        let mut cursor = io::Cursor::new(vec![0, 0, 0, 0]);
        assert!(matches!(
            read_frame(&mut cursor, 64),
            Err(FrameError::Empty)
        ));
        let mut cursor = io::Cursor::new(Vec::new());
        assert!(matches!(
            read_frame(&mut cursor, 64),
            Err(FrameError::Closed)
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_respects_cap(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..32) {
            if let Ok(Some((payload, used))) = decode_frame(&buf, max) {
                prop_assert!(payload.len() <= max);
                prop_assert_eq!(used, payload.len() + 4);
            }
        }

        #[test]
        fn encode_decode_round_trip(payload in proptest::collection::vec(any::<u8>(), 1..512)) {
            let framed = encode_frame(&payload).unwrap();
            let (decoded, used) = decode_frame(&framed, 512).unwrap().unwrap();
            prop_assert_eq!(decoded, &payload[..]);
            prop_assert_eq!(used, framed.len());
        }
    }
}
