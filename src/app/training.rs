//! The training panel: every hyperparameter with a tooltip, the starting weights (ImageNet
//! download with progress and cancel, a file, or random init) and Start / Pause / Resume /
//! Stop; and the demo's offer to download the ImageNet weights it is made for.
//!
//! One concern, in one file: the training panel and its weights choice (about 700 lines).

use std::path::{Path, PathBuf};

use eframe::egui;
use serde::{Deserialize, Serialize};

use super::ExplorerApp;
use super::settings_grid::backbone_name;
use crate::config::{LearningRateSchedule, TrainConfig};
use crate::download::{self, DownloadError, DownloadProgress};
use crate::model::BackboneKind;
use crate::session::{Command, Job};

/// Where the network's starting weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WeightsChoice {
    /// torchvision's ImageNet weights for the backbone (downloaded once into the cache).
    #[default]
    ImageNet,
    /// A `.pth` / `.safetensors` file.
    File(PathBuf),
    /// Random initialisation (seeded).
    Random,
}

/// The app's defaults: the paper's settings, with a preview refresh every 5 steps so the maps
/// move during an epoch.
pub fn app_default_config() -> TrainConfig {
    TrainConfig {
        preview_every_steps: 5,
        ..TrainConfig::default()
    }
}

/// Small, quick settings for the demo dataset from random weights on a CPU. Chosen on a
/// second demo dataset (seed 1) and checked on two others (see the README): at a constant
/// 1e-3 the scores rose and fell; 3e-4 falling to zero over 20 epochs ends above the
/// untrained network's.
pub fn demo_config(current: &TrainConfig) -> TrainConfig {
    TrainConfig {
        random_init: true,
        backbone: BackboneKind::MobilenetV2,
        base_size: 128,
        input_size: 64,
        batch_size: 8,
        learning_rate: 3e-4,
        learning_rate_schedule: LearningRateSchedule::Cosine,
        epochs: 20,
        kmeans_iterations: 10,
        preview_images: 8,
        preview_every_steps: 2,
        ..current.clone()
    }
}

/// A download of ImageNet weights into the cache, as a background job.
type DownloadJob = Job<DownloadProgress, Result<PathBuf, DownloadError>>;

/// What the demo tells a user who declines the download or cannot get it.
const RANDOM_DEMO_EXPECTATION: &str = "From random weights the demo's clusters follow colour \
     and position (broad bands across the image) rather than the scene's parts; scores still \
     rise, to about 50 % Acc.";

/// The demo's settings when torchvision's ImageNet MobileNetV2 is in the cache: ImageNet
/// features already separate the scene's parts, so a larger input and a small learning rate
/// refine them instead of relearning them (chosen by measurement; see the README).
pub fn demo_config_imagenet(current: &TrainConfig) -> TrainConfig {
    TrainConfig {
        backbone: BackboneKind::MobilenetV2,
        random_init: false,
        base_size: 160,
        input_size: 128,
        batch_size: 8,
        learning_rate: 1e-4,
        learning_rate_schedule: LearningRateSchedule::Constant,
        epochs: 6,
        kmeans_iterations: 20,
        preview_images: 8,
        preview_every_steps: 2,
        ..current.clone()
    }
}

/// torchvision's ImageNet file of `backbone` in the cache folder `root`, if it is there.
pub fn cached_imagenet_weights(root: Option<&Path>, backbone: BackboneKind) -> Option<PathBuf> {
    let known = download::known_weights(backbone_name(backbone))?;
    download::cached_weights_in(root?, known)
}

/// Why the last download did not finish: a sentence for the window, the details on demand.
struct DownloadFailure {
    summary: String,
    details: Option<String>,
}

impl DownloadFailure {
    fn plain(summary: impl Into<String>) -> Self {
        Self {
            summary: summary.into(),
            details: None,
        }
    }

