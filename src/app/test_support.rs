//! A window with a fake session, for panel tests.

use super::{ExplorerApp, Settings};
use crate::session::SessionState;
use crate::train::ClusterStatistics;

/// The window showing a finished run of three clusters in `run_dir`, nothing else open.
pub(super) fn app_with_three_clusters(run_dir: &std::path::Path) -> ExplorerApp {
    let mut app = ExplorerApp::with_settings(Settings::default(), false);
    let mut session = SessionState::new(run_dir);
    session.clusters.push(ClusterStatistics {
        epoch: 1,
        pixel_share: vec![0.5, 0.3, 0.2],
        compactness: vec![0.9; 3],
        images_with_cluster: vec![4; 3],
        label_change: None,
        centroids: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
        dim: 2,
    });
    app.session = Some(session);
    app.load_labels();
    app
}
