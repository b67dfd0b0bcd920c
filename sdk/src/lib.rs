//! Write [wasmesh](https://example.invalid/wasmesh) filters in Rust.
//!
//! A filter is a type that implements [`Filter`]: it is built once per instance from
//! the manifest's JSON `config` by [`Filter::configure`], says which hooks it implements
//! with [`Filter::HOOKS`], and overrides those hooks; every hook has a default that does
//! nothing and returns [`Action::Continue`]. [`export_filter!`] exports it.
//!
//! ```ignore
//! use wasmesh_sdk::{export_filter, Action, Filter, Hooks, Request};
//!
//! struct Hello;
//!
//! impl Filter for Hello {
//!     const HOOKS: Hooks = Hooks::REQUEST_HEADERS;
//!     fn configure(_config: &str) -> Result<Self, String> {
//!         Ok(Hello)
//!     }
//!     fn on_request_headers(&mut self, req: &Request) -> Action {
//!         let _ = req.set_header("x-hello", "world");
//!         Action::Continue
//!     }
//! }
//!
//! export_filter!(Hello);
//! ```
//!
//! Build with `cargo build --profile filter --target wasm32-wasip2 -p NAME` (crate type
//! `cdylib`). The contract with the host is the WIT package in `sdk/wit/filter.wit`;
//! read it for the exact meaning of each call.
//!
//! The SDK does not panic: hooks that run while the filter is not configured (or
//! re-entered, which the host never does) return [`Action::Continue`].

// wit-bindgen's generated glue is `unsafe` by nature; the rest of this crate is safe code.
#![allow(unsafe_code)]

extern crate self as wasmesh_sdk;

/// Raw bindings generated from `wit/filter.wit` by wit-bindgen. Prefer the re-exports at
/// the crate root; these are public for the [`export_filter!`] macro.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "filter",
        pub_export_macro: true,
        export_macro_name: "__export_filter_world",
        default_bindings_module: "::wasmesh_sdk::bindings",
        runtime_path: "::wasmesh_sdk::__rt::wit_bindgen::rt",
        bitflags_path: "::wasmesh_sdk::__rt::wit_bindgen::rt::bitflags",
    });
}

// Hooks make and drop many small blocks; see `alloc` for why and how.
#[cfg(all(target_arch = "wasm32", feature = "fast-alloc"))]
#[global_allocator]
static ALLOC: alloc::FreeListAlloc = alloc::FreeListAlloc::new();

#[doc(hidden)]
pub mod __rt {
    pub use wit_bindgen;
}

#[cfg(all(target_arch = "wasm32", feature = "fast-alloc"))]
mod alloc;
pub mod crypto;
mod effects;
pub mod log;
pub mod metrics;
mod request;
pub mod state;
mod types;

pub use bindings::wasmesh::filter::types::{
    Action, CalloutRequest, CalloutResponse, Delay, Header, Hooks, LocalResponse, LogLevel, Outcome,
};
pub use request::{Request, Response};

/// Wall-clock time in nanoseconds since the Unix epoch (the host's clock).
///
/// ```ignore
/// let started = wasmesh_sdk::now_unix_nanos();
/// ```
pub fn now_unix_nanos() -> u64 {
    bindings::wasmesh::filter::host::now_unix_nanos()
}

/// Monotonic time in nanoseconds from an arbitrary point: use it to measure durations.
///
/// ```ignore
/// let t0 = wasmesh_sdk::monotonic_nanos();
/// ```
pub fn monotonic_nanos() -> u64 {
    bindings::wasmesh::filter::host::monotonic_nanos()
}

/// A random number from the host (fast, not for cryptographic keys).
///
/// ```ignore
/// let sampled = wasmesh_sdk::random_u64() % 100 < 5; // 5 %
/// ```
pub fn random_u64() -> u64 {
    bindings::wasmesh::filter::host::random_u64()
}

