//! wasmesh: a service-mesh sidecar proxy whose policy lives in WebAssembly filters.
//!
//! Where things happen:
//! - [`config`]: the manifest's types, loading and validation;
//! - [`server`]: life cycle (build, bind, serve, reload, drain) and process-wide state;
//! - [`listener`]: sockets, worker threads and downstream connections;
//! - [`proxy`]: the HTTP request path, top to bottom;
//! - [`routing`]: route matching and path normalization; [`framing`]: HTTP/1 request
//!   framing followed on the wire (Content-Length with Transfer-Encoding);
//! - [`cluster`]: endpoints, load balancing and upstream connection pools; [`health`]:
//!   outlier detection and active health checks; [`lb`]: hashing and locality algorithms;
//! - [`filters`]: the WebAssembly filter host;
//! - [`tls`]: mesh mTLS (SPIFFE identities, rotation); [`ca`]: `wasmesh ca`;
//! - [`telemetry`]: metrics and access log; [`admin`]: the admin endpoint.

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
