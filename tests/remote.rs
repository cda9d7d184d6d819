//! Training through `picie serve`: the server is started from the built binary on 127.0.0.1
//! with the CPU backend, and the trainer in this process uses it as its device.
#![cfg(feature = "remote")]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use picie::config::TrainConfig;
use picie::data::{DemoOptions, write_demo_dataset};
use picie::device::{ComputeDevice, DeviceChoice, DeviceError, RemoteServer, select_device};
use picie::model::BackboneKind;
use picie::train::{
    ExistingRun, RunFolder, TrainControl, TrainError, TrainEvent, Trainer, TrainingData,
};

const TOKEN: &str = "a-test-token";

/// A `picie serve` process, killed when dropped. Its output goes to a file the test reads.
struct Server {
    child: Option<Child>,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(folder: &Path, name: &str) -> Self {
        Self::start_at(folder, name, "127.0.0.1:0")
    }

    fn start_at(folder: &Path, name: &str, address: &str) -> Self {
        let log = folder.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_picie"))
            .args(["serve", "--address", address, "--device", "cpu"])
            .env("PICIE_REMOTE_TOKEN", TOKEN)
            .stdout(Stdio::from(File::create(&log).unwrap()))
            .stderr(Stdio::from(
                File::create(folder.join(format!("{name}.err"))).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut server = Self {
            child: Some(child),
            url: String::new(),
            log,
        };
        let started = Instant::now();
        // "serving CPU: ... on ws://127.0.0.1:PORT to clients with the token; ..."
        while server.url.is_empty() {
            let text = server.log();
            if let Some(at) = text.find("ws://") {
                let url: String = text[at..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                server.url = url;
            } else {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the server did not start: {text}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn choice(&self, token: &str) -> DeviceChoice {
        DeviceChoice::Remote(RemoteServer {
            url: self.url.clone(),
            token: Some(token.to_owned()),
        })
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tiny_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        backbone: BackboneKind::MobilenetV2,
        random_init: true,
        device: DeviceChoice::Cpu,
        base_size: 64,
        input_size: 32,
        batch_size: 4,
        learning_rate: 1e-3,
        epochs,
        kmeans_iterations: 5,
        eval_kmeans_restarts: 1,
        preview_images: 1,
        seed: 11,
        ..TrainConfig::default()
    }
}

fn tiny_data(folder: &Path) -> Arc<TrainingData> {
    let demo = write_demo_dataset(
        &folder.join("demo"),
        &DemoOptions {
            images: 8,
            size: 64,
            seed: 4,
        },
    )
    .unwrap();
    Arc::new(
        TrainingData::load(&demo.images_dir, Some(&demo.labels_dir), 64, 32, &|_, _| {}).unwrap(),
    )
}

/// Trains `config` into `run_dir` on `compute`; returns the loss of every step.
fn train(
    config: &TrainConfig,
    data: &Arc<TrainingData>,
    run_dir: &Path,
    compute: &ComputeDevice,
) -> Vec<f32> {
    let run = RunFolder::create(run_dir, config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let mut trainer = Trainer::new(
        config.clone(),
        run,
        Arc::clone(data),
        TrainControl::new(),
        false,
    )
    .unwrap();
    let mut losses = Vec::new();
    let mut observer = |event: &TrainEvent| {
        if let TrainEvent::Step(progress) = event {
            losses.push(progress.loss.total);
        }
    };
    let outcome = trainer.run(compute, &mut observer).unwrap();
    assert_eq!(outcome.last_epoch, config.epochs);
    losses
}

#[test]
fn an_epoch_through_picie_serve_gives_the_local_losses() {
    let folder = tempfile::tempdir().unwrap();
    let data = tiny_data(folder.path());
    let config = tiny_config(1);
    let local = train(
        &config,
        &data,
        &folder.path().join("local"),
        &ComputeDevice::cpu(),
    );

    let server = Server::start(folder.path(), "server");
    let remote_config = TrainConfig {
        device: server.choice(TOKEN),
        ..config
    };
    let compute = select_device(&remote_config.device).unwrap();
    assert!(
        compute.description.contains(&server.url),
        "{}",
        compute.description
    );
    let remote = train(
        &remote_config,
        &data,
        &folder.path().join("remote"),
        &compute,
    );

    eprintln!("losses, local: {local:?}, through the server: {remote:?}");
    assert_eq!(local.len(), 2, "two batches of four images");
    assert_eq!(remote.len(), local.len());
    // Same weights, views and clustering seeds; what differs is the order of arithmetic (the
    // local run has its own convolution gradients, the server runs burn's generic kernels).
    // The first step's loss agreed to 2e-7 when measured; the second, after one Adam update,
    // to 1e-4 (Adam divides each gradient by its own magnitude, so rounding in tiny gradient
    // entries becomes a full-size step). A wrong operation, a lost update or a different
    // clustering moves the loss by percents, far beyond 1e-3.
    for (step, (local, remote)) in local.iter().zip(&remote).enumerate() {
        let relative = (local - remote).abs() / local.abs().max(1e-6);
        assert!(
            relative < 1e-3,
            "step {}: local loss {local}, remote {remote}",
            step + 1
        );
    }
    assert!(
        server.log().contains("session opened for"),
        "the server logs the client: {}",
        server.log()
    );
}

#[test]
fn a_wrong_token_is_refused_with_a_clear_message() {
    let folder = tempfile::tempdir().unwrap();
    let server = Server::start(folder.path(), "server");
    let error = select_device(&server.choice("not-the-token")).unwrap_err();
    assert!(
        matches!(&error, DeviceError::RemoteRefused { url } if *url == server.url),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&server.url) && message.contains("refused the token"),
        "{message}"
    );
    assert!(message.contains("PICIE_REMOTE_TOKEN"), "{message}");
    // The refusal is in the server's log too; give its writer a moment.
    let started = Instant::now();
    while !server.log().contains("refused") && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log().contains("refused"), "{}", server.log());
}

#[test]
fn a_server_killed_mid_epoch_stops_training_and_the_run_resumes_when_it_is_back() {
    let folder = tempfile::tempdir().unwrap();
    let data = tiny_data(folder.path());
    let mut server = Server::start(folder.path(), "first");
    let config = TrainConfig {
        device: server.choice(TOKEN),
        ..tiny_config(2)
    };
    let run_dir = folder.path().join("run");
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let compute = select_device(&config.device).unwrap();
    let mut trainer = Trainer::new(
        config.clone(),
        run,
        Arc::clone(&data),
        TrainControl::new(),
        false,
    )
    .unwrap();
    let mut observer = |event: &TrainEvent| {
        if let TrainEvent::Step(progress) = event
            && progress.epoch == 2
        {
            server.kill();
        }
    };
    let error = trainer.run(&compute, &mut observer).unwrap_err();
    drop(trainer);
    assert!(
        matches!(
            error,
            TrainError::RemoteLost {
                epoch: 2,
                last_checkpoint: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("--resume"), "{error}");
    let (_, checkpoint) = RunFolder::open(&run_dir)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .expect("epoch 1's checkpoint is kept");
    assert_eq!(checkpoint.epoch, 1);

    // The same address, as after a restart of the server: this process must open a new
    // session rather than reuse the dead one.
    let address = server.url.trim_start_matches("ws://").to_owned();
    let second = Server::start_at(folder.path(), "second", &address);
    assert_eq!(second.url, server.url);
    let compute = select_device(&config.device).unwrap();
    let run = RunFolder::open_for_writing(&run_dir).unwrap();
    let outcome = Trainer::new(config, run, data, TrainControl::new(), true)
        .unwrap()
        .run(&compute, &mut |_: &TrainEvent| {})
        .unwrap();
    assert_eq!(outcome.last_epoch, 2);
    let (_, checkpoint) = RunFolder::open(&run_dir)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.epoch, 2);
}
