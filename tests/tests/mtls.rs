//! Mesh mTLS between two real proxies: A (outbound, originating mTLS) → B (inbound,
//! terminating it) → a test upstream, with certificates from the real `wasmesh ca`.
//! The happy path over HTTP/1.1 and HTTP/2, the peer's SPIFFE ID in B's access log and
//! metrics, every refusal counted by reason, permissive mode, policy by SPIFFE ID with the
//! `authz` filter, and certificate rotation under load.

use serde_json::{json, Value};
use std::time::Duration;
use wasmesh_e2e::client::Req;
use wasmesh_e2e::mtls::{
    cluster_tls, listener_tls, mtls_get, serial_of, wasmesh, CertFiles, ClientCertRecorder, MeshCa,
};
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

const FRONTEND: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://mesh.local/ns/shop/sa/backend";
const CHECKOUT: &str = "spiffe://mesh.local/ns/shop/sa/checkout";

/// Proxy B: an inbound listener `in` with `tls` in front of `up`.
async fn proxy_b(up: &Upstream, tls: Value) -> Proxy {
    Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "tls": tls,
                       "routes": [{"name": "app", "cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await
}

/// Proxy A: an outbound plaintext listener `out` whose cluster `b` originates mTLS to `b`.
async fn proxy_a(b: std::net::SocketAddr, protocol: &str, tls: Value) -> Proxy {
    Proxy::start(json!({
        "listeners": [{"name": "out", "address": "127.0.0.1:0", "direction": "outbound",
                       "routes": [{"name": "to-b", "cluster": "b"}]}],
        "clusters": [{"name": "b", "protocol": protocol, "tls": tls,
                      "endpoints": [{"address": b.to_string()}]}],
    }))
    .await
}

struct Mesh {
    ca: MeshCa,
    frontend: CertFiles,
    backend: CertFiles,
}

fn mesh(tag: &str) -> Mesh {
    let ca = MeshCa::init(tag);
    let frontend = ca.issue("frontend", FRONTEND);
    let backend = ca.issue("backend", BACKEND);
    Mesh {
        ca,
        frontend,
        backend,
    }
}

async fn reloads(p: &Proxy, owner: &str) -> f64 {
    p.metric(
        "wasmesh_tls_certificate_reloads_total",
        &[("owner", owner), ("result", "success")],
    )
    .await
}

async fn failures(p: &Proxy, reason: &str) -> f64 {
    p.metric(
        "wasmesh_tls_handshake_failures_total",
        &[("listener", "in"), ("reason", reason)],
    )
    .await
}

/// Wait until B counted a refusal with `reason`.
async fn refused(b: &Proxy, reason: &str) {
    b.wait_for(
        Duration::from_secs(5),
        &format!("a handshake failure with reason {reason}"),
        || async { (failures(b, reason).await >= 1.0).then_some(()) },
    )
    .await;
}

async fn happy_path(protocol: &str, version: &str) {
    let m = mesh("mtls-happy");
    let up = Upstream::start().await;
    up.set_default(Behavior::Echo);
    let b = proxy_b(&up, listener_tls("strict", &m.backend, &m.ca.bundle())).await;
    let a = proxy_a(
        b.listener("in"),
        protocol,
        cluster_tls(&m.frontend, &m.ca.bundle(), &[BACKEND]),
    )
    .await;
    for i in 0..3 {
        let r = Req::get(&format!("/hello/{i}"))
            .header("x-request-id", &format!("mtls-{protocol}-{i}"))
            .send(a.listener("out"))
            .await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), a.stderr());
    }
    assert_eq!(up.requests().len(), 3);
    // B saw A's identity: in its access log, and as the source principal of its metrics.
    let line = b.log_for_request_id(&format!("mtls-{protocol}-0")).await;
    assert_eq!(line["peer_identity"], FRONTEND, "{line}");
    assert_eq!(line["protocol"], version, "{line}");
    b.wait_for(
        Duration::from_secs(5),
        "3 requests with source_principal=FRONTEND",
        || async {
            let n = b
                .metric(
                    "wasmesh_requests_total",
                    &[("source_principal", FRONTEND), ("reporter", "destination")],
                )
                .await;
            (n == 3.0).then_some(())
        },
    )
    .await;
    // Who answered, on both sides (Istio's destination_principal): B's own identity on
    // its inbound side, and on A's outbound side the identity B's certificate proved.
    assert_eq!(
        b.metric(
            "wasmesh_requests_total",
            &[
                ("destination_principal", BACKEND),
                ("source_principal", FRONTEND)
            ],
        )
        .await,
        3.0
    );
    a.wait_for(
        Duration::from_secs(5),
        "3 requests with reporter=source, destination_principal=BACKEND",
        || async {
            let n = a
                .metric(
                    "wasmesh_requests_total",
                    &[
                        ("reporter", "source"),
                        ("destination_principal", BACKEND),
                        ("source_principal", "unknown"),
                        ("destination_service", "b"),
                    ],
                )
                .await;
            (n == 3.0).then_some(())
        },
    )
    .await;
    // Connections are reused: one handshake carried every request.
    assert_eq!(
        b.metric("wasmesh_tls_handshakes_total", &[("listener", "in")])
            .await,
        1.0
    );
    // Both sides export their certificates' expiry.
    for (p, owner) in [(&a, "cluster/b"), (&b, "listener/in")] {
        let exp = p
            .metric(
                "wasmesh_tls_certificate_expiry_timestamp_seconds",
                &[("owner", owner), ("kind", "certificate")],
            )
            .await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            exp > now + 23.0 * 3600.0 && exp < now + 25.0 * 3600.0,
            "{owner}: expiry {exp}, now {now}"
        );
    }
}

