//! Host functions that filters call on every request, defined by hand over the generated
//! ones (the linker allows shadowing; see [`shadow_hot_calls`]).
//!
//! The generated bindings lift every `string` and `list<u8>` argument into a fresh
//! `String` or `Vec`: an allocation and a free per argument, per call. For the calls a
//! chain makes on every request (setting a header, taking a rate-limit token, handing a
//! hook's effects), that was a fifth of the host's allocations on a three-filter request.
//! Here the arguments are copied out of the instance's memory into buffers the instance's
//! state keeps between calls, and handed to the same [`HostState`] methods as the
//! generated functions' (which stay, for the calls not listed here).

use super::host::HostState;
use std::ops::Range;
use wasmtime::component::{Linker, WasmList, WasmStr};
use wasmtime::StoreContextMut;

/// The filter interface's version: the instances whose functions are shadowed. Checked
/// against the WIT file by a test, since shadowing a name the interface does not use would
/// silently change nothing.
const FILTER_VERSION: &str = "0.3.0";

/// A kept scratch buffer grown past this (by a long header value) is freed, not kept.
const MAX_KEPT: usize = 16 * 1024;

type Store<'a> = StoreContextMut<'a, HostState>;

/// Replace the generated `hook.add-effects`, `request.set-header` and `add-header`,
/// `response.set-header` and `add-header`, and `host.state-take-token` in `linker` (which
/// must already hold the generated ones).
pub fn shadow_hot_calls(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);

    let mut hook = linker.instance(&format!("wasmesh:filter/hook@{FILTER_VERSION}"))?;
    hook.func_wrap(
        "add-effects",
        |mut store: Store<'_>, (list,): (WasmList<u8>,)| {
            let Some(mut buf) = store.data_mut().take_effects(list.len()) else {
                return Ok(());
            };
            buf.extend_from_slice(list.as_le_slice(&store));
            store.data_mut().put_effects(buf);
            Ok(())
        },
    )?;

    for (interface, response) in [("request", false), ("response", true)] {
        let mut i = linker.instance(&format!("wasmesh:filter/{interface}@{FILTER_VERSION}"))?;
        for (name, append) in [("set-header", false), ("add-header", true)] {
            i.func_wrap(
                name,
                move |mut store: Store<'_>, (n, v): (WasmStr, WasmStr)| {
                    let (buf, [n, v]) = lift(&mut store, [&n, &v])?;
                    let data = store.data_mut();
                    let r = match (buf.get(n), buf.get(v)) {
                        (Some(n), Some(v)) => data.change_header(response, n, v, append),
                        _ => Err("header out of range".to_string()),
                    };
                    give_back(data, buf);
                    Ok((r,))
                },
            )?;
        }
    }

    let mut host = linker.instance(&format!("wasmesh:filter/host@{FILTER_VERSION}"))?;
    host.func_wrap(
        "state-take-token",
        |mut store: Store<'_>, (key, burst, interval): (WasmStr, u64, u64)| {
            let (buf, [key]) = lift(&mut store, [&key])?;
            let data = store.data_mut();
            let r = match buf.get(key) {
                Some(key) => data.take_token(key, burst, interval),
                None => Err("key out of range".to_string()),
            };
            give_back(data, buf);
            Ok((r,))
        },
    )?;
    Ok(())
}

/// Copy `strs` out of the instance's memory, back to back, into the state's scratch
/// string (taken out of the state: hand it back with [`give_back`]); with the range of
/// each. A string that is not valid UTF-8 is an error (a trap), as in the generated code.
fn lift<const N: usize>(
    store: &mut Store<'_>,
    strs: [&WasmStr; N],
) -> wasmtime::Result<(String, [Range<usize>; N])> {
    let mut buf = std::mem::take(&mut store.data_mut().scratch);
    buf.clear();
    let mut ranges = [(); N].map(|()| 0..0);
    for (s, range) in strs.into_iter().zip(ranges.iter_mut()) {
        let start = buf.len();
        buf.push_str(&s.to_str(&*store)?);
        *range = start..buf.len();
    }
    Ok((buf, ranges))
}

fn give_back(data: &mut HostState, buf: String) {
    if buf.capacity() <= MAX_KEPT {
        data.scratch = buf;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shadowed_instances_are_the_interface_s() {
        let wit = include_str!("../../../sdk/wit/filter.wit");
        let package = format!("package wasmesh:filter@{};", super::FILTER_VERSION);
        assert!(wit.contains(&package), "the WIT file declares {package}");
    }
}
