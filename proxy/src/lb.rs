//! Load-balancing algorithms that need no I/O: the consistent-hash ring, locality priority
//! levels and the load each level takes, and the hash of a request's affinity key.
//!
//! `crate::cluster` owns the endpoints and calls into here; everything in this module is a
//! pure function of its inputs so it can be tested beside the code.

/// 64-bit hash of an affinity key (FNV-1a, then a splitmix64 finaliser so nearby keys land
/// far apart on the ring). Stable across processes and releases: the same key reaches the
/// same endpoint from every proxy.
pub fn hash_key(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rings larger than this are scaled down (memory: 16 bytes a point).
const MAX_RING_POINTS: u64 = 1 << 22;

/// A Ketama-style consistent-hash ring: each endpoint owns `points_per_weight × weight`
/// points placed by hashing its address and the point's number. The points of an endpoint
/// do not depend on the other endpoints, so when one leaves only the keys it owned move.
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// `keys[i]`: a stable name of endpoint `i` (its address); `weights[i]` its weight.
    pub fn build(keys: &[String], weights: &[u32], points_per_weight: u32) -> Ring {
        let want: u64 = weights
            .iter()
            .map(|w| u64::from(*w) * u64::from(points_per_weight.max(1)))
            .sum();
        // Past the cap every endpoint's share shrinks alike; remapping is then no longer
        // minimal, but memory stays bounded.
        let scale = if want > MAX_RING_POINTS {
            MAX_RING_POINTS as f64 / want as f64
        } else {
            1.0
        };
        let mut points = Vec::with_capacity(want.min(MAX_RING_POINTS) as usize);
        for (i, (key, w)) in keys.iter().zip(weights).enumerate() {
            let n = ((u64::from(*w) * u64::from(points_per_weight.max(1))) as f64 * scale)
                .ceil()
                .max(1.0) as u64;
            for j in 0..n {
                let h = hash_key(format!("{key}_{j}").as_bytes());
                points.push((h, i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Endpoint indices clockwise from `hash`, each point in turn (an endpoint may repeat),
    /// once around the ring: the first one the caller accepts serves the request.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let n = self.points.len();
        (0..n).filter_map(move |k| self.points.get((start + k) % n).map(|(_, i)| *i as usize))
    }
}

/// Envoy's default overprovisioning factor, in percent: a level whose healthy share is at
/// least 1/1.4 (≈71%) takes all its traffic.
pub const OVERPROVISIONING: u64 = 140;

/// The share of traffic (percent, summing to 100 when any endpoint is healthy) each
/// priority level takes, from each level's (healthy, total) endpoint counts. Envoy's
/// priority load: level health = min(100, 1.4 × healthy/total); levels fill in order, the
/// remainder spilling to the next; when the levels' health adds up to less than 100 the
/// load is spread in proportion to their health.
pub fn priority_loads(levels: &[(usize, usize)]) -> Vec<u64> {
    let health: Vec<u64> = levels
        .iter()
        .map(|(healthy, total)| {
            if *total == 0 {
                0
            } else {
                (OVERPROVISIONING * *healthy as u64 / *total as u64).min(100)
            }
        })
        .collect();
    let sum: u64 = health.iter().sum();
    if sum == 0 {
        return vec![0; levels.len()];
    }
    if sum < 100 {
        // Normalise; hand the rounding remainder to the first level with any health.
        let mut loads: Vec<u64> = health.iter().map(|h| h * 100 / sum).collect();
        let rest = 100 - loads.iter().sum::<u64>();
        if let Some(i) = health.iter().position(|h| *h > 0) {
            if let Some(l) = loads.get_mut(i) {
                *l += rest;
            }
        }
        return loads;
    }
    let mut left = 100;
    health
        .iter()
        .map(|h| {
            let take = (*h).min(left);
            left -= take;
            take
        })
        .collect()
}

/// Envoy's "normalized total health": the levels' health summed, capped at 100. Panic mode
/// starts when this falls under the panic threshold.
pub fn total_health(levels: &[(usize, usize)]) -> u64 {
    levels
        .iter()
        .map(|(healthy, total)| {
            if *total == 0 {
                0
            } else {
                (OVERPROVISIONING * *healthy as u64 / *total as u64).min(100)
            }
        })
        .sum::<u64>()
        .min(100)
}

/// Which level a draw in `0..100` falls in, given the levels' loads.
pub fn level_for(loads: &[u64], draw: u64) -> Option<usize> {
    let mut acc = 0;
    for (i, l) in loads.iter().enumerate() {
        acc += l;
        if draw < acc {
            return Some(i);
        }
    }
    loads.iter().rposition(|l| *l > 0)
}

/// A client-address range (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR range (ADDRESS/PREFIX)"))?;
        let net: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("`{ip}` in `{s}` is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{prefix}` in `{s}` is not a prefix length (0-{max})"))?;
        let c = Cidr { net, prefix };
        if c.masked(net) != Some(net) {
            return Err(format!(
                "`{s}` has bits set past its prefix length (the network would be `{}/{prefix}`)",
                c.masked(net).map(|n| n.to_string()).unwrap_or_default()
            ));
        }
        Ok(c)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn masked(&self, ip: std::net::IpAddr) -> Option<std::net::IpAddr> {
        use std::net::IpAddr;
        match ip {
            IpAddr::V4(a) if self.net.is_ipv4() => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::V4((u32::from(a) & mask).into()))
            }
            IpAddr::V6(a) if self.net.is_ipv6() => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::V6((u128::from(a) & mask).into()))
            }
            _ => None,
        }
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.masked(ip) == Some(self.net)
    }
}

