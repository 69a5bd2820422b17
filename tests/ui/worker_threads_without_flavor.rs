#[pgfixture::test(worker_threads = 2)]
async fn threads(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
