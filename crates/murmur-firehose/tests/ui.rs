//! `#[handler]` compile errors: a wrong argument is one error that names the argument; a
//! handler whose arguments give no route, or two, is an error naming the handler.
//!
//! Only compile-fail cases live here, so trybuild runs `cargo check` (no codegen of the
//! dependency tree in its own target dir); handlers that compile, and what they do, are
//! tested in tests/handlers.rs with the ordinary test build.

#[test]
fn handler_macro() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail_*.rs");
}
