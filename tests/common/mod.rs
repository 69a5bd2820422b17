//! Helpers shared by the server-backed test suites.

use pgfixture::testcontainers::bollard;
use pgfixture::testcontainers::bollard::models::ContainerSummary;

/// The Docker daemon, when one answers.
pub async fn docker() -> Option<bollard::Docker> {
    bollard::Docker::connect_with_local_defaults()
        .ok()?
        .negotiate_version()
        .await
        .ok()
}

/// The containers (running or not) that pgfixture labelled as made by `run`; none
/// when no Docker daemon answers.
pub async fn run_containers(run: &str) -> Vec<ContainerSummary> {
    let Some(docker) = docker().await else {
        return Vec::new();
    };
    let options = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&std::collections::HashMap::from([(
            "label",
            vec![format!("pgfixture.run={run}")],
        )]))
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
}