/// A route's compiled `hash_policy`: what a hashing balancer hashes for a request.
#[derive(Debug, Default)]
pub struct HashPolicy {
    sources: Vec<HashSource>,
}

#[derive(Debug)]
enum HashSource {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
}

impl HashPolicy {
    pub fn build(specs: &[crate::config::HashPolicySpec]) -> Result<HashPolicy, String> {
        let mut sources = Vec::with_capacity(specs.len());
        for s in specs {
            sources.push(match (&s.header, &s.cookie, &s.connection_properties) {
                (Some(h), None, None) => HashSource::Header(
                    http::HeaderName::from_bytes(h.header_name.as_bytes())
                        .map_err(|e| format!("hash_policy header `{}`: {e}", h.header_name))?,
                ),
                (None, Some(c), None) => HashSource::Cookie(c.name.clone()),
                (None, None, Some(c)) if c.source_ip => HashSource::SourceIp,
                _ => return Err("hash_policy entry needs exactly one source".into()),
            });
        }
        Ok(HashPolicy { sources })
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The hash of the first source that yields a value; None: no affinity (random).
    pub fn hash(&self, headers: &http::HeaderMap, client: std::net::IpAddr) -> Option<u64> {
        self.sources.iter().find_map(|s| match s {
            HashSource::Header(name) => headers.get(name).map(|v| hash_key(v.as_bytes())),
            HashSource::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| hash_key(v.as_bytes()))
                }),
            HashSource::SourceIp => Some(hash_key(client.to_string().as_bytes())),
        })
    }
}

/// A route's compiled `locality_routing`: which region a request should be served from.
#[derive(Debug, Default)]
pub struct LocalityRouting {
    header: Option<http::HeaderName>,
    geo_header: Option<(http::HeaderName, Vec<(String, String)>)>,
    /// Longest prefix first, so the first match is the most specific.
    cidrs: Vec<(Cidr, String)>,
}

