//! The desktop explorer driven like a user would, through egui_kittest: open the demo
//! dataset, train on the CPU backend, watch maps and statistics update, pause, scrub the
//! timeline, stop, and reopen the run.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use picie::app::{ExplorerApp, Settings};
use picie::device::DeviceChoice;

type AppHarness<'a> = Harness<'a, ExplorerApp>;

/// Runs frames (the trainer works on its own thread meanwhile) until `done` holds.
fn step_until(harness: &mut AppHarness, what: &str, done: impl Fn(&ExplorerApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done(harness.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.step();
}

fn new_harness(cache: &std::path::Path) -> AppHarness<'static> {
    let mut app = ExplorerApp::with_settings(Settings::default(), false);
    app.cache_root = Some(cache.to_owned());
    Harness::builder()
        .with_size([1280.0, 800.0])
        .build_ui_state(|ui, app: &mut ExplorerApp| app.show(ui), app)
}

#[test]
fn a_user_trains_on_the_demo_watches_pauses_scrubs_and_reopens_the_run() {
    let cache = tempfile::tempdir().unwrap();
    let mut harness = new_harness(cache.path());

    // The start page offers the demo; one click generates and opens it.
    harness.get_by_label("Try the demo dataset").click();
    harness.run_steps(2);
    let images = harness.state().dataset.as_ref().map(|d| d.names.len());
    assert_eq!(images, Some(48), "the demo dataset is open");
    assert!(cache.path().join("demo/images").is_dir());
    // A new dataset opens on its thumbnails (they load in the background).
    assert!(harness.query_all_by_label_contains("48 images").count() >= 1);
    harness.get_by_label("demo_0000.png");

    // A short run on the CPU backend (the panel's values, set as a user would type them).
    {
        let config = &mut harness.state_mut().settings.config;
        config.epochs = 2;
        config.device = DeviceChoice::Cpu;
    }
    harness.get_by_label("Start").click();
    harness.step();
    step_until(&mut harness, "the first maps and steps", |app| {
        app.session
            .as_ref()
            .is_some_and(|s| s.timeline.len() >= 2 && !s.losses.is_empty())
    });
    harness.get_by_label_contains("epoch 1/2");
    // The maps are on screen, one tile per preview image, named.
    harness.get_by_label("demo_0000.png");
    let clusters = harness.state().cluster_count();
    assert_eq!(clusters, 8, "K defaults to the demo's 8 classes");
    // The cluster list names each cluster after the class it matches (the demo has labels).
    let listed = harness.query_all_by_label_contains("cluster 0 · ").count();
    assert!(listed >= 1, "cluster 0 is listed with its matched class");

    // Pause: the trainer stops at the next batch boundary and stays there.
    harness.get_by_label("Pause").click();
    step_until(&mut harness, "the pause", |app| {
        app.session.as_ref().is_some_and(|s| s.status.paused)
    });
    harness.get_by_label("Resume");
    let steps_when_paused = harness.state().session.as_ref().unwrap().losses.len();
    for _ in 0..25 {
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    let steps_after_waiting = harness.state().session.as_ref().unwrap().losses.len();
    assert_eq!(
        steps_when_paused, steps_after_waiting,
        "no steps while paused"
    );

    // Scrub the timeline back one snapshot with the keyboard, then forward with the slider's
    // neighbour key; the label says where we are.
    let snapshots = harness.state().session.as_ref().unwrap().timeline.len();
    harness.key_press(egui::Key::ArrowLeft);
    harness.run_steps(2);
    assert!(!harness.state().view.follow_latest);
    assert_eq!(harness.state().shown_snapshot_index(), Some(snapshots - 2));
    harness.get_by_label_contains(&format!("({}/{snapshots})", snapshots - 1));

    // Hovering a map reads out the cluster under the pointer.
    let tile = harness.get_by_label("demo_0000.png").rect();
    harness.hover_at(egui::pos2(tile.center().x, tile.min.y - 100.0));
    harness.run_steps(2);
    harness.get_by_label_contains("similarity to centroid");

    // Statistics: the cluster table and the curves.
    harness.get_by_label("Statistics").click();
    harness.run_steps(2);
    harness.get_by_label("Centroid similarity");
    harness.get_by_label("Matched class");
    harness.get_by_label("Loss terms");

    // Resume and let the run finish.
    harness.get_by_label("Resume").click();
    step_until(&mut harness, "the end of training", |app| {
        app.session.as_ref().is_some_and(|s| s.status.finished) && !app.is_training()
    });
    let session = harness.state().session.clone().unwrap();
    assert_eq!(session.clusters.iter().map(|c| c.epoch).max(), Some(2));
    assert_eq!(session.scores.iter().map(|s| s.epoch).max(), Some(2));
    assert!(session.status.error.is_none(), "{:?}", session.status.error);
    let run_dir = session.run_dir.clone();
    assert!(run_dir.join("explorer/session.json").is_file());
    assert!(run_dir.join("metrics.json").is_file());

    // A new window reopens the run as it was, without training.
    let mut reopened = new_harness(cache.path());
    reopened.state_mut().open_run(&run_dir);
    reopened.run_steps(2);
    let restored = reopened.state().session.clone().unwrap();
    assert_eq!(restored.timeline.len(), session.timeline.len());
    assert_eq!(restored.losses.len(), session.losses.len());
    assert!(!reopened.state().is_training());
    reopened.get_by_label("demo_0000.png");
    reopened.get_by_label_contains("epoch 2/2");
}
