#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter("pgfixture=debug")
        .init();
    let db = pgfixture::worker_db().await.unwrap();
    let n: i64 = db
        .query_one("select count(*) from users", &[])
        .await
        .unwrap()
        .get(0);
    println!("users: {n} worker {}", db.worker_id());
}
