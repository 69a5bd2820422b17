#[pgfixture::test(fixtures("no_such_fixture"))]
async fn seeded(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
