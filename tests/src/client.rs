//! Clients that record what they saw: status, headers, body, trailers, and whether the body
//! broke off. HTTP/1.1 and HTTP/2 (prior knowledge), one connection per call or kept open
//! ([`Conn`]) to test keep-alive.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request body type of the clients: anything, streamed.
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// How long a client call may take before the test fails (a hung proxy must not hang CI).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What a client saw.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The body broke off (connection closed early, stream reset).
    pub body_error: Option<String>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Read a whole response.
pub async fn read_response<B>(resp: http::Response<B>) -> Resp
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = resp.into_parts();
    let mut body = std::pin::pin!(body);
    let mut data = Vec::new();
    let mut trailers = None;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    Resp {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
        body_error,
    }
}

/// A request, built up the way a scenario says it.
pub struct Req {
    method: Method,
    path: String,
    host: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ReqBody,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Req {
        Req {
            method: Method::from_bytes(method.as_bytes()).expect("method"),
            path: path.to_string(),
            host: None,
            headers: Vec::new(),
            body: full(Bytes::new()),
        }
    }
    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }
    pub fn post(path: &str) -> Req {
        Req::new("POST", path)
    }
    /// Host (HTTP/1.1) or :authority (HTTP/2). Default: the address connected to.
    pub fn host(mut self, host: &str) -> Req {
        self.host = Some(host.to_string());
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        ));
        self
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = full(body.into());
        self
    }
    pub fn stream_body(mut self, body: ReqBody) -> Req {
        self.body = body;
        self
    }

    fn build(self, addr: SocketAddr, version: Version) -> Request<ReqBody> {
        let host = self.host.unwrap_or_else(|| addr.to_string());
        let uri = if version == Version::HTTP_2 {
            format!("http://{host}{}", self.path)
        } else {
            self.path.clone()
        };
        let mut b = Request::builder()
            .method(self.method)
            .uri(uri)
            .version(version);
        if version != Version::HTTP_2 {
            b = b.header(http::header::HOST, host);
        }
        for (k, v) in self.headers {
            b = b.header(k, v);
        }
        b.body(self.body).expect("request")
    }

    /// Send over a new HTTP/1.1 connection; panics on a connection error.
    pub async fn send(self, addr: SocketAddr) -> Resp {
        let mut c = Conn::h1(addr).await;
        c.send(self).await
    }

    /// Send over a new HTTP/2 (prior knowledge) connection; panics on a connection error.
    pub async fn send_h2(self, addr: SocketAddr) -> Resp {
        let mut c = Conn::h2(addr).await;
        c.send(self).await
    }

    /// Send over a new HTTP/1.1 connection; a connection-level failure is an `Err`.
    pub async fn try_send(self, addr: SocketAddr) -> Result<Resp, String> {
        let mut c = Conn::try_h1(addr).await?;
        c.try_send(self).await
    }
}

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// GET `path` over a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    Req::get(path).send(addr).await
}

/// GET that reports connection failures instead of panicking (readiness polls).
pub async fn try_get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    Req::get(path).try_send(addr).await
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// One client connection, kept open across requests.
pub struct Conn {
    addr: SocketAddr,
    sender: Sender,
    driver: tokio::task::JoinHandle<()>,
}

impl Conn {
    pub async fn h1(addr: SocketAddr) -> Conn {
        Self::try_h1(addr).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn try_h1(addr: SocketAddr) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h1 handshake with {addr}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Conn {
            addr,
            sender: Sender::H1(sender),
            driver,
        })
    }

    pub async fn h2(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        // As real clients do: without it, a request's DATA frame waits behind its HEADERS
        // frame for the proxy's delayed ACK (40 ms).
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap_or_else(|e| panic!("h2 handshake with {addr}: {e}"));
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn {
            addr,
            sender: Sender::H2(sender),
            driver,
        }
    }

    /// Send a request and read the whole response.
    pub async fn send(&mut self, req: Req) -> Resp {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn try_send(&mut self, req: Req) -> Result<Resp, String> {
        let resp = self.send_head(req).await?;
        tokio::time::timeout(CALL_TIMEOUT, read_response(resp))
            .await
            .map_err(|_| {
                format!(
                    "response body from {} took over {CALL_TIMEOUT:?}",
                    self.addr
                )
            })
    }

    /// Send a request; return as soon as the response head arrives (the body streams).
    pub async fn send_head(
        &mut self,
        req: Req,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let addr = self.addr;
        let fut = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready()
                        .await
                        .map_err(|e| format!("connection to {addr}: {e}"))?;
                    s.send_request(req.build(addr, Version::HTTP_11))
                        .await
                        .map_err(|e| format!("request to {addr}: {e}"))
                }
                Sender::H2(s) => {
                    s.ready()
                        .await
                        .map_err(|e| format!("connection to {addr}: {e}"))?;
                    s.send_request(req.build(addr, Version::HTTP_2))
                        .await
                        .map_err(|e| format!("request to {addr}: {e}"))
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| format!("no response from {addr} within {CALL_TIMEOUT:?}"))?
    }

    /// Whether the connection has been closed by the peer.
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
