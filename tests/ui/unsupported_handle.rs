#[pgfixture::test]
async fn takes_a_string(url: String) {
    let _ = url;
}

fn main() {}