#[tokio::test]
async fn mtls_between_proxies_over_http1() {
    happy_path("http1", "HTTP/1.1").await;
}

#[tokio::test]
async fn mtls_between_proxies_over_http2_negotiated_by_alpn() {
    happy_path("http2", "HTTP/2").await;
}

#[tokio::test]
async fn ca_issues_one_spiffe_uri_san_with_a_short_lifetime_and_private_keys() {
    use std::os::unix::fs::PermissionsExt;
    let m = mesh("mtls-ca");
    for key in [m.ca.dir.join("ca.key"), m.frontend.key.clone()] {
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let pem = std::fs::read(&m.frontend.cert).expect("cert");
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(&pem).expect("PEM");
    let (_, x) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    let san = x
        .subject_alternative_name()
        .expect("SAN")
        .expect("a SAN extension");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert_eq!(names, vec![format!("URI({FRONTEND})")]);
    let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    // 24 h, plus the 5 minutes of clock slack before now.
    assert_eq!(life, 24 * 3600 + 300);
    // Two issues, two serials.
    let again = m.ca.issue("frontend2", FRONTEND);
    assert_ne!(serial_of(&again.cert), serial_of(&m.frontend.cert));
    // init refuses to overwrite a CA.
    let out = std::process::Command::new(wasmesh_e2e::binary::wasmesh_bin())
        .args(["ca", "init", "--dir", &m.ca.dir.display().to_string()])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // An invalid SPIFFE ID is refused.
    let out = std::process::Command::new(wasmesh_e2e::binary::wasmesh_bin())
        .args([
            "ca",
            "issue",
            "--dir",
            &m.ca.dir.display().to_string(),
            "--spiffe-id",
            "https://mesh.local/x",
            "--out",
            &m.ca.dir.join("bad").display().to_string(),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SPIFFE ID"));
    // A lifetime past X.509's last date is refused by name, not a panic.
    let out = std::process::Command::new(wasmesh_e2e::binary::wasmesh_bin())
        .args([
            "ca",
            "init",
            "--dir",
            &m.ca.dir.join("long").display().to_string(),
            "--days",
            "4000000000",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--days") && err.contains("1..=36500"), "{err}");
}

#[tokio::test]
async fn every_refusal_is_counted_by_reason() {
    let m = mesh("mtls-refusals");
    let up = Upstream::start().await;
    let mut tls = listener_tls("strict", &m.backend, &m.ca.bundle());
    tls["allowed_identities"] = json!([FRONTEND, CHECKOUT]);
    let b = proxy_b(&up, tls).await;
    let addr = b.listener("in");

    // A valid, allowed client gets through.
    let ok = mtls_get(addr, Some(&m.frontend), "/ok").await;
    assert_eq!(ok.status, Some(200), "{ok:?}\n{}", b.stderr());
    assert_eq!(
        ok.server_serial.as_deref(),
        Some(serial_of(&m.backend.cert).as_str())
    );

    // Plaintext to a strict port.
    let r = Req::get("/plain").try_send(addr).await;
    assert!(r.is_err(), "plaintext got an answer: {r:?}");
    refused(&b, "plaintext").await;

    // A certificate from another CA.
    let other = MeshCa::init("mtls-other-ca");
    let stranger = other.issue("stranger", FRONTEND);
    let r = mtls_get(addr, Some(&stranger), "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "unknown_ca").await;

    // An expired certificate.
    let expired = m.ca.craft("expired", Some(FRONTEND), -7200, -3600);
    let r = mtls_get(addr, Some(&expired), "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "expired").await;

    // A certificate without a SPIFFE ID.
    let dns_only = m.ca.craft("dns-only", None, -60, 3600);
    let r = mtls_get(addr, Some(&dns_only), "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "no_spiffe_id").await;

    // A valid identity the listener does not allow.
    let intruder =
        m.ca.issue("intruder", "spiffe://mesh.local/ns/other/sa/intruder");
    let r = mtls_get(addr, Some(&intruder), "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "identity_not_allowed").await;

    // No client certificate at all.
    let r = mtls_get(addr, None, "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "no_client_certificate").await;

    assert_eq!(
        up.requests().len(),
        1,
        "only the valid client reached the upstream"
    );
    // Logs name the reason, never key material.
    let err = b.stderr();
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

#[tokio::test]
async fn a_cluster_refuses_an_upstream_identity_it_does_not_allow() {
    let m = mesh("mtls-cluster-allow");
    let up = Upstream::start().await;
    let b = proxy_b(&up, listener_tls("strict", &m.backend, &m.ca.bundle())).await;
    // A expects checkout, B presents backend.
    let a = proxy_a(
        b.listener("in"),
        "http1",
        cluster_tls(&m.frontend, &m.ca.bundle(), &[CHECKOUT]),
    )
    .await;
    let r = Req::get("/").send(a.listener("out")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        a.metric(
            "wasmesh_upstream_tls_handshake_failures_total",
            &[("cluster", "b"), ("reason", "identity_not_allowed")]
        )
        .await,
        1.0
    );
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn permissive_accepts_mtls_and_plaintext_on_one_port() {
    let m = mesh("mtls-permissive");
    let up = Upstream::start().await;
    let b = proxy_b(&up, listener_tls("permissive", &m.backend, &m.ca.bundle())).await;
    let a = proxy_a(
        b.listener("in"),
        "http1",
        cluster_tls(&m.frontend, &m.ca.bundle(), &[BACKEND]),
    )
    .await;
    let plain = Req::get("/plain")
        .header("x-request-id", "permissive-plain")
        .send(b.listener("in"))
        .await;
    assert_eq!(plain.status, 200);
    let plain_h2 = Req::get("/plain-h2").send_h2(b.listener("in")).await;
    assert_eq!(plain_h2.status, 200);
    let viatls = Req::get("/tls")
        .header("x-request-id", "permissive-tls")
        .send(a.listener("out"))
        .await;
    assert_eq!(viatls.status, 200, "{}", a.stderr());
    let line = b.log_for_request_id("permissive-plain").await;
    assert!(line.get("peer_identity").is_none(), "{line}");
    let line = b.log_for_request_id("permissive-tls").await;
    assert_eq!(line["peer_identity"], FRONTEND);
    // A TLS client must still present a valid certificate.
    let r = mtls_get(b.listener("in"), None, "/").await;
    assert_eq!(r.status, None, "{r:?}");
    refused(&b, "no_client_certificate").await;
}

#[tokio::test]
async fn authz_allows_and_denies_by_spiffe_id() {
    let m = mesh("mtls-authz");
    let checkout = m.ca.issue("checkout", CHECKOUT);
    let up = Upstream::start().await;
    let dir = wasmesh_e2e::wasm_filters::filter_dir(&["authz"]);
    let b = Proxy::start(json!({
        "filter_dir": dir,
        "filters": [{"name": "authz", "file": "authz.wasm", "config": {"rules": [
            {"name": "checkout-pays", "principals": [CHECKOUT], "methods": ["POST"], "paths": ["/pay"]},
            {"name": "anyone-reads", "methods": ["GET"]},
        ]}}],
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "tls": listener_tls("strict", &m.backend, &m.ca.bundle()),
                       "filters": ["authz"],
                       "routes": [{"name": "app", "cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let via = |certs: &CertFiles| cluster_tls(certs, &m.ca.bundle(), &[BACKEND]);
    let from_checkout = proxy_a(b.listener("in"), "http1", via(&checkout)).await;
    let from_frontend = proxy_a(b.listener("in"), "http2", via(&m.frontend)).await;

    let r = Req::post("/pay")
        .body("1")
        .send(from_checkout.listener("out"))
        .await;
    assert_eq!(r.status, 200, "checkout may pay: {}", r.text());
    let r = Req::post("/pay")
        .body("1")
        .send(from_frontend.listener("out"))
        .await;
    assert_eq!(r.status, 403, "frontend may not pay: {}", r.text());
    let r = Req::get("/catalog")
        .send(from_frontend.listener("out"))
        .await;
    assert_eq!(r.status, 200, "anyone may read");
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn manifest_errors_name_the_tls_field() {
    let m = mesh("mtls-check");
    let dir = wasmesh_e2e::proxy::temp_dir("mtls-check-manifest");
    let manifest = dir.join("m.json");
    let expired = m.ca.craft("old", Some(BACKEND), -7200, -3600);
    let text = serde_json::to_string_pretty(&json!({
        "listeners": [
            {"name": "a", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}],
             "tls": {"cert": "missing.crt", "key": m.backend.key, "trust_bundle": m.ca.bundle(),
                     "allowed_identities": ["http://nope"]}},
            {"name": "b", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}],
             "tls": listener_tls("strict", &expired, &m.ca.bundle())},
            {"name": "c", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}],
             "tls": {"cert": m.backend.cert, "key": m.frontend.key, "trust_bundle": m.ca.bundle()}},
        ],
        "clusters": [{"name": "x", "endpoints": [{"address": "127.0.0.1:1"}],
                      "tls": {"cert": m.frontend.cert, "key": m.frontend.key,
                              "trust_bundle": m.ca.bundle(), "allowed_identities": []}}],
    }))
    .expect("json");
    std::fs::write(&manifest, text).expect("write");
    let out = std::process::Command::new(wasmesh_e2e::binary::wasmesh_bin())
        .arg("check")
        .arg(&manifest)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = manifest.display().to_string();
    for want in [
        format!("{file}: listeners[0].tls.allowed_identities[0]: `http://nope` is not a SPIFFE ID"),
        format!(
            "{file}: listeners[0].tls.cert: cannot read {}",
            dir.join("missing.crt").display()
        ),
        format!(
            "{file}: listeners[1].tls.cert: {}: the certificate expired",
            expired.cert.display()
        ),
        format!(
            "{file}: listeners[2].tls.key: {} is not the private key",
            m.frontend.key.display()
        ),
        format!("{file}: clusters[0].tls.allowed_identities: list the SPIFFE IDs"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // `wasmesh ca` output is what a user follows.
    let listing = wasmesh(&[
        "ca",
        "issue",
        "--dir",
        &m.ca.dir.display().to_string(),
        "--spiffe-id",
        CHECKOUT,
        "--out",
        &m.ca.dir.join("c2").display().to_string(),
        "--hours",
        "2",
    ]);
    assert!(listing.contains("c2.crt"), "{listing}");
}

/// Rotation: B's server certificate and A's client certificate are re-issued while requests
/// flow through A → B; no request fails, new handshakes present the new serial, and a
/// broken replacement is refused while the previous certificate keeps serving.
#[tokio::test]
async fn certificates_rotate_under_load_without_failed_requests() {
    let m = mesh("mtls-rotate");
    let up = Upstream::start().await;
    let b = proxy_b(&up, listener_tls("strict", &m.backend, &m.ca.bundle())).await;
    let a = proxy_a(
        b.listener("in"),
        "http1",
        cluster_tls(&m.frontend, &m.ca.bundle(), &[BACKEND]),
    )
    .await;
    let out = a.listener("out");
    let old_serial = serial_of(&m.backend.cert);

    // Steady load: 4 clients, each sending requests back to back until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match Req::get(&format!("/load/{w}/{i}")).try_send(out).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(e),
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Re-issue both certificates in place (as a renewal job would).
    let backend2 = m.ca.issue("backend", BACKEND);
    let frontend2 = m.ca.issue("frontend", FRONTEND);
    let new_serial = serial_of(&backend2.cert);
    assert_ne!(new_serial, old_serial);
    b.wait_for(
        Duration::from_secs(10),
        "B to load its new certificate",
        || async { (reloads(&b, "listener/in").await >= 1.0).then_some(()) },
    )
    .await;
    a.wait_for(
        Duration::from_secs(10),
        "A to load its new certificate",
        || async { (reloads(&a, "cluster/b").await >= 1.0).then_some(()) },
    )
    .await;
    // A new handshake presents the new serial.
    let fresh = mtls_get(b.listener("in"), Some(&frontend2), "/fresh").await;
    assert_eq!(fresh.status, Some(200), "{fresh:?}");
    assert_eq!(fresh.server_serial.as_deref(), Some(new_serial.as_str()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A broken replacement is refused; the new certificate stays in use.
    std::fs::write(&m.backend.cert, "not a certificate").expect("write");
    b.wait_for(
        Duration::from_secs(10),
        "B to refuse the broken certificate",
        || async {
            let v = wasmesh_e2e::proxy::metric_value(
                &b.metrics().await,
                "wasmesh_tls_certificate_reloads_total",
                &[("owner", "listener/in"), ("result", "failure")],
            );
            (v >= 1.0).then_some(())
        },
    )
    .await;
    // The log line names the file and the problem (the metric may be read before the
    // line reaches us through the pipe).
    b.wait_for(Duration::from_secs(5), "the refusal in the log", || async {
        let err = b.stderr();
        (err.contains("TLS certificate replacement refused") && err.contains("backend.crt"))
            .then_some(())
    })
    .await;
    let still = mtls_get(b.listener("in"), Some(&frontend2), "/still").await;
    assert_eq!(still.status, Some(200), "{still:?}");
    assert_eq!(still.server_serial.as_deref(), Some(new_serial.as_str()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for h in load {
        let (ok, failed) = h.await.expect("load task");
        assert!(
            failed.is_empty(),
            "failed requests during rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 20, "only {total} requests went through");
}

#[tokio::test]
async fn a_rotated_client_certificate_is_presented_on_new_handshakes() {
    let m = mesh("mtls-client-rotate");
    let probe = m.ca.issue("probe", CHECKOUT);
    let server = ClientCertRecorder::start(&probe, &m.ca.bundle()).await;
    let a = proxy_a(
        server.addr,
        "http1",
        cluster_tls(&m.frontend, &m.ca.bundle(), &[CHECKOUT]),
    )
    .await;
    let out = a.listener("out");
    let old = serial_of(&m.frontend.cert);
    let r = Req::get("/before").send(out).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.serials().last(), Some(&old));

    let renewed = m.ca.issue("frontend", FRONTEND);
    let new = serial_of(&renewed.cert);
    assert_ne!(new, old);
    a.wait_for(
        Duration::from_secs(10),
        "A to load its new client certificate",
        || async { (reloads(&a, "cluster/b").await >= 1.0).then_some(()) },
    )
    .await;
    // The server closes every connection, so this request is a new handshake.
    let r = Req::get("/after").send(out).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        server.serials().last(),
        Some(&new),
        "{:?}",
        server.serials()
    );
}
