//! wasmesh: a service-mesh sidecar proxy whose policy lives in WebAssembly filters.
//!
//! Where things happen:
//! - [`config`]: the manifest's types, loading and validation; [`reload`]: what triggers
//!   a reload;
//! - [`server`]: life cycle (build, bind, serve, reload, drain) and process-wide state;
//! - [`listener`]: sockets, worker threads and downstream connections; [`h1_server`]:
//!   downstream HTTP/1.1, including its request framing (Content-Length with
//!   Transfer-Encoding, chunked coding); downstream HTTP/2 is hyper's, timed by
//!   [`h2_headers`] (header blocks) and [`h2_streams`] (idleness);
//! - [`proxy`]: the HTTP request path, top to bottom; [`routing`]: route matching and
//!   path normalization; [`forward`]: the upstream leg with its retries ([`retry`]) and
//!   mirrors ([`mirror`]);
//! - [`cluster`]: endpoints and load balancing; [`pool`] and [`h1`]: upstream connection
//!   pools and HTTP/1.1 exchanges; [`health`]: outlier detection and active health
//!   checks; [`lb`]: hashing and locality algorithms; [`breaker`]: circuit breakers;
//! - [`filters`]: the WebAssembly filter host;
//! - [`tls`]: mesh mTLS (SPIFFE identities, rotation); [`ca`]: `wasmesh ca`;
//! - [`telemetry`]: metrics, access log and traces ([`trace`]: the trace context a request
//!   carries); [`admin`]: the admin endpoint;
//! - per-thread memory kept off the allocator's slow paths: [`buf_pool`], [`header_pool`],
//!   [`heap`], [`memory`].

pub mod admin;
pub mod breaker;
pub mod buf_pool;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod filters;
pub mod forward;
pub mod h1;
pub mod h1_server;
pub mod h2_headers;
pub mod h2_streams;
pub mod header_pool;
pub mod health;
pub mod heap;
pub mod idle;
pub mod lb;
pub mod listener;
pub mod memory;
pub mod mirror;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod rng;
pub mod routing;
pub mod scaffold;
pub mod server;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod trace;
