#![allow(unsafe_code)]
extern crate self as wasmesh_sdk;
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "filter",
        pub_export_macro: true,
        export_macro_name: "__export_filter_world",
        default_bindings_module: "::wasmesh_sdk::bindings",
        runtime_path: "::wasmesh_sdk::__rt::wit_bindgen::rt",
        bitflags_path: "::wasmesh_sdk::__rt::wit_bindgen::rt::bitflags",
        debug: true,
    });
}
#[doc(hidden)]
pub mod __rt { pub use wit_bindgen; }
