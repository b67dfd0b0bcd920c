//! TLS at the edge and on TCP: public TLS with certificates chosen by SNI, TLS passthrough
//! routed by SNI, and mesh mTLS on TCP listeners and TCP clusters.

use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmesh_e2e::mtls::{cluster_tls, listener_tls, serial_of, CertFiles, MeshCa};
use wasmesh_e2e::upstream::TcpEcho;
use wasmesh_e2e::{cluster, Proxy, Upstream};

/// A server certificate for `names` (DNS SANs), signed by the test CA.
fn dns_cert(ca: &MeshCa, file: &str, names: &[&str]) -> CertFiles {
    let ca_pem = std::fs::read_to_string(ca.bundle()).expect("ca.crt");
    let ca_key = std::fs::read_to_string(ca.dir.join("ca.key")).expect("ca.key");
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let files = CertFiles {
        cert: ca.dir.join(format!("{file}.crt")),
        key: ca.dir.join(format!("{file}.key")),
    };
    std::fs::write(&files.key, key.serialize_pem()).expect("write key");
    std::fs::write(&files.cert, cert.pem()).expect("write cert");
    files
}

fn roots(bundle: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut r = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(bundle).expect("bundle") {
        r.add(c.expect("PEM")).expect("root");
    }
    r
}

/// A verifying TLS client: connects with `sni`, checks the server's certificate against
/// `bundle` for that name, and returns the stream, the leaf's serial and the ALPN protocol.
async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    bundle: &Path,
    alpn: &[&[u8]],
    client: Option<&CertFiles>,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
        Option<Vec<u8>>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(bundle));
    let mut cfg = match client {
        Some(c) => {
            let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&c.cert)
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("PEM");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).expect("key");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no server certificate")?;
    let (_, x) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
    let serial: String = x
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    Ok((tls, serial, alpn))
}

/// An HTTP/1.1 GET over an established stream; the response text.
async fn get_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
) -> String {
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nx-forwarded-proto: http\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// A TLS server that answers every connection with `backend NAME` (proves who terminated).
async fn tls_backend(name: &'static str, cert: &CertFiles) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert.cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("PEM");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls.write_all(format!("backend {name}").as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn public_tls_picks_the_certificate_by_sni_and_negotiates_h2() {
    let ca = MeshCa::init("public-tls");
    let shop = dns_cert(&ca, "shop", &["shop.example.com"]);
    let api = dns_cert(&ca, "api", &["*.api.example.com"]);
    let up = Upstream::named("web").await;
    let proxy = Proxy::start(json!({
        "filter_dir": wasmesh_e2e::wasm_filters::filter_dir(&["testkit"]),
        "filters": [{"name": "kit", "file": "testkit.wasm", "config": {"do": "scheme"}}],
        "listeners": [{"name": "edge", "address": "127.0.0.1:0",
            "public_tls": {"certificates": [{"cert": shop.cert, "key": shop.key}, {"cert": api.cert, "key": api.key}]},
            "routes": [
                {"match": {"prefix": "/old"}, "redirect": {"path": "/new"}},
                {"match": {"prefix": "/"}, "cluster": "web", "filters": ["kit"]}]}],
        "clusters": [cluster("web", up.addr())],
    }))
    .await;
    let addr = proxy.listener("edge");
    let (mut s, serial, _) =
        tls_connect(addr, "shop.example.com", &ca.bundle(), &[b"http/1.1"], None)
            .await
            .expect("shop handshake");
    assert_eq!(serial, serial_of(&shop.cert));
    let text = get_over(&mut s, "shop.example.com", "/hello").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("upstream web"), "{text}");
    // The client came over TLS: the upstream hears `https`, a client's own claim aside, and
    // a redirect keeps the scheme.
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        up.last().header("x-testkit-scheme"),
        Some("https"),
        "what a filter reads"
    );
    let (mut s, _, _) = tls_connect(addr, "shop.example.com", &ca.bundle(), &[b"http/1.1"], None)
        .await
        .expect("shop handshake");
    let text = get_over(&mut s, "shop.example.com", "/old").await;
    assert!(
        text.to_ascii_lowercase()
            .contains("location: https://shop.example.com/new\r\n"),
        "{text}"
    );

    let (_, serial, alpn) = tls_connect(
        addr,
        "v1.api.example.com",
        &ca.bundle(),
        &[b"h2", b"http/1.1"],
        None,
    )
    .await
    .expect("api handshake");
    assert_eq!(serial, serial_of(&api.cert), "the wildcard certificate");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // An unknown name gets the default (first) certificate, which the client rejects.
    let err = tls_connect(
        addr,
        "other.example.org",
        &ca.bundle(),
        &[b"http/1.1"],
        None,
    )
    .await
    .err()
    .unwrap_or_else(|| panic!("the name is not covered by the default certificate"));
    assert!(err.contains("handshake"), "{err}");

    // Plaintext to a TLS port is refused and counted.
    let _ = wasmesh_e2e::client::try_get(addr, "/").await;
    proxy
        .wait_for(Duration::from_secs(5), "a counted refusal", || async {
            (proxy
                .metric(
                    "wasmesh_tls_handshake_failures_total",
                    &[("listener", "edge")],
                )
                .await
                >= 1.0)
                .then_some(())
        })
        .await;
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_without_terminating() {
    let ca = MeshCa::init("passthrough");
    let a_cert = dns_cert(&ca, "a", &["a.example.com"]);
    let b_cert = dns_cert(&ca, "b", &["*.b.example.com"]);
    let a = tls_backend("a", &a_cert).await;
    let b = tls_backend("b", &b_cert).await;
    let proxy = Proxy::start(json!({
        "listeners": [
            {"name": "pass", "address": "127.0.0.1:0", "protocol": "tls_passthrough",
             "sni_routes": [
                {"server_names": ["a.example.com"], "cluster": "a"},
                {"server_names": ["*.b.example.com"], "cluster": "b"}]},
            {"name": "pass-default", "address": "127.0.0.1:0", "protocol": "tls_passthrough",
             "cluster": "a", "sni_routes": [{"server_names": ["x.b.example.com"], "cluster": "b"}]},
        ],
        "clusters": [cluster("a", a), cluster("b", b)],
    }))
    .await;
    let addr = proxy.listener("pass");
    for (sni, cert, who) in [
        ("a.example.com", &a_cert, "backend a"),
        ("x.b.example.com", &b_cert, "backend b"),
    ] {
        let (mut s, serial, _) = tls_connect(addr, sni, &ca.bundle(), &[], None)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(
            serial,
            serial_of(&cert.cert),
            "{sni}: the backend's own certificate"
        );
        s.write_all(b"hi").await.expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert_eq!(out, who);
    }
    // No route for the name: closed, counted.
    assert!(tls_connect(addr, "c.example.com", &ca.bundle(), &[], None)
        .await
        .is_err());
    proxy
        .wait_for(Duration::from_secs(5), "a no_sni_route refusal", || async {
            (proxy
                .metric(
                    "wasmesh_tls_handshake_failures_total",
                    &[("listener", "pass"), ("reason", "no_sni_route")],
                )
                .await
                == 1.0)
                .then_some(())
        })
        .await;
    // With a default cluster, unmatched names go there.
    let (_, serial, _) = tls_connect(
        proxy.listener("pass-default"),
        "a.example.com",
        &ca.bundle(),
        &[],
        None,
    )
    .await
    .expect("default route");
    assert_eq!(serial, serial_of(&a_cert.cert));
}

