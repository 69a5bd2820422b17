#[pgfixture::test(retries = 3)]
async fn flaky(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
