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

    // Every widget has a name a screen reader can say, on each screen the user passes.
    harness.check_accessibility();
    // The start page offers the demo; one click generates and opens it.
    harness.get_by_label("Try the demo dataset").click();
    harness.run_steps(2);
    let images = harness.state().dataset.as_ref().map(|d| d.names.len());
    assert_eq!(images, Some(48), "the demo dataset is open");
    assert!(cache.path().join("demo/images").is_dir());
    // Without ImageNet weights in the cache the demo offers to download them and says what
    // random init will look like; this user declines.
    harness.get_by_label("ImageNet weights for the demo");
    harness.get_by_label("Download (14 MB)");
    harness.get_by_label("Train from random weights").click();
    harness.run_steps(2);
    assert!(
        harness
            .query_by_label("ImageNet weights for the demo")
            .is_none(),
        "the offer closes"
    );
    assert!(harness.state().settings.config.random_init);
    harness.get_by_label_contains("The demo trains from random weights:");
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
    harness.check_accessibility();
    // The maps are on screen, one tile per preview image, named.
    harness.get_by_label("demo_0000.png");
    let clusters = harness.state().cluster_count();
    assert_eq!(clusters, 8, "K defaults to the demo's 8 classes");
    // The cluster list names each cluster after the class it matches (the demo has labels).
    let name = harness.state().cluster_name(0);
    assert!(name.starts_with("cluster 0 · "), "{name}");
    let name_fields = harness
        .get_all_by_role(egui::accesskit::Role::TextInput)
        .count();
    assert_eq!(name_fields, 8, "one name field per cluster");

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

/// After training: click a pixel for similar patches, name and merge clusters with undo,
/// export the masks from the app, and check the app's score equals `picie eval --masks`.
#[test]
fn a_user_inspects_names_merges_and_exports_a_finished_run() {
    use picie::labelmap::{LabelEdit, LabelMap};

    let cache = tempfile::tempdir().unwrap();
    let mut harness = new_harness(cache.path());
    harness.get_by_label("Try the demo dataset").click();
    harness.run_steps(2);
    harness.get_by_label("Train from random weights").click();
    harness.run_steps(2);
    {
        let config = &mut harness.state_mut().settings.config;
        config.epochs = 1;
        config.device = DeviceChoice::Cpu;
    }
    harness.get_by_label("Start").click();
    step_until(&mut harness, "the end of training", |app| {
        app.session.as_ref().is_some_and(|s| s.status.finished) && !app.is_training()
    });
    let run_dir = harness.state().session.as_ref().unwrap().run_dir.clone();
    assert!(
        run_dir.join("bank").is_dir(),
        "training leaves a feature bank"
    );
    harness.check_accessibility();

    // A pixel of the first image (as a click on its map does): similar patches are found.
    harness
        .state_mut()
        .query_similar_patches("demo_0000.png", 0.3, 0.7);
    step_until(&mut harness, "the gallery", |app| {
        app.gallery.result.is_some()
    });
    let result = harness.state().gallery.result.clone().unwrap();
    assert_eq!(result.hits.len(), 24);
    harness.check_accessibility();
    assert_eq!(
        result.hits[0].image, "demo_0000.png",
        "the best match is the patch itself"
    );
    assert!(result.hits[0].similarity > 0.999);
    assert!(
        result
            .hits
            .windows(2)
            .all(|w| w[0].similarity >= w[1].similarity)
    );
    harness.get_by_label_contains("exact search over");

    // Name a cluster in the list by typing, as a user would.
    harness
        .get_all_by_role(egui::accesskit::Role::TextInput)
        .next()
        .expect("a name field per cluster")
        .focus();
    harness.run_steps(2);
    harness
        .get_all_by_role(egui::accesskit::Role::TextInput)
        .next()
        .unwrap()
        .type_text("sky blue");
    harness.run_steps(2);
    harness.key_press(egui::Key::Enter);
    harness.run_steps(2);
    let saved = LabelMap::load_or_new(&run_dir, 8).unwrap();
    assert_eq!(saved.name(0), "sky blue", "names are saved at once");
    assert_eq!(harness.state().cluster_name(0), "sky blue");
    assert!(harness.query_all_by_value("sky blue").count() >= 1);

    // Merge 1 into 0 and ignore 2; undo both with the buttons, redo one.
    harness.state_mut().edit_labels(LabelEdit::Merge {
        sources: vec![1],
        into: 0,
    });
    harness.state_mut().edit_labels(LabelEdit::SetIgnored {
        cluster: 2,
        ignored: true,
    });
    harness.run_steps(2);
    harness.get_by_label("unmerge 1");
    harness.get_by_label("Undo").click();
    harness.run_steps(2);
    harness.get_by_label("Undo").click();
    harness.run_steps(2);
    assert!(harness.query_by_label("unmerge 1").is_none());
    harness.get_by_label("Redo").click();
    harness.run_steps(2);
    harness.get_by_label("unmerge 1");
    let saved = LabelMap::load_or_new(&run_dir, 8).unwrap();
    assert_eq!(saved.root(1), 0);
    assert!(!saved.is_ignored(2));

    // Export from the app, then score the written masks like `picie eval --masks`.
    let out = cache.path().join("export");
    harness.state_mut().export.out = Some(out.clone());
    harness.get_by_label("File").click();
    harness.run_steps(2);
    harness.get_by_label("Export segmentations…").click();
    harness.run_steps(2);
    harness.check_accessibility();
    harness.get_by_label("Export").click();
    step_until(&mut harness, "the export", |app| {
        app.export.report.is_some()
    });
    let report = harness.state().export.report.clone().unwrap();
    assert_eq!(report.written, 48);
    assert!(report.failed.is_empty());
    assert!(out.join("index/demo_0000.png").is_file());
    assert!(out.join("colour/demo_0047.png").is_file());
    assert!(out.join("legend.json").is_file());
    harness.get_by_label("Score against labels").click();
    step_until(&mut harness, "the score", |app| app.export.score.is_some());
    let (accuracy, miou) = harness.state().export.score.unwrap();
    let demo = cache.path().join("demo");
    let folder =
        picie::data::ImageFolder::scan(&demo.join("images"), Some(&demo.join("labels"))).unwrap();
    let from_files = picie::eval::score_mask_folder(&out.join("index"), &folder).unwrap();
    assert!(
        (from_files.accuracy - accuracy).abs() < 1e-9,
        "{from_files:?} vs {accuracy}"
    );
    assert!((from_files.mean_iou - miou).abs() < 1e-9);

    // A run without a feature bank: the gallery says so and builds one on request.
    std::fs::remove_dir_all(run_dir.join("bank")).unwrap();
    harness.state_mut().gallery = Default::default();
    harness
        .state_mut()
        .query_similar_patches("demo_0003.png", 0.5, 0.5);
    step_until(&mut harness, "the missing-bank message", |app| {
        app.gallery.error.is_some()
    });
    let error = harness.state().gallery.error.clone().unwrap();
    assert!(error.contains("no feature bank"), "{error}");
    harness.get_by_label_contains("no feature bank");
    harness.get_by_label("Build the feature bank").click();
    step_until(&mut harness, "the rebuilt bank's answer", |app| {
        app.gallery.result.is_some()
    });
    assert!(run_dir.join("bank").is_dir());
    assert_eq!(
        harness.state().gallery.result.as_ref().unwrap().hits[0].image,
        "demo_0003.png"
    );
}

