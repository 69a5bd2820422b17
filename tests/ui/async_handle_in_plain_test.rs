#[pgfixture::test]
fn plain(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
