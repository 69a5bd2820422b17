static MIGRATOR: &str = "migrations";

#[pgfixture::test(migrator = "MIGRATOR")]
async fn takes_a_string_for_a_migrator(db: pgfixture::TestDb) {
    let _ = db;
}

fn main() {}
