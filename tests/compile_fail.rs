//! Misuse of `#[pgfixture::test]` is a compile error that says what to write.
//!
//! The expected messages are rustc's with the default features: with more (`sqlx`),
//! rustc spells some type names in full, so `scripts/test.sh` runs this file with the
//! default features, and builds with others mark it ignored rather than fail it.

#[test]
#[cfg_attr(
    feature = "sqlx",
    ignore = "the expected messages are those of a build with the default features; scripts/test.sh runs it so"
)]
fn misuse_of_the_attribute_is_a_compile_error() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
