//! Load balancing: locality priority levels with failover and fail-back, a route choosing
//! the region (override header, geo header, client CIDR table), and the consistent-hash
//! ring (same key → same endpoint; only a leaving endpoint's keys move).

use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use wasmesh_e2e::balance::{served_by, spread, wait_health, HEALTH_PATH};
use wasmesh_e2e::client::Req;
use wasmesh_e2e::{Behavior, Proxy, Upstream};

fn ep(u: &Upstream, region: &str, zone: &str) -> serde_json::Value {
    json!({"address": u.addr().to_string(), "locality": {"region": region, "zone": zone}})
}

fn fast_checks() -> serde_json::Value {
    json!({"path": HEALTH_PATH, "interval": "100ms", "timeout": "500ms",
           "healthy_threshold": 1, "unhealthy_threshold": 1})
}

fn names(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn locality_failover_zone_then_region_then_elsewhere_and_back() {
    let z1 = Upstream::named("z1").await;
    let z2 = Upstream::named("z2").await;
    let r1 = Upstream::named("r1").await;
    let r2 = Upstream::named("r2").await;
    let far = Upstream::named("far").await;
    let proxy = Proxy::start(json!({
        "node": {"locality": {"region": "us-west", "zone": "us-west-1a"}},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "locality_lb": true, "healthy_panic_threshold": 0,
                      "health_check": fast_checks(),
                      "endpoints": [ep(&z1, "us-west", "us-west-1a"), ep(&z2, "us-west", "us-west-1a"),
                                    ep(&r1, "us-west", "us-west-1b"), ep(&r2, "us-west", "us-west-1c"),
                                    ep(&far, "eu-central", "eu-central-1a")]}],
    }))
    .await;
    let l = proxy.listener("in");
    let clusters = proxy.admin_get("/clusters").await.json();
    assert_eq!(clusters[0]["endpoints"][0]["priority"], 0, "{clusters}");
    assert_eq!(clusters[0]["endpoints"][2]["priority"], 1, "{clusters}");
    assert_eq!(clusters[0]["endpoints"][4]["priority"], 2, "{clusters}");

    // Everything healthy: all traffic stays in the zone.
    let seen = spread(l, 40, |_| Req::get("/x")).await;
    assert_eq!(names(&seen), vec!["z1", "z2"], "{seen:?}");

    // Half the zone down: 1.4 × 50% = 70% stays, 30% spills to the region.
    z1.set_default(Behavior::Status(503));
    wait_health(&proxy, "app", z1.addr(), "unhealthy", 5).await;
    let seen = spread(l, 200, |_| Req::get("/x")).await;
    let zone = seen.get("z2").copied().unwrap_or(0);
    let region = seen.get("r1").copied().unwrap_or(0) + seen.get("r2").copied().unwrap_or(0);
    assert!((110..=170).contains(&zone), "about 70% in zone: {seen:?}");
    assert_eq!(zone + region, 200, "nothing beyond the region: {seen:?}");

    // The whole zone down: the region takes everything.
    z2.set_default(Behavior::Status(503));
    wait_health(&proxy, "app", z2.addr(), "unhealthy", 5).await;
    let seen = spread(l, 40, |_| Req::get("/x")).await;
    assert_eq!(names(&seen), vec!["r1", "r2"], "{seen:?}");

    // Zone and region down: elsewhere.
    r1.set_default(Behavior::Status(503));
    r2.set_default(Behavior::Status(503));
    wait_health(&proxy, "app", r1.addr(), "unhealthy", 5).await;
    wait_health(&proxy, "app", r2.addr(), "unhealthy", 5).await;
    let seen = spread(l, 20, |_| Req::get("/x")).await;
    assert_eq!(names(&seen), vec!["far"], "{seen:?}");

    // The zone recovers: traffic fails back to it.
    z1.set_default(Behavior::Status(200));
    z2.set_default(Behavior::Status(200));
    wait_health(&proxy, "app", z1.addr(), "healthy", 5).await;
    wait_health(&proxy, "app", z2.addr(), "healthy", 5).await;
    let seen = spread(l, 40, |_| Req::get("/x")).await;
    assert_eq!(names(&seen), vec!["z1", "z2"], "{seen:?}");
}

#[tokio::test]
async fn a_route_chooses_the_region_by_header_geo_header_or_client_cidr() {
    let west = Upstream::named("west").await;
    let east = Upstream::named("east").await;
    let eu = Upstream::named("eu").await;
    let proxy = Proxy::start(json!({
        "node": {"locality": {"region": "eu-central", "zone": "eu-central-1a"}},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/cidr"}, "cluster": "app",
             "locality_routing": {"client_cidrs": [
                 {"cidr": "127.0.0.0/8", "region": "us-east"},
                 {"cidr": "127.0.0.1/32", "region": "us-west"},
                 {"cidr": "10.0.0.0/8", "region": "eu-central"}]}},
            {"cluster": "app",
             "locality_routing": {"header": "x-region",
                                  "geo_header": {"name": "x-client-geo",
                                                 "regions": {"US-CA": "us-west", "US-NY": "us-east"}}}},
        ]}],
        "clusters": [{"name": "app", "locality_lb": true,
                      "endpoints": [ep(&west, "us-west", "us-west-1a"), ep(&east, "us-east", "us-east-1a"),
                                    ep(&eu, "eu-central", "eu-central-1a")]}],
    }))
    .await;
    let l = proxy.listener("in");
    // No hint: the proxy's own locality.
    assert_eq!(served_by(l, Req::get("/x")).await, "eu");
    // Users in California go to the West Coast.
    for _ in 0..5 {
        assert_eq!(
            served_by(l, Req::get("/x").header("x-client-geo", "US-CA")).await,
            "west"
        );
        assert_eq!(
            served_by(l, Req::get("/x").header("x-client-geo", "US-NY")).await,
            "east"
        );
    }
    // An unknown geo value falls back to the proxy's locality.
    assert_eq!(
        served_by(l, Req::get("/x").header("x-client-geo", "FR")).await,
        "eu"
    );
    // The override header wins over the geo header.
    assert_eq!(
        served_by(
            l,
            Req::get("/x")
                .header("x-region", "us-east")
                .header("x-client-geo", "US-CA")
        )
        .await,
        "east"
    );
    // CIDR table: the most specific range (127.0.0.1/32) wins.
    for _ in 0..5 {
        assert_eq!(served_by(l, Req::get("/cidr")).await, "west");
    }
}

