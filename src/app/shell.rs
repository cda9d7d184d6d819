//! The window's frame around the explorer: the start page and the status bar. Each draws from
//! what it is given and returns what the user chose, so it can be tested alone.

use std::path::PathBuf;

use eframe::egui;

use super::{OpenDataset, format_duration};
use crate::session::{DatasetPaths, SessionState};

/// What the user chose on the start page.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum StartChoice {
    /// "Open folder…": pick a folder of images.
    PickFolder,
    /// "Try the demo dataset".
    Demo,
    /// "Open run…": pick a run folder.
    PickRun,
    /// One of the recent datasets.
    Recent(DatasetPaths),
    /// A folder (of images, or a run) whose path was typed: the route that works where the
    /// system's folder dialog cannot open.
    Path(PathBuf),
}

/// The start page's title and what the app does.
pub(super) fn start_page_header(ui: &mut egui::Ui) {
    ui.add_space(24.0);
    ui.vertical_centered(|ui| {
        ui.heading("PiCIE Explorer");
        ui.label(
            "Find the visual concepts in a folder of unlabelled images: PiCIE learns pixel \
             features and clusters them, and each cluster becomes a segment class.",
        );
    });
    ui.add_space(16.0);
}

/// The start page's buttons, a field for a typed path (kept in `typed_path`) and `recent`
/// datasets; what the user chose, if anything.
pub(super) fn start_page_choices(
    ui: &mut egui::Ui,
    recent: &[DatasetPaths],
    typed_path: &mut String,
) -> Option<StartChoice> {
    let mut choice = None;
    ui.vertical_centered(|ui| {
        let button = |ui: &mut egui::Ui, text: &str, hover: &str| {
            ui.add_sized([260.0, 32.0], egui::Button::new(text))
                .on_hover_text(hover)
                .clicked()
        };
        if button(
            ui,
            "Open folder…",
            "A folder of images; an images/ + labels/ layout is recognised",
        ) {
            choice = Some(StartChoice::PickFolder);
        }
        ui.add_space(6.0);
        if button(
            ui,
            "Try the demo dataset",
            "Generates 48 small labelled synthetic scenes, offline",
        ) {
            choice = Some(StartChoice::Demo);
        }
        ui.add_space(6.0);
        if button(ui, "Open run…", "Reopen a training run made in this app") {
            choice = Some(StartChoice::PickRun);
        }
        ui.add_space(8.0);
        ui.weak("…or drop a folder onto this window, or type its path:");
        let field = ui.add_sized(
            [260.0, 22.0],
            egui::TextEdit::singleline(typed_path).hint_text("/path/to/images or a run folder"),
        );
        let entered = field.lost_focus() && ui.input(|input| input.key_pressed(egui::Key::Enter));
        let path = typed_path.trim();
        if (ui
            .add_enabled(!path.is_empty(), egui::Button::new("Open path"))
            .clicked()
            || entered)
            && !path.is_empty()
        {
            choice = Some(StartChoice::Path(PathBuf::from(path)));
        }
        ui.add_space(16.0);
        if !recent.is_empty() {
            ui.strong("Recent datasets");
            for dataset in recent {
                if ui
                    .link(dataset.display_name())
                    .on_hover_text(dataset.images.display().to_string())
                    .clicked()
                {
                    choice = Some(StartChoice::Recent(dataset.clone()));
                }
            }
        }
    });
    choice
}