impl LocalityRouting {
    pub fn build(spec: &crate::config::LocalityRoutingSpec) -> Result<LocalityRouting, String> {
        let name = |n: &str| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|e| format!("locality_routing header `{n}`: {e}"))
        };
        let mut cidrs = spec
            .client_cidrs
            .iter()
            .map(|c| Ok((Cidr::parse(&c.cidr)?, c.region.clone())))
            .collect::<Result<Vec<_>, String>>()?;
        cidrs.sort_by_key(|(c, _)| std::cmp::Reverse(c.prefix()));
        Ok(LocalityRouting {
            header: spec.header.as_deref().map(name).transpose()?,
            geo_header: match &spec.geo_header {
                Some(g) => Some((
                    name(&g.name)?,
                    g.regions
                        .iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect(),
                )),
                None => None,
            },
            cidrs,
        })
    }

    /// The region for this request: the override header, else the geo header's mapping,
    /// else the client address's range; None: the proxy's own locality.
    pub fn region<'a>(
        &'a self,
        headers: &'a http::HeaderMap,
        client: std::net::IpAddr,
    ) -> Option<&'a str> {
        if let Some(h) = &self.header {
            if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
                let v = v.trim();
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
        if let Some((h, map)) = &self.geo_header {
            if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
                let v = v.trim();
                if let Some((_, region)) = map.iter().find(|(k, _)| k.eq_ignore_ascii_case(v)) {
                    return Some(region);
                }
            }
        }
        self.cidrs
            .iter()
            .find(|(c, _)| c.contains(client))
            .map(|(_, r)| r.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(ring: &Ring, keys: &[String]) -> Vec<usize> {
        (0..5000)
            .map(|k| {
                let h = hash_key(format!("user-{k}").as_bytes());
                ring.walk(h)
                    .find(|i| keys.get(*i).is_some())
                    .expect("owner")
            })
            .collect()
    }

    #[test]
    fn ring_spreads_and_remaps_minimally() {
        let keys: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        let ring = Ring::build(&keys, &[1, 1, 1, 1], 1024);
        assert_eq!(ring.len(), 4096);
        let before = owners(&ring, &keys);
        for i in 0..4 {
            let n = before.iter().filter(|o| **o == i).count();
            assert!((900..1600).contains(&n), "endpoint {i} owns {n} of 5000");
        }
        // Endpoint 2 leaves: a ring of the three others.
        let rest: Vec<String> = vec![keys[0].clone(), keys[1].clone(), keys[3].clone()];
        let ring2 = Ring::build(&rest, &[1, 1, 1], 1024);
        let after: Vec<&String> = owners(&ring2, &rest)
            .into_iter()
            .map(|i| &rest[i])
            .collect();
        for (b, a) in before.iter().zip(after) {
            if *b != 2 {
                assert_eq!(&keys[*b], a, "a key not owned by the leaver moved");
            }
        }
    }

    #[test]
    fn ring_weights() {
        let keys: Vec<String> = vec!["a:1".into(), "b:1".into()];
        let ring = Ring::build(&keys, &[3, 1], 256);
        assert_eq!(ring.len(), 1024);
        let o = owners(&ring, &keys);
        let a = o.iter().filter(|i| **i == 0).count();
        assert!((3300..4200).contains(&a), "weight 3 of 4 owns {a} of 5000");
    }

    #[test]
    fn priority_load_overprovisioning() {
        // All healthy: level 0 takes everything.
        assert_eq!(priority_loads(&[(4, 4), (4, 4)]), vec![100, 0]);
        // 3 of 4 healthy: 1.4 × 75% ≥ 100%: still everything.
        assert_eq!(priority_loads(&[(3, 4), (4, 4)]), vec![100, 0]);
        // 2 of 4: 70% stays, 30% spills over.
        assert_eq!(priority_loads(&[(2, 4), (4, 4)]), vec![70, 30]);
        // Nothing healthy in 0: level 1 takes all.
        assert_eq!(priority_loads(&[(0, 2), (2, 2), (2, 2)]), vec![0, 100, 0]);
        // Empty levels take nothing.
        assert_eq!(priority_loads(&[(0, 0), (1, 1)]), vec![0, 100]);
        // Total health under 100: proportional (35 + 35 → 50/50).
        assert_eq!(priority_loads(&[(1, 4), (1, 4)]), vec![50, 50]);
        assert_eq!(priority_loads(&[(0, 4)]), vec![0]);
        assert_eq!(total_health(&[(1, 4), (1, 4)]), 70);
        assert_eq!(total_health(&[(4, 4), (1, 4)]), 100);
    }

    #[test]
    fn level_draws() {
        assert_eq!(level_for(&[70, 30], 0), Some(0));
        assert_eq!(level_for(&[70, 30], 69), Some(0));
        assert_eq!(level_for(&[70, 30], 70), Some(1));
        assert_eq!(level_for(&[0, 100], 5), Some(1));
        assert_eq!(level_for(&[0, 0], 5), None);
    }

    #[test]
    fn locality_routing_order() {
        let spec: crate::config::LocalityRoutingSpec = serde_json::from_value(serde_json::json!({
            "header": "x-region",
            "geo_header": {"name": "x-geo", "regions": {"US-CA": "us-west"}},
            "client_cidrs": [{"cidr": "10.0.0.0/8", "region": "eu"},
                             {"cidr": "10.1.0.0/16", "region": "us-east"}]
        }))
        .expect("spec");
        let lr = LocalityRouting::build(&spec).expect("build");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let mut h = http::HeaderMap::new();
        assert_eq!(lr.region(&h, ip("10.1.2.3")), Some("us-east"));
        assert_eq!(lr.region(&h, ip("10.2.2.3")), Some("eu"));
        assert_eq!(lr.region(&h, ip("192.168.0.1")), None);
        h.insert("x-geo", http::HeaderValue::from_static("us-ca"));
        assert_eq!(lr.region(&h, ip("10.1.2.3")), Some("us-west"));
        h.insert("x-region", http::HeaderValue::from_static("ap"));
        assert_eq!(lr.region(&h, ip("10.1.2.3")), Some("ap"));
    }

    #[test]
    fn hash_policy_first_source_wins() {
        let specs: Vec<crate::config::HashPolicySpec> = serde_json::from_value(serde_json::json!([
            {"header": {"header_name": "x-user"}},
            {"cookie": {"name": "session"}},
            {"connection_properties": {"source_ip": true}}
        ]))
        .expect("spec");
        let p = HashPolicy::build(&specs).expect("build");
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let mut h = http::HeaderMap::new();
        assert_eq!(p.hash(&h, ip), Some(hash_key(b"10.0.0.1")));
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; session=abc"),
        );
        assert_eq!(p.hash(&h, ip), Some(hash_key(b"abc")));
        h.insert("x-user", http::HeaderValue::from_static("42"));
        assert_eq!(p.hash(&h, ip), Some(hash_key(b"42")));
        assert_eq!(HashPolicy::default().hash(&h, ip), None);
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(c.contains("10.1.200.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.0.9".parse().expect("ip")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("all")
            .contains("1.2.3.4".parse().expect("ip")));
        let v6 = Cidr::parse("2001:db8::/32").expect("v6");
        assert!(v6.contains("2001:db8::1".parse().expect("ip")));
        assert!(Cidr::parse("10.1.0.1/16").is_err());
        assert!(Cidr::parse("10.1.0.0/33").is_err());
        assert!(Cidr::parse("10.1.0.0").is_err());
        assert!(Cidr::parse("nope/8").is_err());
    }
}
