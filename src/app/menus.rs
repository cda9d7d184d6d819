//! How the user opens things and moves around: the menu bar, keyboard shortcuts, dropped
//! folders, the folder pickers (with a typed-path fallback), and the dataset tab.

use super::*;

impl ExplorerApp {
    /// Opens what a path names: a run folder made by the app, or a folder of images.
    pub fn open_path(&mut self, path: &Path) {
        // A run folder (the app's or the CLI's) opens as a run, never as an image folder.
        if SessionState::path_in(path).is_file() || crate::run::paths::config(path).is_file() {
            self.open_run(path);
        } else if path.is_dir() {
            self.open_dataset(DatasetPaths::from_folder(path));
        } else {
            self.notify(
                format!(
                    "{} is not a folder: open a folder of images (or a run folder) instead.",
                    path.display()
                ),
                true,
            );
        }
    }

    pub(super) fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|input| {
            input
                .raw
                .dropped_files
                .iter()
                .map(|file| file.path().to_path_buf())
                .collect()
        });
        if let Some(path) = dropped.into_iter().next() {
            self.open_path(&path);
        }
    }

    pub(super) fn handle_shortcuts(&mut self, ctx: &egui::Context) {
        let open = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::O);
        if ctx.input_mut(|input| input.consume_shortcut(&open)) {
            self.pick_folder();
        }
        let quit = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Q);
        if ctx.input_mut(|input| input.consume_shortcut(&quit)) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    pub(super) fn pick_folder(&mut self) {
        if let Some(folder) = rfd::FileDialog::new()
            .set_title("Open a folder of images")
            .pick_folder()
        {
            self.open_dataset(DatasetPaths::from_folder(&folder));
        }
    }

    pub(super) fn pick_run(&mut self) {
        let start = self.cache_folder().map(|root| root.join("runs")).ok();
        let mut dialog = rfd::FileDialog::new().set_title("Open a run folder");
        if let Some(start) = start.filter(|path| path.is_dir()) {
            dialog = dialog.set_directory(start);
        }
        if let Some(folder) = dialog.pick_folder() {
            self.open_run(&folder);
        }
    }

    pub(super) fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open folder…  (Ctrl+O)").clicked() {
                    ui.close();
                    self.pick_folder();
                }
                if ui.button("Open run…").clicked() {
                    ui.close();
                    self.pick_run();
                }
                if ui.button("Try the demo dataset").clicked() {
                    ui.close();
                    self.open_demo();
                }
                if ui
                    .add_enabled(
                        self.session.is_some(),
                        egui::Button::new("Export segmentations…"),
                    )
                    .clicked()
                {
                    ui.close();
                    self.export.open = true;
                }
                ui.menu_button("Recent", |ui| {
                    if self.settings.recent.is_empty() {
                        ui.label("Nothing yet");
                    }
                    for recent in self.settings.recent.clone() {
                        if ui
                            .button(recent.display_name())
                            .on_hover_text(recent.images.display().to_string())
                            .clicked()
                        {
                            ui.close();
                            self.open_dataset(recent);
                        }
                    }
                });
                ui.separator();
                if ui.button("Quit  (Ctrl+Q)").clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("View", |ui| {
                ui.checkbox(&mut self.settings.show_training_panel, "Training panel");
                ui.checkbox(&mut self.settings.show_cluster_panel, "Cluster list");
            });
            if self.dataset.is_some() || self.session.is_some() {
                ui.separator();
                ui.selectable_value(&mut self.settings.tab, Tab::Maps, "Cluster maps");
                ui.selectable_value(&mut self.settings.tab, Tab::Statistics, "Statistics");
                ui.selectable_value(&mut self.settings.tab, Tab::Dataset, "Dataset");
            }
        });
    }

    pub(super) fn dataset_tab(&mut self, ui: &mut egui::Ui) {
        let Some(dataset) = &self.dataset else {
            ui.label("The run's dataset folder is not available.");
            return;
        };
        ui.horizontal(|ui| {
            ui.strong(dataset.paths.images.display().to_string());
            ui.label(format!("{} images", dataset.names.len()));
            if let Some(labels) = &dataset.paths.labels {
                ui.label(format!("labels in {}", labels.display()));
                if dataset.unlabelled > 0 {
                    ui.colored_label(
                        ui.visuals().warn_fg_color,
                        format!("{} images have no label file", dataset.unlabelled),
                    );
                }
            }
        });
        if let Some(classes) = &dataset.class_names {
            ui.label(format!("classes: {}", classes.join(", ")));
        }
        ui.separator();
        let thumbnail = 112.0;
        let names = dataset.names.clone();
        let root = dataset.paths.images.clone();
        let columns = ((ui.available_width() / (thumbnail + 8.0)).floor() as usize).max(1);
        let rows = names.len().div_ceil(columns);
        let ctx = ui.ctx().clone();
        egui::ScrollArea::vertical().show_rows(ui, thumbnail + 24.0, rows, |ui, visible| {
            for row in visible {
                ui.horizontal(|ui| {
                    for name in names.iter().skip(row * columns).take(columns) {
                        let request = ImageRequest::Thumbnail(root.join(name), 128);
                        ui.vertical(|ui| {
                            ui.set_width(thumbnail);
                            let images = self.images(&ctx);
                            if let Some(texture) = images.get(&request) {
                                ui.add(
                                    egui::Image::new(texture)
                                        .max_size(egui::vec2(thumbnail, thumbnail)),
                                );
                            } else if let Some(error) = images.error(&request) {
                                ui.colored_label(ui.visuals().error_fg_color, "unreadable")
                                    .on_hover_text(error.to_string());
                            } else {
                                ui.add_sized([thumbnail, thumbnail], egui::Spinner::new());
                            }
                            ui.add(egui::Label::new(egui::RichText::new(name).small()).truncate());
                        });
                    }
                });
            }
        });
    }
}
