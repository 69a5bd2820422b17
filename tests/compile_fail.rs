//! Misuse of `#[pgfixture::test]` is a compile error that says what to write.

#[test]
fn misuse_of_the_attribute_is_a_compile_error() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