/// The status bar: the dataset without a session; with one, the device, the activity and its
/// progress, epoch and step, speed and time left, memory, and the last frame's cost.
pub(super) fn status_bar(
    ui: &mut egui::Ui,
    session: Option<&SessionState>,
    dataset: Option<&OpenDataset>,
    last_frame_ms: f32,
) {
    ui.horizontal(|ui| {
        let Some(session) = session else {
            match dataset {
                Some(dataset) => ui.label(format!(
                    "{}: {} images{}",
                    dataset.paths.display_name(),
                    dataset.names.len(),
                    if dataset.paths.labels.is_some() {
                        ", with labels"
                    } else {
                        ""
                    }
                )),
                None => ui.label("No dataset open"),
            };
            return;
        };
        let status = &session.status;
        if !status.device.is_empty() {
            ui.label(&status.device).on_hover_text(&status.weights);
            ui.separator();
        }
        ui.label(status.activity.to_string());
        if let Some(fraction) = status.activity_fraction.filter(|_| status.running) {
            ui.add(egui::ProgressBar::new(fraction).desired_width(120.0));
        }
        ui.separator();
        if status.epochs > 0 {
            ui.label(format!("epoch {}/{}", status.epoch, status.epochs));
            if status.steps_per_epoch > 0 {
                ui.label(format!("step {}/{}", status.step, status.steps_per_epoch));
            }
            ui.separator();
        }
        if status.images_per_second > 0.0 {
            ui.label(format!("{:.1} images/s", status.images_per_second));
            if status.running {
                ui.label(format!("ETA {}", format_duration(status.eta_seconds)));
            }
            ui.separator();
        }
        if let Some(memory) = crate::bench::current_memory_mib() {
            ui.label(format!("{memory:.0} MiB")).on_hover_text(format!(
                "Memory used by the app (resident); {} snapshots of maps kept, {:.1} MiB",
                session.timeline.len(),
                session.timeline.bytes() as f64 / (1 << 20) as f64
            ));
            ui.separator();
        }
        ui.weak(format!("UI {last_frame_ms:.1} ms"))
            .on_hover_text("Time spent building the last frame");
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::*;
    use crate::session::Activity;
    use crate::train::TrainPhase;

    fn dataset(folder: &str) -> DatasetPaths {
        DatasetPaths {
            images: PathBuf::from(folder),
            labels: None,
        }
    }

    #[test]
    fn the_start_page_reports_the_button_or_recent_dataset_clicked() {
        let recent = vec![dataset("/data/street"), dataset("/data/slides")];
        let mut typed = String::new();
        let mut harness = Harness::new_ui_state(
            |ui, choice: &mut Option<StartChoice>| {
                if let Some(clicked) = start_page_choices(ui, &recent, &mut typed) {
                    *choice = Some(clicked);
                }
            },
            None,
        );
        harness.get_by_label("Recent datasets");
        harness.get_by_label("Try the demo dataset").click();
        harness.run();
        assert_eq!(harness.state(), &Some(StartChoice::Demo));
        harness.get_by_label("slides").click();
        harness.run();
        assert_eq!(
            harness.state(),
            &Some(StartChoice::Recent(dataset("/data/slides")))
        );
        harness.get_by_label("Open run…").click();
        harness.run();
        assert_eq!(harness.state(), &Some(StartChoice::PickRun));
    }

    #[test]
    fn a_typed_path_opens_with_enter_or_the_button() {
        let mut typed = String::new();
        let mut harness = Harness::new_ui_state(
            |ui, choice: &mut Option<StartChoice>| {
                if let Some(chosen) = start_page_choices(ui, &[], &mut typed) {
                    *choice = Some(chosen);
                }
            },
            None,
        );
        // Nothing typed: the button does nothing.
        harness.get_by_label("Open path").click();
        harness.run();
        assert_eq!(harness.state(), &None);
        let field = harness.get_by_role(egui::accesskit::Role::TextInput);
        field.focus();
        field.type_text(" /data/street ");
        harness.run();
        harness.key_press(egui::Key::Enter);
        harness.run();
        assert_eq!(
            harness.state(),
            &Some(StartChoice::Path(PathBuf::from("/data/street")))
        );
    }

    #[test]
    fn the_status_bar_shows_a_running_sessions_progress() {
        let mut session = SessionState::new(Path::new("/runs/street"));
        let status = &mut session.status;
        status.device = "CPU: 2 threads".into();
        status.activity = Activity::Phase(TrainPhase::Training);
        status.running = true;
        status.epoch = 3;
        status.epochs = 10;
        status.step = 5;
        status.steps_per_epoch = 20;
        status.images_per_second = 12.34;
        status.eta_seconds = 185.0;
        let harness = Harness::new_ui(|ui| status_bar(ui, Some(&session), None, 2.5));
        harness.get_by_label("CPU: 2 threads");
        harness.get_by_label(TrainPhase::Training.describe());
        harness.get_by_label("epoch 3/10");
        harness.get_by_label("step 5/20");
        harness.get_by_label("12.3 images/s");
        harness.get_by_label("ETA 3 min 05 s");
        harness.get_by_label("UI 2.5 ms");
    }

    #[test]
    fn without_a_session_the_status_bar_describes_the_dataset() {
        let open = OpenDataset {
            paths: DatasetPaths {
                images: PathBuf::from("/data/street"),
                labels: Some(PathBuf::from("/data/street-labels")),
            },
            names: vec!["a.png".into(), "b.png".into()],
            class_names: None,
            unlabelled: 0,
        };
        let harness = Harness::new_ui(|ui| status_bar(ui, None, Some(&open), 1.0));
        harness.get_by_label("street: 2 images, with labels");
        let empty = Harness::new_ui(|ui| status_bar(ui, None, None, 1.0));
        empty.get_by_label("No dataset open");
    }
}
