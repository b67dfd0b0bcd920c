//! WASI for filters, without nested runtimes.
//!
//! Filters built with the standard library import WASI (`eprintln!`, panic messages,
//! debug builds). wasmtime-wasi's synchronous bindings implement every *blocking* WASI
//! call (`blocking-write-and-flush`, `pollable.block`, `poll`, stream drops, ...) by
//! running the async implementation on a Tokio `block_on` of the current runtime, which
//! panics on our current-thread worker runtimes ("Cannot start a runtime from within a
//! runtime"): a filter that wrote to stderr was killed.
//!
//! So after linking wasmtime-wasi, we shadow exactly those functions with versions that
//! poll the same async implementation **once** and never wait: the streams a filter can
//! reach (our log streams, the empty stdin) are always ready, so writes complete in that
//! one poll. Anything that would really wait (a sleep via a clock pollable) traps with a
//! clear message instead of blocking a worker thread: a filter asks the host to wait
//! with a `delay` action.
//!
//! The names below are wasmtime-wasi 48's (`wasi:io@0.2.12`); `tests` in
//! `proxy/tests/filter_host.rs` (`stderr_reaches_the_log`) fails if they stop shadowing.

use super::host::HostState;
use futures_util::FutureExt;
use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable as _};
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    self as wit, Host as _, HostInputStream, HostOutputStream,
};

/// The WASI version wasmtime-wasi 48 links (what guests' `@0.2.x` imports resolve to).
const IO_VERSION: &str = "0.2.12";

const WOULD_BLOCK: &str =
    "a filter may not block (wasi:io wait); ask the host for a `delay` action instead";

type Store<'a> = StoreContextMut<'a, HostState>;

fn table<'a>(store: &'a mut Store<'_>) -> &'a mut ResourceTable {
    store.data_mut().table()
}

/// Turn a stream result into the WIT `result<T, stream-error>` (traps stay traps).
fn lower<T>(
    table: &mut ResourceTable,
    r: Option<StreamResult<T>>,
) -> wasmtime::Result<(Result<T, wit::StreamError>,)> {
    match r.unwrap_or_else(|| Err(StreamError::trap(WOULD_BLOCK))) {
        Ok(v) => Ok((Ok(v),)),
        Err(e) => Ok((Err(table.convert_stream_error(e)?),)),
    }
}

/// Replace wasmtime-wasi's blocking `wasi:io` functions in `linker` (which must already
/// hold wasmtime-wasi's sync bindings) with never-blocking ones.
pub fn shadow_blocking_io(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut s = linker.instance(&format!("wasi:io/streams@{IO_VERSION}"))?;
    s.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store, rep| {
            let t = table(&mut store);
            HostOutputStream::drop(t, Resource::new_own(rep))
                .now_or_never()
                .unwrap_or(Ok(()))
        },
    )?;
    s.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut store, rep| {
            let t = table(&mut store);
            HostInputStream::drop(t, Resource::new_own(rep))
                .now_or_never()
                .unwrap_or(Ok(()))
        },
    )?;
    s.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store: Store<'_>, (st, bytes): (Resource<DynOutputStream>, Vec<u8>)| {
            let t = table(&mut store);
            let r = t.blocking_write_and_flush(st, bytes).now_or_never();
            lower(t, r)
        },
    )?;
    s.func_wrap(
        "[method]output-stream.blocking-write-zeroes-and-flush",
        |mut store: Store<'_>, (st, len): (Resource<DynOutputStream>, u64)| {
            let t = table(&mut store);
            let r = t.blocking_write_zeroes_and_flush(st, len).now_or_never();
            lower(t, r)
        },
    )?;
    s.func_wrap(
        "[method]output-stream.blocking-flush",
        |mut store: Store<'_>, (st,): (Resource<DynOutputStream>,)| {
            let t = table(&mut store);
            let r = t.blocking_flush(st).now_or_never();
            lower(t, r)
        },
    )?;
    s.func_wrap(
        "[method]output-stream.blocking-splice",
        |mut store: Store<'_>,
         (dst, src, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)| {
            let t = table(&mut store);
            let r = t.blocking_splice(dst, src, len).now_or_never();
            lower(t, r)
        },
    )?;
    s.func_wrap(
        "[method]input-stream.blocking-read",
        |mut store: Store<'_>, (st, len): (Resource<DynInputStream>, u64)| {
            let t = table(&mut store);
            let r = t.blocking_read(st, len).now_or_never();
            lower(t, r)
        },
    )?;
    s.func_wrap(
        "[method]input-stream.blocking-skip",
        |mut store: Store<'_>, (st, len): (Resource<DynInputStream>, u64)| {
            let t = table(&mut store);
            let r = t.blocking_skip(st, len).now_or_never();
            lower(t, r)
        },
    )?;

    let mut p = linker.instance(&format!("wasi:io/poll@{IO_VERSION}"))?;
    p.func_wrap(
        "poll",
        |mut store: Store<'_>, (list,): (Vec<Resource<DynPollable>>,)| {
            let t = table(&mut store);
            match t.poll(list).now_or_never() {
                Some(r) => r.map(|v| (v,)),
                None => Err(wasmtime::format_err!("{WOULD_BLOCK}")),
            }
        },
    )?;
    p.func_wrap(
        "[method]pollable.block",
        |mut store: Store<'_>, (pollable,): (Resource<DynPollable>,)| {
            let t = table(&mut store);
            match t.block(pollable).now_or_never() {
                Some(r) => r,
                None => Err(wasmtime::format_err!("{WOULD_BLOCK}")),
            }
        },
    )?;
    p.func_wrap(
        "[method]pollable.ready",
        |mut store: Store<'_>, (pollable,): (Resource<DynPollable>,)| {
            let t = table(&mut store);
            t.ready(pollable)
                .now_or_never()
                .unwrap_or(Ok(false))
                .map(|r| (r,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
