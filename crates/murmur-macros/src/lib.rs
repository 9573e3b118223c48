//! The `#[handler]` attribute macro for murmur watchers (work in progress).
