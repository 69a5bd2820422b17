use pgfixture::sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[pgfixture::test]
fn plain(opts: PgPoolOptions, connect: PgConnectOptions) {
    let _ = (opts, connect);
}

fn main() {}
