//! `#[handler]` compile-time checks: good handlers compile; a wrong argument is an error that
//! names the argument.

#[test]
fn handler_macro() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