    /// The summary in the error colour, the details (if any) as hover text.
    fn show(&self, ui: &mut egui::Ui) {
        let label = ui.colored_label(ui.visuals().error_fg_color, &self.summary);
        if let Some(details) = &self.details {
            label.on_hover_text(details);
        }
    }
}

/// State of the panel that is not a setting.
#[derive(Default)]
pub struct TrainingPanel {
    download: Option<DownloadJob>,
    download_error: Option<DownloadFailure>,
    /// The demo was opened without its ImageNet weights: the offer to download them is shown.
    pub demo_offer: bool,
    /// The remote server's address and token, when the device is "Remote server…".
    pub remote: super::remote_ui::RemotePanel,
}

impl TrainingPanel {
    /// The weights file for a choice, or why training cannot start with it.
    pub fn resolve_weights(
        &self,
        choice: &WeightsChoice,
        cached_imagenet: Option<PathBuf>,
    ) -> Result<Option<PathBuf>, String> {
        match choice {
            WeightsChoice::Random => Ok(None),
            WeightsChoice::File(path) if path.is_file() => Ok(Some(path.clone())),
            WeightsChoice::File(path) => Err(format!(
                "the weights file {} does not exist; choose another or use random init",
                path.display()
            )),
            WeightsChoice::ImageNet => cached_imagenet.map(Some).ok_or_else(|| {
                "the ImageNet weights are not downloaded yet: press Download, choose a \
                     file, or use random init"
                    .to_string()
            }),
        }
    }
}

/// What the window says when a download fails: in a few words, what happened and the two ways
/// on (try again, or put the file in the cache folder by hand); the error itself as details.
fn download_failure(error: &DownloadError, weights_folder: Option<&Path>) -> DownloadFailure {
    let unreachable = |url: &str| {
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next());
        let file = url.rsplit('/').next().unwrap_or(url);
        let folder = weights_folder.map_or_else(
            || "the cache folder's weights folder".to_string(),
            |folder| folder.display().to_string(),
        );
        format!(
            "Could not download the weights: {} did not answer (no network?). Press Try \
             again later, or copy {file} into {folder} yourself.",
            host.unwrap_or("the server")
        )
    };
    let summary = match error {
        DownloadError::Request { url, .. }
        | DownloadError::Interrupted { url, .. }
        | DownloadError::Incomplete { url, .. }
        | DownloadError::HttpStatus { url, .. } => unreachable(url),
        _ => "Download failed.".to_string(),
    };
    DownloadFailure {
        summary,
        details: Some(error.to_string()),
    }
}

