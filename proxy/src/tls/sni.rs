//! Reading a TLS ClientHello without terminating the connection: the server name decides
//! where a `tls_passthrough` listener sends the connection, and the bytes read are sent on
//! unchanged, so the client's TLS session is with the upstream.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A ClientHello larger than this is refused (real ones are well under 2 KiB; post-quantum
/// key shares push some toward 4 KiB).
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the client closed the connection before its ClientHello ended")]
    Eof,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// Read from `io` until a whole ClientHello has arrived. Returns every byte read (to be
/// replayed to the upstream) and the server name, if the client sent one.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<(Vec<u8>, Option<String>), HelloError> {
    let mut seen: Vec<u8> = Vec::with_capacity(2048);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        let chunk = buf.get(..n).unwrap_or_default();
        seen.extend_from_slice(chunk);
        if seen.len() > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        // The acceptor keeps what it was fed; give it only the new bytes.
        let mut rd: &[u8] = chunk;
        while !rd.is_empty() {
            acceptor
                .read_tls(&mut rd)
                .map_err(|e| HelloError::NotTls(e.to_string()))?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let name = accepted
                    .client_hello()
                    .server_name()
                    .map(|s| s.to_ascii_lowercase());
                return Ok((seen, name));
            }
            Ok(None) => continue,
            Err((e, _alert)) => return Err(HelloError::NotTls(e.to_string())),
        }
    }
}
