use pgfixture::sqlx::PgPool;
use pgfixture::sqlx::postgres::PgPoolOptions;

#[pgfixture::test]
async fn options_and_a_pool(opts: PgPoolOptions, pool: PgPool) {
    let _ = (opts, pool);
}

fn main() {}
