//! PiCIE Explorer's window: a start page, then the explorer with the training panel, live
//! cluster maps, the timeline and the statistics. Training runs on a background thread
//! ([`crate::session::worker`]); this module only draws and sends commands.

mod export_ui;
mod gallery;
mod gpu;
mod images;
mod maps;
mod menus;
mod relabel;
mod remote_ui;
mod settings_grid;
mod shell;
mod stats;
#[cfg(test)]
mod test_support;
mod training;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use eframe::egui;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{DemoOptions, ImageFolder, write_demo_dataset};
use crate::session::{Activity, Command, DatasetPaths, SessionState, TrainRequest, TrainerHandle};

pub use images::{ImageCache, ImageRequest};
pub use maps::MapView;
pub use training::WeightsChoice;

use shell::StartChoice;

/// Key of the settings in eframe's storage.
const SETTINGS_KEY: &str = "picie-explorer-settings";
/// Recent datasets remembered.
const RECENT_LIMIT: usize = 8;

/// Which view the explorer's centre shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Tab {
    /// Preview images with their cluster maps.
    #[default]
    Maps,
    /// Cluster statistics and curves.
    Statistics,
    /// Thumbnails of the whole dataset.
    Dataset,
}

/// What the app remembers between launches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Most recent first.
    pub recent: Vec<DatasetPaths>,
    /// The dataset open when the app was closed.
    pub last_dataset: Option<DatasetPaths>,
    /// The run open when the app was closed.
    pub last_run: Option<PathBuf>,
    /// The training settings last used.
    pub config: TrainConfig,
    /// Where the starting weights come from.
    pub weights: WeightsChoice,
    /// The centre view.
    pub tab: Tab,
    /// Overlay opacity.
    pub opacity: f32,
    /// Draw cluster boundaries.
    pub boundaries: bool,
    /// Show the training panel.
    pub show_training_panel: bool,
    /// Show the cluster list.
    pub show_cluster_panel: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            recent: Vec::new(),
            last_dataset: None,
            last_run: None,
            config: training::app_default_config(),
            weights: WeightsChoice::ImageNet,
            tab: Tab::Maps,
            opacity: 0.6,
            boundaries: true,
            show_training_panel: true,
            show_cluster_panel: true,
        }
    }
}

/// The dataset currently open.
pub struct OpenDataset {
    /// Its folders.
    pub paths: DatasetPaths,
    /// Image names (relative paths) in dataset order.
    pub names: Vec<String>,
    /// Class names when the labels come with `classes.txt`.
    pub class_names: Option<Vec<String>>,
    /// Images without a label file (when there are labels).
    pub unlabelled: usize,
}

/// Per-frame UI cost, to show and to report (the UI must never wait on the trainer).
#[derive(Default)]
pub struct FrameTimes {
    /// Milliseconds building the UI per frame while training ran (bounded).
    pub while_training: Vec<f32>,
    /// eframe's whole-frame CPU milliseconds (UI, tessellation, painting) while training ran.
    pub whole_frames_while_training: Vec<f32>,
    /// The last frame's UI milliseconds.
    pub last: f32,
}

impl FrameTimes {
    const KEPT: usize = 100_000;

    fn record(&mut self, milliseconds: f32, whole_frame: Option<f32>, training: bool) {
        self.last = milliseconds;
        if training && self.while_training.len() < Self::KEPT {
            self.while_training.push(milliseconds);
            if let Some(whole) = whole_frame {
                self.whole_frames_while_training.push(whole);
            }
        }
    }

    /// Median and worst UI time while training, in milliseconds, and the frame count.
    pub fn summary(&self) -> Option<(f32, f32, usize)> {
        median_and_worst(&self.while_training)
    }
}

fn median_and_worst(values: &[f32]) -> Option<(f32, f32, usize)> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    Some((
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        sorted.len(),
    ))
}

