//! Nothing but tests: `tests/sqlx_0_8.rs` runs `#[sqlx::test]`'s signatures of sqlx 0.8
//! under `#[pgfixture::test]`, with this crate's `migrations/` applied by pgfixture.
