#[pgfixture::test(migrations = "no/such/migrations")]
async fn migrated(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