/// The whole application state.
pub struct ExplorerApp {
    /// Remembered settings.
    pub settings: Settings,
    /// The open dataset.
    pub dataset: Option<OpenDataset>,
    /// The session shown (live or reopened).
    pub session: Option<SessionState>,
    /// The running trainer, if any.
    pub trainer: Option<TrainerHandle>,
    /// How the maps are shown.
    pub view: MapView,
    /// Frame costs.
    pub frame_times: FrameTimes,
    images: Option<ImageCache>,
    notice: Option<Notice>,
    gpu_overlays: bool,
    training: training::TrainingPanel,
    frame: u64,
    /// Where the demo dataset and new runs go; `None`: the user's cache folder.
    pub cache_root: Option<PathBuf>,
    /// The user's names, colours, merges and ignores for the run shown, with undo.
    pub labels: Option<crate::labelmap::LabelHistory>,
    /// Edits in progress in the cluster list.
    pub relabel: relabel::RelabelState,
    /// The nearest-neighbour gallery.
    pub gallery: gallery::GalleryState,
    /// The export window.
    pub export: export_ui::ExportDialog,
    /// The start page's typed path (for systems where the folder dialog cannot open).
    typed_path: String,
    ctx: Option<egui::Context>,
}

/// A message at the top of the window.
struct Notice {
    text: String,
    error: bool,
}

impl Default for ExplorerApp {
    fn default() -> Self {
        Self::with_settings(Settings::default(), false)
    }
}

impl ExplorerApp {
    /// The app as eframe creates it: settings from storage, the GPU overlay when running on
    /// wgpu, and the last dataset and run reopened.
    pub fn new(creation: &eframe::CreationContext<'_>) -> Self {
        let settings: Settings = creation
            .storage
            .and_then(|storage| eframe::get_value(storage, SETTINGS_KEY))
            .unwrap_or_default();
        let gpu = gpu::OverlayRenderer::install(creation.wgpu_render_state.as_ref());
        let mut app = Self::with_settings(settings, gpu);
        if let Some(paths) = app.settings.last_dataset.clone()
            && paths.images.is_dir()
        {
            app.open_dataset(paths);
        }
        if let Some(run) = app.settings.last_run.clone()
            && SessionState::path_in(&run).is_file()
        {
            app.open_run(&run);
        }
        app
    }

    /// The app with given settings; `gpu_overlays` when the wgpu overlay pipeline exists.
    pub fn with_settings(settings: Settings, gpu_overlays: bool) -> Self {
        Self {
            settings,
            dataset: None,
            session: None,
            trainer: None,
            view: MapView::default(),
            frame_times: FrameTimes::default(),
            images: None,
            notice: None,
            gpu_overlays,
            training: training::TrainingPanel::default(),
            frame: 0,
            cache_root: None,
            labels: None,
            relabel: relabel::RelabelState::default(),
            gallery: gallery::GalleryState::default(),
            export: export_ui::ExportDialog::default(),
            typed_path: String::new(),
            ctx: None,
        }
    }

    fn images(&mut self, ctx: &egui::Context) -> &mut ImageCache {
        self.images.get_or_insert_with(|| {
            let ctx = ctx.clone();
            ImageCache::new(Arc::new(move || ctx.request_repaint()))
        })
    }

    /// What a background job calls to have the window redrawn with its news.
    fn wake(&self) -> crate::session::Wake {
        let ctx = self.ctx.clone();
        Arc::new(move || {
            if let Some(ctx) = &ctx {
                ctx.request_repaint();
            }
        })
    }