impl ExplorerApp {
    pub(super) fn training_panel(&mut self, ui: &mut egui::Ui) {
        let running = self.is_training();
        ui.heading("Training");
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.add_enabled_ui(!running, |ui| self.settings_grid(ui));
            ui.add_space(8.0);
            self.weights_ui(ui, running);
            ui.add_space(12.0);
            self.control_buttons(ui, running);
            if let Some(session) = &self.session
                && !session.warnings.is_empty()
            {
                ui.add_space(8.0);
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("{} warnings (hover to read)", session.warnings.len()),
                )
                .on_hover_text(session.warnings.join("\n"));
            }
        });
    }

    fn settings_grid(&mut self, ui: &mut egui::Ui) {
        let wake = self.wake();
        super::settings_grid::settings_grid(
            ui,
            &mut self.settings.config,
            &mut self.training.remote,
            wake,
        );
    }

    fn weights_ui(&mut self, ui: &mut egui::Ui, running: bool) {
        ui.label("Starting weights").on_hover_text(
            "ImageNet weights make clusters meaningful from the first epoch; random init needs \
             much longer training.",
        );
        let backbone = backbone_name(self.settings.config.backbone);
        let known = download::known_weights(backbone);
        let cache = self.cache_folder().ok();
        let cached = cached_imagenet_weights(cache.as_deref(), self.settings.config.backbone);
        ui.add_enabled_ui(!running, |ui| {
            ui.radio_value(
                &mut self.settings.weights,
                WeightsChoice::ImageNet,
                "ImageNet (torchvision)",
            );
            if self.settings.weights == WeightsChoice::ImageNet {
                ui.indent("imagenet", |ui| {
                    if let Some(path) = &cached {
                        ui.weak(format!("cached: {}", path.display()));
                    } else if !self.download_progress_ui(ui) {
                        let button = ui
                            .button("Download")
                            .on_hover_text(known.map_or(String::new(), |k| k.url.to_string()));
                        if button.clicked() {
                            self.start_weights_download();
                        }
                    }
                });
            }
            let file_label = match &self.settings.weights {
                WeightsChoice::File(path) => format!(
                    "File: {}",
                    path.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
                ),
                _ => "File…".to_string(),
            };
            let is_file = matches!(self.settings.weights, WeightsChoice::File(_));
            if ui.radio(is_file, file_label).clicked()
                && let Some(path) = rfd::FileDialog::new()
                    .add_filter("weights", &["pth", "pt", "safetensors"])
                    .pick_file()
            {
                self.settings.weights = WeightsChoice::File(path);
            }
            ui.radio_value(
                &mut self.settings.weights,
                WeightsChoice::Random,
                "Random init",
            );
        });
        if let Some(failure) = &self.training.download_error {
            failure.show(ui);
        }
    }

    fn control_buttons(&mut self, ui: &mut egui::Ui, running: bool) {
        let paused = self.session.as_ref().is_some_and(|s| s.status.paused);
        let resumable = self.resumable_run();
        ui.horizontal(|ui| {
            if !running {
                let start = ui
                    .add_enabled(self.dataset.is_some(), egui::Button::new("Start"))
                    .on_hover_text("Train a new run on this dataset");
                if start.clicked() {
                    let ctx = ui.ctx().clone();
                    self.start_training(&ctx, None);
                }
                if let Some(run) = resumable
                    && ui
                        .button("Continue")
                        .on_hover_text("Continue this run from its last checkpoint")
                        .clicked()
                {
                    let ctx = ui.ctx().clone();
                    self.start_training(&ctx, Some(run));
                }
            } else {
                if paused {
                    if ui.button("Resume").clicked() {
                        self.command(Command::Resume);
                    }
                } else if ui
                    .button("Pause")
                    .on_hover_text("Pause after the current batch")
                    .clicked()
                {
                    self.command(Command::Pause);
                }
                if ui
                    .button("Stop")
                    .on_hover_text("Stop after the current batch; completed epochs are kept")
                    .clicked()
                {
                    self.command(Command::Stop);
                }
            }
        });
        if let Some(session) = &self.session
            && let Some(error) = &session.status.error
        {
            ui.colored_label(ui.visuals().error_fg_color, error);
        }
        if let Some(session) = &self.session {
            ui.add_space(6.0);
            ui.weak(format!("Run folder: {}", session.run_dir.display()));
        }
    }

    /// A stopped run of the open dataset with a checkpoint and epochs left to train.
    fn resumable_run(&self) -> Option<PathBuf> {
        let session = self.session.as_ref()?;
        let run = crate::train::RunFolder::open(&session.run_dir).ok()?;
        let (_, state) = run.latest_checkpoint().ok()??;
        let config = run.config().ok()?;
        (state.epoch < config.epochs && self.dataset.is_some()).then(|| session.run_dir.clone())
    }

    /// A progress bar with Cancel while weights download; `false` when none is running.
    fn download_progress_ui(&mut self, ui: &mut egui::Ui) -> bool {
        let Some(job) = &mut self.training.download else {
            return false;
        };
        let cancelled = job.is_cancelled();
        let progress = job.progress().copied();
        ui.horizontal(|ui| {
            let fraction = progress.as_ref().and_then(DownloadProgress::fraction);
            let text = match progress {
                _ if cancelled => "cancelling".to_string(),
                Some(DownloadProgress {
                    downloaded,
                    total: Some(total),
                }) => format!(
                    "{:.1} of {:.1} MB",
                    downloaded as f64 / 1e6,
                    total as f64 / 1e6
                ),
                Some(progress) => format!("{:.1} MB", progress.downloaded as f64 / 1e6),
                None => "connecting".to_string(),
            };
            ui.add(
                egui::ProgressBar::new(fraction.unwrap_or(0.0))
                    .text(text)
                    .desired_width(160.0),
            );
            if ui
                .add_enabled(!cancelled, egui::Button::new("Cancel"))
                .clicked()
            {
                job.cancel();
            }
        });
        true
    }

    /// Starts downloading the ImageNet weights of the chosen backbone into the cache folder.
    pub(super) fn start_weights_download(&mut self) {
        if self.training.download.is_some() {
            return;
        }
        let Some(known) = download::known_weights(backbone_name(self.settings.config.backbone))
        else {
            return;
        };
        let root = match self.cache_folder() {
            Ok(root) => root,
            Err(error) => {
                self.training.download_error = Some(DownloadFailure::plain(error));
                return;
            }
        };
        let wake = self.wake();
        let job = Job::spawn("download", wake, move |job| {
            download::download_known_weights_in(
                &root,
                known,
                &mut |progress| job.report(progress),
                job.cancel_flag(),
            )
        });
        match job {
            Ok(job) => {
                self.training.download = Some(job);
                self.training.download_error = None;
            }
            Err(error) => {
                self.training.download_error = Some(DownloadFailure::plain(error.to_string()))
            }
        }
    }

    /// Takes a finished download's result: on success the demo switches to its ImageNet
    /// settings when it was waiting for them; otherwise the panel says why.
    pub(super) fn poll_download(&mut self) {
        let Some(job) = &mut self.training.download else {
            return;
        };
        let Some(outcome) = job.try_result() else {
            return;
        };
        self.training.download = None;
        match outcome {
            Ok(Ok(_)) => {
                self.training.download_error = None;
                if self.training.demo_offer {
                    self.training.demo_offer = false;
                    self.settings.config = demo_config_imagenet(&self.settings.config);
                    self.settings.weights = WeightsChoice::ImageNet;
                    self.notify(
                        "ImageNet weights downloaded: the demo starts from them. Press Start.",
                        false,
                    );
                }
            }
            Ok(Err(DownloadError::Cancelled { .. })) => {
                self.training.download_error = Some(DownloadFailure::plain(
                    "Download cancelled; the next Download resumes it.",
                ));
            }
            Ok(Err(error)) => {
                let folder = self.cache_folder().ok().map(|root| root.join("weights"));
                self.training.download_error = Some(download_failure(&error, folder.as_deref()));
            }
            Err(error) => {
                self.training.download_error = Some(DownloadFailure::plain(error.to_string()))
            }
        }
    }

    /// The demo's offer, shown when it opens without the ImageNet weights it is made for:
    /// download them (progress, cancel), or train from random weights knowing what to expect.
    pub(super) fn demo_offer_window(&mut self, ctx: &egui::Context) {
        if !self.training.demo_offer {
            return;
        }
        let downloading = self.training.download.is_some();
        let mut decline = false;
        let response = egui::Modal::new(egui::Id::unique("demo-weights-offer")).show(ctx, |ui| {
            ui.set_max_width(440.0);
            ui.heading("ImageNet weights for the demo");
            ui.label(
                "The demo is made for torchvision's ImageNet MobileNetV2 (14 MB, downloaded \
                 once into the cache folder). With it, sky, buildings, road, grass, water and \
                 trees become clusters of their own within a minute or two.",
            );
            ui.add_space(4.0);
            ui.weak(RANDOM_DEMO_EXPECTATION);
            ui.add_space(8.0);
            if let Some(failure) = &self.training.download_error {
                ui.colored_label(ui.visuals().error_fg_color, &failure.summary);
                if let Some(details) = &failure.details {
                    ui.collapsing("Details", |ui| ui.weak(details));
                }
                ui.add_space(4.0);
            }
            if !self.download_progress_ui(ui) {
                ui.horizontal(|ui| {
                    let again = self.training.download_error.is_some();
                    let label = if again {
                        "Try again"
                    } else {
                        "Download (14 MB)"
                    };
                    if ui.button(label).clicked() {
                        self.start_weights_download();
                    }
                    if ui.button("Train from random weights").clicked() {
                        decline = true;
                    }
                });
            }
        });
        // Escape or a click beside the dialog declines too, but not while downloading.
        if decline || (response.should_close() && !downloading) {
            self.training.demo_offer = false;
            self.training.download_error = None;
            self.settings.weights = WeightsChoice::Random;
            self.notify(
                "The demo trains from random weights: its clusters will follow colour and \
                 position (broad bands across the image) rather than the scene's parts, and \
                 scores still rise, to about 50 % Acc. The training panel's Download fetches \
                 the ImageNet weights at any time.",
                false,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::{NodeT, Queryable};

    use super::super::test_support::app_with_three_clusters;
    use super::*;

    /// The panel of the fake session's window, with an empty weights cache.
    fn panel(run: &Path, cache: &Path) -> Harness<'static, ExplorerApp> {
        let mut app = app_with_three_clusters(run);
        app.cache_root = Some(cache.to_path_buf());
        Harness::new_ui_state(|ui, app: &mut ExplorerApp| app.training_panel(ui), app)
    }

    #[test]
    fn the_training_panel_offers_weights_and_starts_only_with_a_dataset() {
        let (run, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut harness = panel(run.path(), cache.path());
        harness.get_by_label("Starting weights");
        // ImageNet is chosen and not cached yet: the panel offers its download.
        harness.get_by_label("Download");
        let start = harness.get_by_label("Start");
        assert!(start.accesskit_node().is_disabled(), "no dataset is open");
        harness.get_by_label(&format!("Run folder: {}", run.path().display()));
        harness.get_by_label("Random init").click();
        harness.run();
        assert_eq!(harness.state().settings.weights, WeightsChoice::Random);
        assert!(harness.query_by_label("Download").is_none());
    }

    #[test]
    fn a_running_session_offers_pause_and_stop_and_shows_its_problems() {
        let (run, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut harness = panel(run.path(), cache.path());
        let session = harness.state_mut().session.as_mut().unwrap();
        session.status.running = true;
        session.status.error = Some("Could not read street/0001.png: not an image".into());
        session.warnings = vec!["skipped a.png".into(), "skipped b.png".into()];
        harness.run();
        assert!(harness.query_by_label("Start").is_none());
        harness.get_by_label("Stop");
        harness.get_by_label("Could not read street/0001.png: not an image");
        harness.get_by_label("2 warnings (hover to read)");
        // Settings cannot change under a running trainer.
        let random = harness.get_by_label("Random init");
        assert!(random.accesskit_node().is_disabled());
        harness.get_by_label("Pause").click();
        harness.run();
        let status = &harness.state().session.as_ref().unwrap().status;
        assert_eq!(status.activity, crate::session::Activity::Pausing);
    }

    #[test]
    fn a_failed_download_says_which_server_and_where_to_put_the_file_by_hand() {
        let error = DownloadError::HttpStatus {
            url: download::MOBILENET_V2_WEIGHTS.url.to_string(),
            status: 503,
        };
        let failure = download_failure(&error, Some(Path::new("/cache/weights")));
        let text = &failure.summary;
        assert!(text.starts_with("Could not download the weights: download.pytorch.org"));
        assert!(
            text.contains("copy mobilenet_v2-b0353104.pth into /cache/weights"),
            "{text}"
        );
        let details = failure.details.unwrap();
        assert!(details.contains("HTTP 503"), "the details: {details}");
    }
}
