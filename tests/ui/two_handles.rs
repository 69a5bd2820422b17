#[pgfixture::test]
async fn two(db: pgfixture::TestDb, other: pgfixture::TestDb) {
    let _ = (db, other);
}

fn main() {}