    fn notify(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice {
            text: text.into(),
            error,
        });
    }

    /// Opens a dataset: scans the folder (names only; images decode in the background).
    pub fn open_dataset(&mut self, paths: DatasetPaths) {
        if self.is_training() {
            self.notify("Stop training before opening another dataset.", true);
            return;
        }
        match ImageFolder::scan(&paths.images, paths.labels.as_deref()) {
            Ok(folder) if folder.is_empty() => self.notify(
                format!(
                    "{} has no images (PNG, JPEG, BMP, TIFF or WebP); choose another folder.",
                    paths.images.display()
                ),
                true,
            ),
            Ok(folder) => {
                let unlabelled = if paths.labels.is_some() {
                    folder.unlabelled().len()
                } else {
                    0
                };
                self.dataset = Some(OpenDataset {
                    names: folder.entries().iter().map(|e| e.name.clone()).collect(),
                    class_names: folder.class_names().map(<[String]>::to_vec),
                    unlabelled,
                    paths: paths.clone(),
                });
                self.session = None;
                self.view = MapView::default();
                // A new dataset: show its images until there are clusters to show.
                self.settings.tab = Tab::Dataset;
                if let Some(images) = &mut self.images {
                    images.clear();
                }
                self.settings.recent.retain(|recent| recent != &paths);
                self.settings.recent.insert(0, paths.clone());
                self.settings.recent.truncate(RECENT_LIMIT);
                self.settings.last_dataset = Some(paths);
                self.settings.last_run = None;
                self.notice = None;
            }
            Err(error) => self.notify(format!("{error}"), true),
        }
    }

    /// The folder holding the demo dataset and the runs (`~/.cache/picie-explorer` unless
    /// `PICIE_CACHE_DIR` or [`Self::cache_root`] says otherwise).
    pub fn cache_folder(&self) -> Result<PathBuf, String> {
        match &self.cache_root {
            Some(root) => Ok(root.clone()),
            None => crate::download::weights_cache_dir()
                .map(|weights| weights.with_file_name(""))
                .map_err(|error| error.to_string()),
        }
    }

    /// Generates the demo dataset into the cache folder on first use and opens it.
    pub fn open_demo(&mut self) {
        match self.cache_folder() {
            Ok(root) => self.open_demo_in(&root.join("demo")),
            Err(error) => self.notify(error, true),
        }
    }

    /// Generates (if missing) and opens the demo dataset in `folder`.
    pub fn open_demo_in(&mut self, folder: &Path) {
        if !folder.join("images").is_dir()
            && let Err(error) = write_demo_dataset(folder, &DemoOptions::default())
        {
            self.notify(
                format!(
                    "could not write the demo dataset to {}: {error}",
                    folder.display()
                ),
                true,
            );
            return;
        }
        self.open_dataset(DatasetPaths::from_folder(folder));
        // The demo is small and synthetic: settings that show clusters forming in a minute
        // or two on a CPU.
        if self.dataset.is_some() {
            let cache = self.cache_folder().ok();
            let backbone = crate::model::BackboneKind::MobilenetV2;
            if training::cached_imagenet_weights(cache.as_deref(), backbone).is_some() {
                self.settings.config = training::demo_config_imagenet(&self.settings.config);
                self.settings.weights = WeightsChoice::ImageNet;
            } else {
                self.settings.config = training::demo_config(&self.settings.config);
                // Random settings are in place if the user declines the offer.
                self.settings.weights = WeightsChoice::Random;
                self.training.demo_offer = true;
            }
        }
    }

    /// Reopens a run trained in the app: maps, statistics and timeline, without training.
    pub fn open_run(&mut self, run_dir: &Path) {
        if self.is_training() {
            self.notify("Stop training before opening another run.", true);
            return;
        }
        match SessionState::load(run_dir) {
            Ok(session) => {
                if let Some(paths) = session.dataset.clone()
                    && paths.images.is_dir()
                {
                    self.open_dataset(paths);
                }
                if let Ok(config) =
                    crate::train::RunFolder::open(run_dir).and_then(|run| run.config())
                {
                    self.settings.config = config;
                }
                self.view = MapView::default();
                self.session = Some(session);
                self.load_labels();
                self.gallery = gallery::GalleryState::default();
                self.settings.tab = Tab::Maps;
                self.settings.last_run = Some(run_dir.to_owned());
            }
            Err(error) => self.notify(error, true),
        }
    }

    /// Whether a trainer thread is running.
    pub fn is_training(&self) -> bool {
        self.trainer
            .as_ref()
            .is_some_and(|trainer| !trainer.is_finished())
            || self
                .session
                .as_ref()
                .is_some_and(|session| session.status.running)
    }

    /// Starts training the open dataset into a new run folder (or resumes `resume_run`).
    pub fn start_training(&mut self, ctx: &egui::Context, resume_run: Option<PathBuf>) {
        let Some(dataset) = &self.dataset else {
            self.notify("Open a dataset first.", true);
            return;
        };
        let mut config = self.settings.config.clone();
        match self.training.resolve_weights(
            &self.settings.weights,
            training::cached_imagenet_weights(self.cache_folder().ok().as_deref(), config.backbone),
        ) {
            Ok(weights) => {
                config.weights = weights;
                // Random init means random even with ImageNet weights in the cache.
                config.random_init = self.settings.weights == WeightsChoice::Random;
            }
            Err(message) => {
                self.notify(message, true);
                return;
            }
        }
        if let Err(error) = config.validate() {
            self.notify(format!("Check the training settings: {error}"), true);
            return;
        }
        let run_dir = match &resume_run {
            Some(run) => run.clone(),
            None => match self.cache_folder().map(|root| {
                crate::run::paths::timestamped(&root.join("runs"), &dataset.paths.display_name())
            }) {
                Ok(folder) => folder,
                Err(message) => {
                    self.notify(message, true);
                    return;
                }
            },
        };
        let request = TrainRequest {
            images: dataset.paths.images.clone(),
            labels: dataset.paths.labels.clone(),
            run_dir: run_dir.clone(),
            config,
            resume: resume_run.is_some(),
        };
        let wake_ctx = ctx.clone();
        match TrainerHandle::spawn(request, Arc::new(move || wake_ctx.request_repaint())) {
            Ok(handle) => {
                let mut session = match (&resume_run, self.session.take()) {
                    (Some(_), Some(previous)) if previous.run_dir == run_dir => previous,
                    _ => SessionState::new(&run_dir),
                };
                session.dataset = Some(dataset.paths.clone());
                session.class_names = dataset.class_names.clone();
                session.status.running = true;
                session.status.error = None;
                session.status.activity = Activity::Starting;
                let new_run = resume_run.is_none();
                self.session = Some(session);
                if new_run || self.labels.is_none() {
                    self.load_labels();
                    self.gallery = gallery::GalleryState::default();
                }
                self.trainer = Some(handle);
                self.view.follow_latest = true;
                self.settings.tab = Tab::Maps;
                self.settings.last_run = Some(run_dir);
                self.notice = None;
            }
            Err(error) => self.notify(format!("could not start the trainer thread: {error}"), true),
        }
    }

    /// Sends a command to the running trainer.
    pub fn command(&mut self, command: Command) {
        let note = match &command {
            Command::Pause => Some(Activity::Pausing),
            Command::Stop => Some(Activity::Stopping),
            Command::Resume => None,
            Command::Edit(_) => None,
        };
        if let Command::Edit(_) = &command {
            self.notify(
                "The edit goes to the trainer: the next epoch clusters from the edited \
                 centroids.",
                false,
            );
        }
        if let Some(trainer) = &self.trainer {
            trainer.send(command);
        }
        if let Some(session) = &mut self.session
            && let Some(note) = note
        {
            session.status.activity = note;
        }
    }

    /// Applies the trainer's messages; saves the session at epoch ends.
    fn drain_trainer(&mut self) {
        let Some(trainer) = &self.trainer else {
            return;
        };
        let events = trainer.drain();
        let finished = trainer.is_finished();
        // The trainer thread saves the session; the window only follows it.
        let mut renumberings = Vec::new();
        if let Some(session) = &mut self.session {
            for event in &events {
                session.apply(event);
            }
            renumberings = std::mem::take(&mut session.cluster_edits);
        }
        for origin in renumberings {
            // The trainer merged or split clusters: names and colours follow their clusters,
            // in the undo history too.
            if let Some(history) = &mut self.labels {
                history.renumber(&origin);
                self.relabel = relabel::RelabelState::default();
                self.view.hidden.clear();
                self.save_labels_now();
            }
        }
        if finished && events.is_empty() {
            self.trainer = None;
            if let Some(session) = &mut self.session {
                session.status.running = false;
            }
        }
    }

    /// One frame of the whole window.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.show_frame(ui, None);
    }

    /// One frame; `previous_frame_ms` is eframe's CPU time of the previous whole frame.
    fn show_frame(&mut self, ui: &mut egui::Ui, previous_frame_ms: Option<f32>) {
        let started = Instant::now();
        self.frame += 1;
        let ctx = ui.ctx().clone();
        self.ctx = Some(ctx.clone());
        self.drain_trainer();
        self.poll_download();
        self.images(&ctx).poll(&ctx);
        self.poll_gallery();
        self.handle_dropped_files(&ctx);
        self.handle_shortcuts(&ctx);
        self.label_shortcuts(&ctx);

        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        if self.dataset.is_none() && self.session.is_none() {
            egui::CentralPanel::default().show(ui, |ui| self.start_page(ui));
        } else {
            if self.settings.show_training_panel {
                egui::Panel::left("training")
                    .resizable(true)
                    .default_size(270.0)
                    .show(ui, |ui| self.training_panel(ui));
            }
            if self.settings.show_cluster_panel {
                egui::Panel::right("clusters")
                    .resizable(true)
                    .default_size(240.0)
                    .show(ui, |ui| self.cluster_panel(ui));
            }
            egui::CentralPanel::default().show(ui, |ui| {
                self.notice_line(ui);
                match self.settings.tab {
                    Tab::Maps => self.maps_tab(ui),
                    Tab::Statistics => self.statistics_tab(ui),
                    Tab::Dataset => self.dataset_tab(ui),
                }
            });
        }
        self.zoom_window(&ctx);
        self.gallery_window(&ctx);
        self.export_window(&ctx);
        self.demo_offer_window(&ctx);
        let training = self.is_training();
        self.frame_times.record(
            started.elapsed().as_secs_f32() * 1000.0,
            previous_frame_ms,
            training,
        );
    }

    fn notice_line(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = false;
        if let Some(notice) = &self.notice {
            ui.horizontal(|ui| {
                let colour = if notice.error {
                    ui.visuals().error_fg_color
                } else {
                    ui.visuals().warn_fg_color
                };
                // The button first: a long message then wraps in the width left to it
                // instead of running off the window.
                dismiss = ui.small_button("Dismiss").clicked();
                ui.add(egui::Label::new(egui::RichText::new(&notice.text).color(colour)).wrap());
            });
            ui.separator();
        }
        if dismiss {
            self.notice = None;
        }
    }

    fn start_page(&mut self, ui: &mut egui::Ui) {
        shell::start_page_header(ui);
        self.notice_line(ui);
        match shell::start_page_choices(ui, &self.settings.recent, &mut self.typed_path) {
            Some(StartChoice::PickFolder) => self.pick_folder(),
            Some(StartChoice::Demo) => self.open_demo(),
            Some(StartChoice::PickRun) => self.pick_run(),
            Some(StartChoice::Recent(recent)) => self.open_dataset(recent),
            Some(StartChoice::Path(path)) => self.open_path(&path),
            None => {}
        }
    }

    fn status_bar(&self, ui: &mut egui::Ui) {
        shell::status_bar(
            ui,
            self.session.as_ref(),
            self.dataset.as_ref(),
            self.frame_times.last,
        );
    }
}

