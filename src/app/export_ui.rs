//! The export window: index masks, coloured masks, overlays, a legend and a CVAT label map
//! for the whole dataset or the preview images, written on a background thread with progress
//! and cancel; and the Acc / mIoU of exactly those masks when the dataset has labels.

use std::path::PathBuf;

use eframe::egui;

use super::ExplorerApp;
use crate::data::ImageFolder;
use crate::export::{self, ExportError, ExportOptions, ExportProgress, ExportReport};
use crate::labelmap::LabelMap;
use crate::session::Job;

/// What an export job did.
enum ExportOutcome {
    /// Masks were written (or the export was cancelled part way).
    Written(ExportReport),
    /// The masks an export would write were scored against the labels (Acc, mIoU).
    Scored(f64, f64),
}

/// An export or scoring running in the background.
type ExportJob = Job<ExportProgress, Result<ExportOutcome, ExportError>>;

/// The export window's state.
#[derive(Default)]
pub struct ExportDialog {
    /// The window is open.
    pub open: bool,
    /// Output folder.
    pub out: Option<PathBuf>,
    /// What to write.
    pub options: ExportOptions,
    /// Only the preview images.
    pub previews_only: bool,
    running: Option<ExportJob>,
    /// The last export's report.
    pub report: Option<ExportReport>,
    /// Acc and mIoU of the masks, when scored.
    pub score: Option<(f64, f64)>,
    error: Option<String>,
}

impl ExplorerApp {
    pub(super) fn export_window(&mut self, ctx: &egui::Context) {
        self.poll_export();
        if !self.export.open {
            return;
        }
        let mut open = true;
        egui::Window::new("Export segmentations")
            .id(egui::Id::unique("export-window"))
            .open(&mut open)
            .default_width(420.0)
            .show(ctx, |ui| self.export_contents(ui));
        self.export.open = open;
    }

