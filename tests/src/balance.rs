//! Helpers for load-balancing and health tests: which upstream served each request, and
//! an endpoint's state as `/clusters` shows it.

use crate::client::Req;
use crate::{Proxy, Upstream};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The path health checks use in these tests; requests on it are not "traffic".
pub const HEALTH_PATH: &str = "/healthz";

/// Send `n` requests made by `req(i)` and count the answers by upstream name (the body
/// `upstream NAME` of a default [`Upstream`]), or `status NNN` for other answers.
pub async fn spread(
    addr: SocketAddr,
    n: usize,
    req: impl Fn(usize) -> Req,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = req(i).send(addr).await;
        let key = match r.text().strip_prefix("upstream ") {
            Some(name) if r.status == 200 => name.to_string(),
            _ => format!("status {}", r.status),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

/// The upstream that served one request (its name), or `status NNN`.
pub async fn served_by(addr: SocketAddr, req: Req) -> String {
    let r = req.send(addr).await;
    match r.text().strip_prefix("upstream ") {
        Some(name) if r.status == 200 => name.to_string(),
        _ => format!("status {}", r.status),
    }
}

/// Requests `up` received other than health checks.
pub fn traffic(up: &Upstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path != HEALTH_PATH)
        .count()
}

/// Health checks `up` received.
pub fn checks(up: &Upstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path == HEALTH_PATH)
        .count()
}

/// The `/clusters` entry of endpoint `addr` in cluster `cluster`.
pub async fn endpoint_status(proxy: &Proxy, cluster: &str, addr: SocketAddr) -> serde_json::Value {
    let all = proxy.admin_get("/clusters").await.json();
    all.as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == cluster))
        .and_then(|c| c["endpoints"].as_array())
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Wait (up to `secs`) until endpoint `addr` of `cluster` shows health `state`
/// (`healthy`, `ejected`, `unhealthy`) on `/clusters`.
pub async fn wait_health(proxy: &Proxy, cluster: &str, addr: SocketAddr, state: &str, secs: u64) {
    proxy
        .wait_for(
            std::time::Duration::from_secs(secs),
            &format!("{addr} of {cluster} to be {state}"),
            || async move {
                (endpoint_status(proxy, cluster, addr).await["health"] == state).then_some(())
            },
        )
        .await
}