/// A wasmesh filter. Implement the hooks you need and list them in [`Filter::HOOKS`];
/// the host calls only those (each call into a filter costs a few hundred nanoseconds).
/// Add `Hooks::PASS_*` flags for the request data read on every request
/// ([`Request::id`], [`Request::method`], [`Request::path`], [`Request::source_address`]):
/// the host then hands it over with `on_request_headers` instead of one call per read.
///
/// One value of this type lives in each filter instance; an instance serves many
/// requests, one hook at a time, so per-request state must be keyed by
/// [`Request::id`] and dropped in [`Filter::on_done`].
///
/// ```ignore
/// struct Deny;
/// impl wasmesh_sdk::Filter for Deny {
///     const HOOKS: wasmesh_sdk::Hooks = wasmesh_sdk::Hooks::REQUEST_HEADERS;
///     fn configure(_: &str) -> Result<Self, String> { Ok(Deny) }
///     fn on_request_headers(&mut self, _: &wasmesh_sdk::Request) -> wasmesh_sdk::Action {
///         wasmesh_sdk::Action::respond(403, "denied")
///     }
/// }
/// ```
pub trait Filter: Sized + 'static {
    /// The hooks this filter implements, e.g. `Hooks::REQUEST_HEADERS | Hooks::DONE`.
    const HOOKS: Hooks;

    /// Build the filter from the manifest's `config` (JSON text, `null` when absent).
    /// An error fails the load of this filter version, and is shown on `/filters`.
    fn configure(config: &str) -> Result<Self, String>;

    /// The hooks to call, decided after configuration. Default: [`Filter::HOOKS`].
    /// Override it when the configuration decides, e.g. to ask for bodies only when needed.
    fn hooks(&self) -> Hooks {
        Self::HOOKS
    }

    /// The request head arrived: read or change headers and path, choose a cluster,
    /// answer locally, delay or call out.
    fn on_request_headers(&mut self, req: &Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// The whole request body is buffered: read it with [`Request::body`], replace it
    /// with [`Request::set_body`].
    fn on_request_body(&mut self, req: &Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// The response head arrived (reverse chain order). `req` is read-only here.
    fn on_response_headers(&mut self, req: &Request, resp: &Response) -> Action {
        let _ = (req, resp);
        Action::Continue
    }

    /// The whole response body is buffered: [`Response::body`], [`Response::set_body`].
    fn on_response_body(&mut self, req: &Request, resp: &Response) -> Action {
        let _ = (req, resp);
        Action::Continue
    }

    /// The request is over: log, count, drop per-request state.
    fn on_done(&mut self, req: &Request, outcome: &Outcome) {
        let _ = (req, outcome);
    }

    /// The answer to a [`Action::Callout`] this filter returned; `resp` is present when
    /// the callout came from a response hook. Returns the hook's next action.
    fn on_callout_response(
        &mut self,
        req: &Request,
        resp: Option<&Response>,
        answer: Result<CalloutResponse, String>,
    ) -> Action {
        let _ = (req, resp, answer);
        Action::Continue
    }
}

/// Glue between the generated `Guest` trait and a [`Filter`]; used by [`export_filter!`].
#[doc(hidden)]
pub mod __glue {
    use super::*;
    use crate::bindings::wasmesh::filter::hook;
    use crate::bindings::wasmesh::filter::types::Prefetched;
    use crate::request::{REQUEST, RESPONSE};
    use std::cell::RefCell;
    use std::thread::LocalKey;

    /// Where the exported filter value lives (one per instance).
    pub type Slot<F> = LocalKey<RefCell<Option<F>>>;

    pub fn configure<F: Filter>(slot: &'static Slot<F>, config: String) -> Result<Hooks, String> {
        // Panic messages go to the host's log (tagged with the filter's name) through the
        // wasmesh API rather than WASI stderr.
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::error(&format!("filter panicked: {info}"));
            }))
        });
        let filter = F::configure(&config)?;
        let hooks = filter.hooks();
        slot.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => {
                *s = Some(filter);
                Ok(hooks)
            }
            Err(_) => Err("configure re-entered".to_string()),
        })
    }

    /// Run `f` on the configured filter; `default` when there is none.
    pub fn with<F: Filter, R>(
        slot: &'static Slot<F>,
        default: R,
        f: impl FnOnce(&mut F) -> R,
    ) -> R {
        slot.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => match s.as_mut() {
                Some(filter) => f(filter),
                None => default,
            },
            Err(_) => default,
        })
    }

    /// Run one hook: the effects it records, then its action unless it continues, go to
    /// the host (a hook that continues with no effects makes no call back).
    pub fn hook<F: Filter>(
        slot: &'static Slot<F>,
        pre: Option<Prefetched>,
        f: impl FnOnce(&mut F, &Request, &Response) -> Action,
    ) {
        crate::effects::begin(pre);
        // No default `Action` to build and drop when the filter is not there: `None`.
        let action = slot.with(|cell| {
            let mut filter = cell.try_borrow_mut().ok()?;
            Some(f(filter.as_mut()?, &REQUEST, &RESPONSE))
        });
        crate::effects::end();
        match action {
            Some(action) if !matches!(action, Action::Continue) => hook::set_action(&action),
            // `Continue` owns nothing: forgetting it skips a call to the enum's drop glue
            // (out of line, it would run on every hook only to find nothing to free).
            nothing => std::mem::forget(nothing),
        }
    }

    /// Run `on-done`, which has no action: only its effects go back.
    pub fn done<F: Filter>(slot: &'static Slot<F>, outcome: &Outcome) {
        crate::effects::begin(None);
        with(slot, (), |filter| filter.on_done(&REQUEST, outcome));
        crate::effects::end();
    }
}