/// The first run a new user makes: with torchvision's MobileNetV2 in the cache (the shared
/// copy stands in for the download), the demo starts from it and its scores rise well above
/// the untrained network's.
#[test]
fn the_demo_starts_from_imagenet_weights_and_finds_the_scenes_parts() {
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("weights")).unwrap();
    std::fs::copy(
        "../shared/weights/mobilenet_v2-imagenet.pth",
        cache.path().join("weights/mobilenet_v2-b0353104.pth"),
    )
    .unwrap();
    let mut harness = new_harness(cache.path());
    harness.get_by_label("Try the demo dataset").click();
    harness.run_steps(2);
    let settings = &harness.state().settings;
    assert_eq!(
        settings.config.input_size, 128,
        "the ImageNet demo settings"
    );
    assert!(!settings.config.random_init);
    assert!(
        harness
            .query_by_label("ImageNet weights for the demo")
            .is_none(),
        "no download offer when the weights are cached"
    );
    harness.state_mut().settings.config.device = DeviceChoice::Cpu;
    harness.get_by_label("Start").click();
    harness.step();
    step_until(&mut harness, "the demo run to finish", |app| {
        app.session
            .as_ref()
            .is_some_and(|s| s.status.finished || s.status.error.is_some())
    });
    let session = harness.state().session.clone().unwrap();
    assert!(session.status.error.is_none(), "{:?}", session.status.error);
    assert!(
        session.status.weights.contains("mobilenet_v2-b0353104.pth"),
        "{}",
        session.status.weights
    );
    let score = |epoch: usize| {
        session
            .scores
            .iter()
            .find(|score| score.epoch == epoch)
            .unwrap_or_else(|| panic!("no score for epoch {epoch}"))
            .clone()
    };
    let (untrained, last) = (score(0), score(6));
    eprintln!(
        "demo: untrained {:.2} / {:.2}, epoch 6 {:.2} / {:.2}",
        untrained.accuracy, untrained.mean_iou, last.accuracy, last.mean_iou
    );
    assert!(
        last.accuracy >= untrained.accuracy + 8.0 && last.accuracy >= 68.0,
        "Acc {:.2} untrained, {:.2} after the demo",
        untrained.accuracy,
        last.accuracy
    );
    assert!(last.mean_iou >= 38.0, "mIoU {:.2}", last.mean_iou);

    // The cluster list names a cluster after the class under its own pixels: for the three
    // clusters covering most of the final maps, the named class is the commonest label there.
    let snapshot = session.timeline.latest().expect("maps were shown");
    let classes = session.class_names.clone().expect("the demo has classes");
    let mut votes: std::collections::HashMap<u16, Vec<usize>> = Default::default();
    for map in &snapshot.maps {
        let stem = map.image_name.trim_end_matches(".png");
        let label = image::open(cache.path().join(format!("demo/labels/{stem}.png")))
            .unwrap()
            .to_luma8();
        for y in 0..map.height {
            for x in 0..map.width {
                let class = label.get_pixel(
                    (x * label.width() as usize / map.width) as u32,
                    (y * label.height() as usize / map.height) as u32,
                )[0] as usize;
                if class < classes.len() {
                    votes
                        .entry(map.labels[y * map.width + x])
                        .or_insert_with(|| vec![0; classes.len()])[class] += 1;
                }
            }
        }
    }
    let mut by_size: Vec<(u16, Vec<usize>)> = votes.into_iter().collect();
    by_size.sort_by_key(|(_, counts)| std::cmp::Reverse(counts.iter().sum::<usize>()));
    for (cluster, counts) in by_size.iter().take(3) {
        let commonest = (0..counts.len()).max_by_key(|&c| counts[c]).unwrap();
        assert_eq!(
            harness.state().matched_class(*cluster as usize).as_deref(),
            Some(classes[commonest].as_str()),
            "cluster {cluster}: labels under it {counts:?}"
        );
    }
}