impl eframe::App for ExplorerApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let previous_frame_ms = frame.info().cpu_usage.map(|seconds| seconds * 1000.0);
        self.show_frame(ui, previous_frame_ms);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        // Stop at a batch boundary: the last completed epoch's checkpoint and the session
        // stay on disk, so nothing is lost by closing the window.
        if let Some(trainer) = self.trainer.take() {
            trainer.stop_and_join();
        }
        if let Some((median, worst, frames)) = self.frame_times.summary() {
            eprintln!(
                "UI time per frame while training: median {median:.2} ms, worst {worst:.2} ms \
                 over {frames} frames"
            );
        }
        if let Some((median, worst, frames)) =
            median_and_worst(&self.frame_times.whole_frames_while_training)
        {
            eprintln!(
                "whole-frame CPU time while training: median {median:.2} ms, worst {worst:.2} \
                 ms over {frames} frames"
            );
        }
        if let Some(session) = &self.session {
            eprintln!(
                "timeline: {} snapshots, {:.1} MiB of maps; process memory {:.0} MiB",
                session.timeline.len(),
                session.timeline.bytes() as f64 / (1 << 20) as f64,
                crate::bench::current_memory_mib().unwrap_or(f64::NAN)
            );
        }
    }
}

/// `1 h 02 min`, `3 min 05 s`, `12 s`.
pub fn format_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    if seconds >= 3600 {
        format!("{} h {:02} min", seconds / 3600, seconds % 3600 / 60)
    } else if seconds >= 60 {
        format!("{} min {:02} s", seconds / 60, seconds % 60)
    } else {
        format!("{seconds} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(3725.0), "1 h 02 min");
        assert_eq!(format_duration(185.0), "3 min 05 s");
        assert_eq!(format_duration(12.4), "12 s");
    }
}
