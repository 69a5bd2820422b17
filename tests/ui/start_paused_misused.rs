#[pgfixture::test(flavor = "multi_thread", start_paused = true)]
async fn paused(db: pgfixture::TestDb) {
    let _ = db;
}

#[pgfixture::test(start_paused = true)]
fn plain(db: pgfixture::sqlx::TestDb) {
    let _ = db;
}

fn main() {}
