#[pgfixture::test(fixtures("seed"))]
async fn nothing_to_seed() {}

fn main() {}
