//! The run folder as a whole, driven through the `picie` binary as a user would: a second run
//! into a folder, two writers at once, a resume with other settings, and kills at random
//! instants followed by a resume. After each, the folder must be consistent and usable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use picie::train::{RunFolder, RunLock};
use rand::{Rng, SeedableRng};

const EPOCHS: usize = 3;

fn picie() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_picie"));
    command.env("NO_COLOR", "1");
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A tiny labelled dataset, written once per test folder.
fn demo(folder: &Path) -> PathBuf {
    let data = folder.join("demo");
    let output = picie()
        .args(["demo-data", "--images", "8", "--size", "64", "--seed", "3"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    data
}

/// `picie train` on the tiny dataset with small settings, plus `extra` arguments.
fn train(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut command = picie();
    command
        .arg("train")
        .arg("--images")
        .arg(data.join("images"))
        .arg("--labels")
        .arg(data.join("labels"))
        .arg("--out")
        .arg(out)
        .args([
            "--backbone",
            "mobilenet_v2",
            "--device",
            "cpu",
            "--input-size",
            "64",
            "--base-size",
            "64",
            "--batch",
            "4",
        ])
        .args(extra);
    command
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    printed
}

fn run_refused(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let printed = text(&output);
    assert!(!output.status.success(), "expected a refusal: {printed}");
    assert!(!printed.contains("panicked"), "{printed}");
    printed
}

/// What a user relies on after any interruption: the latest checkpoint is complete, its
/// metrics list every epoch up to it once, and the folder's own metrics agree. Returns the
/// latest epoch (None: no checkpoint yet).
fn check_consistent(out: &Path) -> Option<usize> {
    let Ok(run) = RunFolder::open(out) else {
        return None;
    };
    let (directory, state) = run.latest_checkpoint().unwrap()?;
    for file in [
        "network.safetensors",
        "optimizer.bpk",
        "state.json",
        "metrics.json",
    ] {
        assert!(
            directory.join(file).is_file(),
            "{} lacks {file}",
            directory.display()
        );
    }
    let epochs: Vec<usize> = run
        .metrics()
        .unwrap()
        .epochs
        .iter()
        .map(|record| record.epoch)
        .collect();
    assert_eq!(
        epochs,
        (1..=state.epoch).collect::<Vec<_>>(),
        "metrics of {}",
        out.display()
    );
    Some(state.epoch)
}

/// Resumes (or restarts, when no epoch was committed) until the run is complete, then checks
/// that it can be scored and segmented.
fn finish_and_use(data: &Path, out: &Path) {
    let flags = ["--epochs", "3"];
    match check_consistent(out) {
        Some(_) => run_ok(train(data, out, &["--resume"]).args(flags)),
        None => run_ok(&mut train(data, out, &flags)),
    };
    assert_eq!(check_consistent(out), Some(EPOCHS));
    let run = RunFolder::open(out).unwrap();
    assert_eq!(run.segmentation().unwrap().epoch, EPOCHS);
    run_ok(
        picie()
            .args(["eval", "--device", "cpu", "--run"])
            .arg(out)
            .arg("--images")
            .arg(data.join("images"))
            .arg("--labels")
            .arg(data.join("labels")),
    );
}

#[test]
fn a_second_run_into_a_folder_is_refused_or_moves_the_first_aside() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("run");
    run_ok(&mut train(&data, &out, &["--epochs", "2"]));
    let config_before = std::fs::read(out.join("config.json")).unwrap();

    let refused = run_refused(&mut train(&data, &out, &["--epochs", "1"]));
    assert!(
        refused.contains("already holds a run") && refused.contains("--overwrite"),
        "{refused}"
    );
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        config_before
    );
    assert_eq!(check_consistent(&out), Some(2));

    let moved = run_ok(&mut train(&data, &out, &["--epochs", "1", "--overwrite"]));
    let aside = folder.path().join("run.replaced-1");
    assert!(moved.contains("run.replaced-1"), "{moved}");
    assert_eq!(check_consistent(&aside), Some(2));
    assert_eq!(check_consistent(&out), Some(1));
}

#[test]
fn a_second_writer_is_refused_with_the_holder_named() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("run");
    let lock = RunLock::acquire(&out).unwrap();
    let refused = run_refused(&mut train(&data, &out, &["--epochs", "1"]));
    assert!(
        refused.contains("in use by another PiCIE process")
            && refused.contains(&format!("pid {}", std::process::id())),
        "{refused}"
    );
    drop(lock);
    run_ok(&mut train(&data, &out, &["--epochs", "1"]));
    assert_eq!(check_consistent(&out), Some(1));
}