#[tokio::test]
async fn region_selection_fails_over_when_the_region_is_down() {
    let west = Upstream::named("west").await;
    let eu = Upstream::named("eu").await;
    let proxy = Proxy::start(json!({
        "node": {"locality": {"region": "eu-central", "zone": "eu-central-1a"}},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"cluster": "app", "locality_routing": {"header": "x-region"}}]}],
        "clusters": [{"name": "app", "locality_lb": true, "healthy_panic_threshold": 0,
                      "health_check": fast_checks(),
                      "endpoints": [ep(&west, "us-west", "us-west-1a"),
                                    ep(&eu, "eu-central", "eu-central-1a")]}],
    }))
    .await;
    let l = proxy.listener("in");
    assert_eq!(
        served_by(l, Req::get("/x").header("x-region", "us-west")).await,
        "west"
    );
    west.set_default(Behavior::Status(503));
    wait_health(&proxy, "app", west.addr(), "unhealthy", 5).await;
    assert_eq!(
        served_by(l, Req::get("/x").header("x-region", "us-west")).await,
        "eu"
    );
}

#[tokio::test]
async fn invalid_cidr_is_refused_at_load() {
    let (status, stderr) = Proxy::start_failure(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"cluster": "app", "locality_routing": {"client_cidrs": [
                {"cidr": "10.0.0.0/33", "region": "eu"}]}}]}],
        "clusters": [{"name": "app", "endpoints": [{"address": "127.0.0.1:1"}]}],
    }))
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains(
            "listeners[0].routes[0].locality_routing.client_cidrs[0].cidr: `33` in `10.0.0.0/33` is not a prefix length (0-32)"
        ),
        "{stderr}"
    );
}

/// Which upstream serves each of `users` (by `x-user`), asking twice to see it is stable.
async fn owners(l: std::net::SocketAddr, users: usize) -> Vec<String> {
    let mut out = Vec::new();
    for u in 0..users {
        let user = format!("user-{u}");
        let first = served_by(l, Req::get("/x").header("x-user", &user)).await;
        let again = served_by(l, Req::get("/x").header("x-user", &user)).await;
        assert_eq!(first, again, "{user} moved between two requests");
        out.push(first);
    }
    out
}

#[tokio::test]
async fn ring_hash_keeps_keys_and_moves_only_a_leavers_keys() {
    let ups: Vec<Upstream> = futures_util::future::join_all(
        (0..4).map(|i| async move { Upstream::named(&format!("u{i}")).await }),
    )
    .await;
    let manifest = |n: usize| {
        json!({
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
                {"cluster": "app", "hash_policy": [{"header": {"header_name": "x-user"}},
                                                   {"connection_properties": {"source_ip": true}}]}]}],
            "clusters": [{"name": "app", "lb_policy": "ring_hash",
                          "ring_hash": {"minimum_ring_size": 1024},
                          "health_check": fast_checks(), "healthy_panic_threshold": 0,
                          "endpoints": ups.iter().take(n)
                              .map(|u| json!({"address": u.addr().to_string()}))
                              .collect::<Vec<_>>()}],
        })
    };
    let proxy = Proxy::start(manifest(4)).await;
    let l = proxy.listener("in");
    let users = 60;
    let before = owners(l, users).await;
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &before {
        *per.entry(o.as_str()).or_insert(0) += 1;
    }
    assert_eq!(per.len(), 4, "every endpoint owns some keys: {per:?}");

    // u1 fails its health check: only u1's keys move.
    ups[1].set_default(Behavior::Status(503));
    wait_health(&proxy, "app", ups[1].addr(), "unhealthy", 5).await;
    let during = owners(l, users).await;
    for (b, d) in before.iter().zip(&during) {
        assert_ne!(d, "u1");
        if b != "u1" {
            assert_eq!(b, d, "a key not owned by u1 moved");
        }
    }
    // u1 recovers: its keys come back to it.
    ups[1].set_default(Behavior::Status(200));
    wait_health(&proxy, "app", ups[1].addr(), "healthy", 5).await;
    assert_eq!(owners(l, users).await, before);

    // u3 leaves by reload: only u3's keys move.
    proxy.write_manifest(manifest(3));
    proxy
        .wait_for(Duration::from_secs(10), "the reload without u3", || async {
            let c = proxy.admin_get("/clusters").await.json();
            (c[0]["endpoints"].as_array().map(|a| a.len()) == Some(3)).then_some(())
        })
        .await;
    let after = owners(l, users).await;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a, "u3");
        if b != "u3" {
            assert_eq!(b, a, "a key not owned by u3 moved");
        }
    }
    // No x-user: the client address is the key, so one client sticks to one endpoint.
    let seen = spread(l, 10, |_| Req::get("/x")).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
}
