//! The export window: index masks, coloured masks, overlays, a legend and a CVAT label map
//! for the whole dataset or the preview images, written on a background thread with progress
//! and cancel; and the Acc / mIoU of exactly those masks when the dataset has labels.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam::channel::{Receiver, unbounded};
use eframe::egui;

use super::ExplorerApp;
use crate::data::ImageFolder;
use crate::export::{self, ExportOptions, ExportProgress, ExportReport};
use crate::labelmap::LabelMap;

enum ExportMessage {
    Progress(ExportProgress),
    Done(Result<ExportReport, String>),
    Score(Result<(f64, f64), String>),
}

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
    progress: Option<ExportProgress>,
    running: Option<(Receiver<ExportMessage>, Arc<AtomicBool>)>,
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
            if running {
                if let Some(progress) = &self.export.progress {
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
                if ui.button("Cancel").clicked()
                    && let Some((_, cancel)) = &self.export.running
                {
                    cancel.store(true, Ordering::Relaxed);
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
        let out = self.export.out.clone();
        let images = dataset.paths.images.clone();
        let label_dir = dataset.paths.labels.clone();
        let run_dir = run_dir.to_owned();
        let cancel = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = unbounded();
        let ctx = self.ctx.clone();
        let thread_cancel = cancel.clone();
        let spawned = std::thread::Builder::new()
            .name("picie-export".into())
            .spawn(move || {
                let wake = || {
                    if let Some(ctx) = &ctx {
                        ctx.request_repaint();
                    }
                };
                let run = || -> Result<Option<ExportReport>, String> {
                    let (segmenter, _) =
                        export::segmenter_for_run(&run_dir, None).map_err(|e| e.to_string())?;
                    let folder = ImageFolder::scan(&images, label_dir.as_deref())
                        .map_err(|e| e.to_string())?;
                    if score_only {
                        let evaluation = export::score_segmentation(&segmenter, &folder, &labels)
                            .map_err(|e| e.to_string())?;
                        let _ = sender.send(ExportMessage::Score(Ok((
                            evaluation.accuracy,
                            evaluation.mean_iou,
                        ))));
                        return Ok(None);
                    }
                    let out = out.ok_or("choose an output folder")?;
                    let report = export::export_segmentations(
                        &segmenter,
                        &folder,
                        &labels,
                        &out,
                        &options,
                        &mut |progress| {
                            let _ = sender.send(ExportMessage::Progress(progress.clone()));
                            wake();
                        },
                        &thread_cancel,
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(Some(report))
                };
                match run() {
                    Ok(Some(report)) => {
                        let _ = sender.send(ExportMessage::Done(Ok(report)));
                    }
                    Ok(None) => {
                        let _ = sender.send(ExportMessage::Done(Err(String::new())));
                    }
                    Err(error) => {
                        let _ = sender.send(ExportMessage::Done(Err(error)));
                    }
                }
                wake();
            });
        match spawned {
            Ok(_) => {
                self.export.running = Some((receiver, cancel));
                self.export.progress = None;
                self.export.error = None;
                if score_only {
                    self.export.score = None;
                } else {
                    self.export.report = None;
                }
            }
            Err(error) => self.export.error = Some(format!("could not start the export: {error}")),
        }
    }

    fn poll_export(&mut self) {
        let Some((receiver, _)) = &self.export.running else {
            return;
        };
        let messages: Vec<ExportMessage> = receiver.try_iter().collect();
        for message in messages {
            match message {
                ExportMessage::Progress(progress) => self.export.progress = Some(progress),
                ExportMessage::Score(Ok(score)) => self.export.score = Some(score),
                ExportMessage::Score(Err(error)) => self.export.error = Some(error),
                ExportMessage::Done(result) => {
                    self.export.running = None;
                    match result {
                        Ok(report) => self.export.report = Some(report),
                        Err(error) if error.is_empty() => {}
                        Err(error) => self.export.error = Some(error),
                    }
                }
            }
        }
    }
}
