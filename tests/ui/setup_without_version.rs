async fn bootstrap(_url: pgfixture::DatabaseUrl) -> Result<(), std::io::Error> {
    Ok(())
}

#[pgfixture::test(setup = "bootstrap")]
async fn needs_a_version(_db: pgfixture::TestDb) {}

#[pgfixture::test(setup_version = "1")]
async fn needs_code(_db: pgfixture::TestDb) {}

#[pgfixture::test(setup = "bootstrap", setup_version = "1")]
fn needs_a_handle() {}

fn main() {}