#[tokio::test]
async fn tcp_over_mesh_mtls_both_ways() {
    // client → A (tcp, plaintext) → mTLS cluster → B (tcp, strict mTLS) → echo
    let ca = MeshCa::init("tcp-mtls");
    let a_id = "spiffe://mesh.local/ns/db/sa/client";
    let b_id = "spiffe://mesh.local/ns/db/sa/postgres";
    let a_cert = ca.issue("a", a_id);
    let b_cert = ca.issue("b", b_id);
    let echo = TcpEcho::start().await;
    let b = Proxy::start(json!({
        "listeners": [{"name": "db", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "echo",
                       "tls": listener_tls("strict", &b_cert, &ca.bundle())}],
        "clusters": [cluster("echo", echo.addr())],
    }))
    .await;
    let mut mesh = cluster("b", b.listener("db"));
    mesh["tls"] = cluster_tls(&a_cert, &ca.bundle(), &[b_id]);
    let a = Proxy::start(json!({
        "listeners": [{"name": "out", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "b"}],
        "clusters": [mesh],
    }))
    .await;
    let mut s = tokio::net::TcpStream::connect(a.listener("out"))
        .await
        .expect("connect");
    s.write_all(b"ping over mtls").await.expect("write");
    let mut buf = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"ping over mtls");
    assert_eq!(
        b.metric("wasmesh_tls_handshakes_total", &[("listener", "db")])
            .await,
        1.0
    );

    // Plaintext straight to B's TLS port is refused.
    let mut plain = tokio::net::TcpStream::connect(b.listener("db"))
        .await
        .expect("connect");
    plain.write_all(b"hello").await.expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    b.wait_for(Duration::from_secs(5), "a plaintext refusal", || async {
        (b.metric(
            "wasmesh_tls_handshake_failures_total",
            &[("listener", "db"), ("reason", "plaintext")],
        )
        .await
            == 1.0)
            .then_some(())
    })
    .await;
}
