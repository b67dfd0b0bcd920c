//! Log through the proxy's logger; lines carry the filter's name.
//!
//! ```ignore
//! wasmesh_sdk::log::info("configured");
//! wasmesh_sdk::info!("user {} denied", user);
//! ```

use crate::bindings::wasmesh::filter::host;
use crate::LogLevel;

/// Write `message` at `level`.
///
/// ```ignore
/// wasmesh_sdk::log::log(wasmesh_sdk::LogLevel::Warn, "odd header");
/// ```
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message)
}

/// Write at debug level.
///
/// ```ignore
/// wasmesh_sdk::log::debug("seen");
/// ```
pub fn debug(message: &str) {
    log(LogLevel::Debug, message)
}

/// Write at info level.
///
/// ```ignore
/// wasmesh_sdk::log::info("configured");
/// ```
pub fn info(message: &str) {
    log(LogLevel::Info, message)
}

/// Write at warn level.
///
/// ```ignore
/// wasmesh_sdk::log::warn("odd header");
/// ```
pub fn warn(message: &str) {
    log(LogLevel::Warn, message)
}

/// Write at error level.
///
/// ```ignore
/// wasmesh_sdk::log::error("bad state");
/// ```
pub fn error(message: &str) {
    log(LogLevel::Error, message)
}

/// `format!`-style info log: `wasmesh_sdk::info!("n = {}", n)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::info(&::std::format!($($arg)*)) };
}

/// `format!`-style warn log: `wasmesh_sdk::warn!("n = {}", n)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::warn(&::std::format!($($arg)*)) };
}

/// `format!`-style debug log: `wasmesh_sdk::debug!("n = {}", n)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::debug(&::std::format!($($arg)*)) };
}