/// Export a [`Filter`] type as the component's hooks. Use it once, at the crate root of a
/// `cdylib` filter crate.
///
/// ```ignore
/// wasmesh_sdk::export_filter!(MyFilter);
/// ```
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        const _: () = {
            ::std::thread_local! {
                static __WASMESH_FILTER: ::core::cell::RefCell<::core::option::Option<$filter>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            type __Pre = $crate::bindings::wasmesh::filter::types::Prefetched;
            type __Answer = ::core::result::Result<$crate::CalloutResponse, ::std::string::String>;
            struct __WasmeshGlue;
            impl $crate::bindings::Guest for __WasmeshGlue {
                fn configure(
                    config: ::std::string::String,
                ) -> ::core::result::Result<$crate::Hooks, ::std::string::String> {
                    $crate::__glue::configure::<$filter>(&__WASMESH_FILTER, config)
                }
                fn on_request_headers(pre: __Pre) {
                    $crate::__glue::hook(
                        &__WASMESH_FILTER,
                        ::core::option::Option::Some(pre),
                        |f, req, _| <$filter as $crate::Filter>::on_request_headers(f, req),
                    )
                }
                fn on_request_body() {
                    $crate::__glue::hook(
                        &__WASMESH_FILTER,
                        ::core::option::Option::None,
                        |f, req, _| <$filter as $crate::Filter>::on_request_body(f, req),
                    )
                }
                fn on_response_headers() {
                    $crate::__glue::hook(
                        &__WASMESH_FILTER,
                        ::core::option::Option::None,
                        |f, req, resp| {
                            <$filter as $crate::Filter>::on_response_headers(f, req, resp)
                        },
                    )
                }
                fn on_response_body() {
                    $crate::__glue::hook(
                        &__WASMESH_FILTER,
                        ::core::option::Option::None,
                        |f, req, resp| <$filter as $crate::Filter>::on_response_body(f, req, resp),
                    )
                }
                fn on_done(outcome: $crate::Outcome) {
                    $crate::__glue::done(&__WASMESH_FILTER, &outcome)
                }
                fn on_callout_response(from_response: bool, answer: __Answer) {
                    $crate::__glue::hook(
                        &__WASMESH_FILTER,
                        ::core::option::Option::None,
                        |f, req, resp| {
                            let resp = from_response.then_some(resp);
                            <$filter as $crate::Filter>::on_callout_response(f, req, resp, answer)
                        },
                    )
                }
            }
    $crate::bindings::__export_filter_world!(__WasmeshGlue with_types_in $crate::bindings);
        };
    };
}