#[test]
fn a_resume_keeps_the_recorded_settings_and_names_changes_it_refuses() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("run");
    run_ok(&mut train(&data, &out, &["--epochs", "1"]));
    let clusters = RunFolder::open(&out).unwrap().config().unwrap().clusters;
    assert!(clusters.is_some(), "K is recorded at the start");

    let refused = run_refused(
        train(&data, &out, &["--resume", "--epochs", "2"]).args(["--seed", "5", "--lr", "0.001"]),
    );
    assert!(
        refused.contains("seed 0 -> 5") && refused.contains("learning rate"),
        "{refused}"
    );
    assert_eq!(check_consistent(&out), Some(1));

    // Without labels, K stays the run's, and the new epoch count is recorded.
    run_ok(
        picie()
            .args(["train", "--resume", "--epochs", "2", "--device", "cpu"])
            .arg("--images")
            .arg(data.join("images"))
            .arg("--out")
            .arg(&out),
    );
    let config = RunFolder::open(&out).unwrap().config().unwrap();
    assert_eq!(config.clusters, clusters);
    assert_eq!(config.epochs, 2);
    assert_eq!(check_consistent(&out), Some(2));
}

/// Kills `picie train` at `kills` seeded random instants (each followed by a resume from
/// whatever is on disk) and checks the folder after every kill and at the end.
fn kill_and_resume(kills: usize, seed: u64) {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    // How long a whole run takes here bounds the kill instants.
    let timed = folder.path().join("timed");
    let started = Instant::now();
    run_ok(&mut train(&data, &timed, &["--epochs", "3"]));
    let whole = started.elapsed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut committed_epochs = Vec::new();
    for attempt in 0..kills {
        let out = folder.path().join(format!("run-{attempt}"));
        let before = rng.random_range(0.0..1.0) * whole.as_secs_f64();
        let mut child = train(&data, &out, &["--epochs", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs_f64(before));
        let _ = child.kill(); // SIGKILL on Unix: no handler runs
        let _ = child.wait();
        committed_epochs.push(check_consistent(&out));
        finish_and_use(&data, &out);
    }
    eprintln!("{kills} kills; epochs committed at each kill: {committed_epochs:?}");
}

#[test]
fn kills_at_random_instants_leave_a_consistent_resumable_run() {
    kill_and_resume(3, 7);
}

/// The long form for the note: `cargo test --release --test run_folder -- --ignored`.
#[test]
#[ignore = "slow: 100 kills"]
fn a_hundred_kills_leave_every_run_consistent_and_resumable() {
    kill_and_resume(100, 11);
}

#[test]
fn mistakes_at_the_start_get_messages_that_say_what_to_do() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("run");

    // A weights path that is a folder.
    let message = run_refused(train(&data, &out, &["--epochs", "1", "--weights"]).arg(&data));
    assert!(message.contains("it is a folder"), "{message}");

    // A negative learning rate is a value, not an unknown flag.
    let message = run_refused(&mut train(&data, &out, &["--epochs", "1", "--lr", "-1"]));
    assert!(
        message.contains("learning_rate -1 must be positive"),
        "{message}"
    );

    // A learning rate that makes the loss blow up stops with the cause, not a later symptom.
    let message = run_refused(&mut train(
        &data,
        &folder.path().join("diverged"),
        &["--epochs", "2", "--lr", "1e30"],
    ));
    assert!(
        message.contains("training diverged") && message.contains("it is 1e30"),
        "{message}"
    );

    // A checkpoint of the other backbone.
    run_ok(&mut train(&data, &out, &["--epochs", "0"]));
    let network = RunFolder::open(&out)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .unwrap()
        .0
        .join("network.safetensors");
    let mut other = picie();
    other.arg("train").arg("--images").arg(data.join("images"));
    other
        .arg("--out")
        .arg(folder.path().join("other"))
        .arg("--weights")
        .arg(&network);
    other.args(["--backbone", "resnet18", "--device", "cpu", "--epochs", "1"]);
    other.args(["--input-size", "64", "--base-size", "64"]);
    let message = run_refused(&mut other);
    assert!(
        message.contains("is a MobileNetV2 checkpoint")
            && message.contains("--backbone mobilenet_v2"),
        "{message}"
    );

    // Half the labels missing: refused with the count, not trained without scores.
    let labels = data.join("labels");
    let mut removed = 0;
    for entry in std::fs::read_dir(&labels).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "png") && removed < 4 {
            std::fs::remove_file(path).unwrap();
            removed += 1;
        }
    }
    let fresh = folder.path().join("fresh");
    let message = run_refused(&mut train(&data, &fresh, &["--epochs", "1"]));
    assert!(message.contains("4 of 8 images have no label"), "{message}");
}