    fn export_contents(&mut self, ui: &mut egui::Ui) {
        let running = self.export.running.is_some();
        let Some(session) = self.session.clone() else {
            ui.label("Train or open a run first.");
            return;
        };
        ui.label(
            "Masks at each image's original resolution, with your names, colours, merges \
             and ignored clusters (255 in index masks).",
        );
        ui.add_enabled_ui(!running, |ui| {
            ui.horizontal(|ui| {
                if ui.button("Output folder…").clicked()
                    && let Some(folder) = rfd::FileDialog::new()
                        .set_title("Export segmentations to")
                        .pick_folder()
                {
                    self.export.out = Some(folder);
                }
                match &self.export.out {
                    Some(out) => ui.monospace(out.display().to_string()),
                    None => ui.weak("not chosen"),
                };
            });
            ui.checkbox(
                &mut self.export.options.index,
                "Index masks (8-bit, id per pixel)",
            );
            ui.checkbox(&mut self.export.options.colour, "Coloured masks");
            ui.checkbox(&mut self.export.options.overlay, "Overlays on the images");
            ui.checkbox(
                &mut self.export.options.cvat,
                "CVAT labelmap.txt (Segmentation mask 1.1)",
            );
            ui.horizontal(|ui| {
                ui.radio_value(&mut self.export.previews_only, false, "All images");
                ui.radio_value(&mut self.export.previews_only, true, "Preview images only");
            });
        });
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            if let Some(job) = &mut self.export.running {
                if let Some(progress) = job.progress() {
                    ui.add(
                        egui::ProgressBar::new(progress.done as f32 / progress.total.max(1) as f32)
                            .text(format!(
                                "{}/{} {}",
                                progress.done, progress.total, progress.current
                            ))
                            .desired_width(260.0),
                    );
                } else {
                    ui.spinner();
                }
                if ui
                    .add_enabled(!job.is_cancelled(), egui::Button::new("Cancel"))
                    .clicked()
                {
                    job.cancel();
                }
            } else {
                let can_export = self.export.out.is_some() && self.dataset.is_some();
                if ui
                    .add_enabled(can_export, egui::Button::new("Export"))
                    .on_disabled_hover_text("Choose an output folder (and keep the dataset folder)")
                    .clicked()
                {
                    self.start_export(&session.run_dir, false);
                }
                let labelled = self
                    .dataset
                    .as_ref()
                    .is_some_and(|dataset| dataset.paths.labels.is_some());
                if labelled
                    && ui
                        .button("Score against labels")
                        .on_hover_text("Acc / mIoU of exactly the masks an export writes")
                        .clicked()
                {
                    self.start_export(&session.run_dir, true);
                }
            }
        });
        if let Some(error) = &self.export.error {
            ui.colored_label(ui.visuals().error_fg_color, error);
        }
        if let Some((accuracy, miou)) = self.export.score {
            ui.strong(format!("These masks: Acc {accuracy:.2}  mIoU {miou:.2}"))
                .on_hover_text(
                    "At each image's original resolution, with your merges and ignores, \
                     against the label files: what `picie eval --masks` gives for the \
                     exported index folder. The Statistics tab scores the training input size \
                     without your edits, so the two differ.",
                );
        }
        if let Some(report) = &self.export.report {
            ui.separator();
            ui.label(format!(
                "{} images written{}",
                report.written,
                if report.cancelled { " (cancelled)" } else { "" }
            ));
            if !report.failed.is_empty() {
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("{} images failed (hover to read)", report.failed.len()),
                )
                .on_hover_text(
                    report
                        .failed
                        .iter()
                        .map(|(name, reason)| format!("{name}: {reason}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            for entry in &report.legend {
                ui.horizontal(|ui| {
                    let [r, g, b] = entry.colour;
                    let (swatch, _) =
                        ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                    ui.painter()
                        .rect_filled(swatch, 2.0, egui::Color32::from_rgb(r, g, b));
                    ui.label(format!(
                        "{} {}  {:.1}%",
                        entry.id,
                        entry.name,
                        entry.pixel_share * 100.0
                    ));
                });
            }
        }
    }

    fn start_export(&mut self, run_dir: &std::path::Path, score_only: bool) {
        let Some(dataset) = &self.dataset else {
            return;
        };
        let clusters = self.cluster_count();
        let labels = self
            .labels
            .as_ref()
            .map_or_else(|| LabelMap::new(clusters), |history| history.map().clone());
        let only = self.export.previews_only.then(|| {
            self.session
                .as_ref()
                .and_then(|s| s.timeline.latest())
                .map(|snapshot| snapshot.maps.iter().map(|m| m.image_name.clone()).collect())
                .unwrap_or_default()
        });
        let options = ExportOptions {
            only,
            ..self.export.options.clone()
        };
        let out = match (score_only, self.export.out.clone()) {
            (true, _) => None,
            (false, Some(out)) => Some(out),
            (false, None) => {
                self.export.error = Some("Choose an output folder first.".to_string());
                return;
            }
        };
        let images = dataset.paths.images.clone();
        let label_dir = dataset.paths.labels.clone();
        let run_dir = run_dir.to_owned();
        let device = self.settings.config.device.clone();
        let wake = self.wake();
        let job = Job::spawn("export", wake, move |job| {
            let compute = crate::device::select_device(&device)?;
            let (segmenter, _) = export::segmenter_for_run(&run_dir, &compute)?;
            let folder = ImageFolder::scan(&images, label_dir.as_deref())?;
            let Some(out) = out else {
                let evaluation = export::score_segmentation(&segmenter, &folder, &labels)?;
                return Ok(ExportOutcome::Scored(
                    evaluation.accuracy,
                    evaluation.mean_iou,
                ));
            };
            let report = export::export_segmentations(
                &segmenter,
                &folder,
                &labels,
                &out,
                &options,
                &mut |progress| job.report(progress.clone()),
                job.cancel_flag(),
            )?;
            Ok(ExportOutcome::Written(report))
        });
        match job {
            Ok(job) => {
                self.export.running = Some(job);
                self.export.error = None;
                if score_only {
                    self.export.score = None;
                } else {
                    self.export.report = None;
                }
            }
            Err(error) => self.export.error = Some(error.to_string()),
        }
    }

    fn poll_export(&mut self) {
        let Some(job) = &mut self.export.running else {
            return;
        };
        let Some(outcome) = job.try_result() else {
            return;
        };
        self.export.running = None;
        match outcome {
            Ok(Ok(ExportOutcome::Written(report))) => self.export.report = Some(report),
            Ok(Ok(ExportOutcome::Scored(accuracy, miou))) => {
                self.export.score = Some((accuracy, miou))
            }
            Ok(Err(error)) => self.export.error = Some(error.to_string()),
            Err(error) => self.export.error = Some(error.to_string()),
        }
    }
}
