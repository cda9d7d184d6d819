//! PiCIE Explorer, the desktop app. This first version is the start page: open a folder or
//! generate the demo dataset, and see what was found. Training and the live cluster views
//! come with the explorer.

use std::path::{Path, PathBuf};

use eframe::egui;
use picie::data::{DemoOptions, ImageFolder, write_demo_dataset};

fn main() -> eframe::Result {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("PiCIE Explorer")
            .with_inner_size([960.0, 640.0]),
        ..Default::default()
    };
    eframe::run_native(
        "PiCIE Explorer",
        options,
        Box::new(|_creation| Ok(Box::<StartPage>::default())),
    )
}

/// What the start page shows about the chosen dataset.
#[derive(Default)]
struct StartPage {
    dataset: Option<DatasetSummary>,
    error: Option<String>,
}

struct DatasetSummary {
    folder: PathBuf,
    images: usize,
    classes: Option<Vec<String>>,
    sample: Vec<String>,
}

impl StartPage {
    fn open(&mut self, images: &Path, labels: Option<&Path>) {
        match ImageFolder::scan(images, labels) {
            Ok(folder) => {
                self.dataset = Some(DatasetSummary {
                    folder: images.to_owned(),
                    images: folder.len(),
                    classes: folder.class_names().map(<[String]>::to_vec),
                    sample: folder
                        .entries()
                        .iter()
                        .take(12)
                        .map(|entry| entry.name.clone())
                        .collect(),
                });
                self.error = None;
            }
            Err(error) => self.error = Some(error.to_string()),
        }
    }

    fn open_demo(&mut self) {
        let folder = match picie::download::weights_cache_dir() {
            Ok(weights) => weights.with_file_name("demo"),
            Err(error) => {
                self.error = Some(error.to_string());
                return;
            }
        };
        if let Err(error) = write_demo_dataset(&folder, &DemoOptions::default()) {
            self.error = Some(error.to_string());
            return;
        }
        self.open(&folder.join("images"), Some(&folder.join("labels")));
    }
}

impl eframe::App for StartPage {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        // A folder dropped on the window opens like one chosen in the dialog.
        let dropped: Vec<PathBuf> = ui.ctx().input(|input| {
            input
                .raw
                .dropped_files
                .iter()
                .map(|file| file.path().to_path_buf())
                .collect()
        });
        if let Some(path) = dropped.into_iter().find(|path| path.is_dir()) {
            self.open(&path, None);
        }

        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("PiCIE Explorer");
            ui.label(
                "Find the visual concepts in a folder of unlabelled images: PiCIE clusters \
                 pixel features so that each cluster becomes a segment class.",
            );
            ui.add_space(12.0);
            ui.horizontal(|ui| {
                if ui.button("Open folder…").clicked()
                    && let Some(folder) = rfd::FileDialog::new().pick_folder()
                {
                    self.open(&folder, None);
                }
                if ui
                    .button("Try the demo dataset")
                    .on_hover_text("Generates a small labelled synthetic dataset offline")
                    .clicked()
                {
                    self.open_demo();
                }
            });
            ui.label("…or drop a folder onto this window.");
            ui.add_space(12.0);
            if let Some(error) = &self.error {
                ui.colored_label(egui::Color32::LIGHT_RED, error);
            }
            if let Some(dataset) = &self.dataset {
                ui.separator();
                ui.strong(dataset.folder.display().to_string());
                ui.label(format!("{} images", dataset.images));
                if let Some(classes) = &dataset.classes {
                    ui.label(format!("labelled classes: {}", classes.join(", ")));
                }
                for name in &dataset.sample {
                    ui.monospace(name);
                }
            }
        });
    }
}