#[test]
fn a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("run");
    run_ok(&mut train(&data, &out, &["--epochs", "2"]));
    let (latest, state) = RunFolder::open(&out)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .unwrap();
    assert_eq!(state.epoch, 2);
    let network = latest.join("network.safetensors");
    let length = std::fs::metadata(&network).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&network)
        .unwrap();
    file.set_len(length / 2).unwrap();

    let resumed = run_ok(&mut train(&data, &out, &["--resume", "--epochs", "3"]));
    assert!(
        resumed.contains("damaged") && resumed.contains("checkpoint of epoch 1 instead"),
        "{resumed}"
    );
    // Epoch 2 is trained again from epoch 1's checkpoint; the metrics list each epoch once.
    assert_eq!(check_consistent(&out), Some(3));
}

#[test]
fn random_init_is_random_even_with_imagenet_weights_in_the_cache() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let cache = folder.path().join("cache");
    std::fs::create_dir_all(cache.join("weights")).unwrap();
    std::fs::copy(
        "../shared/weights/mobilenet_v2-imagenet.pth",
        cache.join("weights/mobilenet_v2-b0353104.pth"),
    )
    .unwrap();
    let started = |out: &str, extra: &[&str]| {
        let printed = run_ok(
            train(&data, &folder.path().join(out), &["--epochs", "0"])
                .args(extra)
                .env("PICIE_CACHE_DIR", &cache),
        );
        printed
            .lines()
            .find(|line| line.starts_with("weights:"))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(started("cached", &[]).contains("ImageNet weights from"));
    assert_eq!(
        started("random", &["--random-init"]),
        "weights: random init, as asked"
    );
    let config = RunFolder::open(&folder.path().join("random"))
        .unwrap()
        .config()
        .unwrap();
    assert!(config.random_init && config.weights.is_none());
}

#[test]
fn seeds_train_a_folder_each_and_report_mean_and_spread_with_held_out_scores() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo(folder.path());
    let out = folder.path().join("seeds");
    let printed = run_ok(&mut train(
        &data,
        &out,
        &[
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--seed",
            "5",
            "--held-out-prefix",
            "demo_0007",
        ],
    ));
    assert!(printed.contains("on 7 images"), "{printed}");
    assert!(printed.contains("held-out Acc"), "{printed}");
    for seed in [5u64, 6] {
        let run = RunFolder::open(&out.join(format!("seed-{seed}"))).unwrap();
        assert_eq!(run.config().unwrap().seed, seed);
        let metrics = run.metrics().unwrap();
        assert!(metrics.no_train_held_out.is_some());
        assert_eq!(metrics.epochs.len(), 1);
        assert!(metrics.epochs[0].held_out.is_some());
    }
    let summary: picie::run::SeedSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("seeds.json")).unwrap()).unwrap();
    assert_eq!(summary.seeds, [5, 6]);
    assert_eq!(summary.rows.len(), 2, "no training and epoch 1");
    let trained = &summary.rows[1];
    assert_eq!(trained.runs, 2);
    for spread in [
        trained.acc,
        trained.miou,
        trained.held_out_acc,
        trained.held_out_miou,
    ] {
        let spread = spread.expect("every score is summarised");
        assert!(spread.min <= spread.mean && spread.mean <= spread.max);
    }

    let refused = run_refused(&mut train(
        &data,
        &folder.path().join("wrong"),
        &["--epochs", "1", "--held-out-prefix", "0006R0_"],
    ));
    assert!(refused.contains("0006R0_"), "{refused}");
}

#[test]
fn a_new_run_folder_is_named_after_the_dataset_and_the_time() {
    let folder = picie::run::paths::timestamped(std::path::Path::new("runs"), "camvid dev/2");
    assert_eq!(folder.parent(), Some(std::path::Path::new("runs")));
    let name = folder.file_name().unwrap().to_str().unwrap();
    let stamp = name.strip_prefix("camvid_dev_2-").expect(name);
    // YYYYMMDD-HHMMSS
    assert_eq!(stamp.len(), 15, "{name}");
    assert_eq!(&stamp[8..9], "-");
    assert!(
        stamp[..8]
            .chars()
            .chain(stamp[9..].chars())
            .all(|c| c.is_ascii_digit())
    );
    assert!(stamp.starts_with("20"), "{name}");
}
