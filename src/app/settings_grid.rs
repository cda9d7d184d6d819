//! The training settings: every hyperparameter of a run with a tooltip, and the device
//! (with a remote server's address and token). Edits the configuration it is given, so it can
//! be drawn and tested alone.

use eframe::egui;

use super::remote_ui::RemotePanel;
use crate::config::{LearningRateSchedule, TrainConfig};
use crate::device::DeviceChoice;
use crate::loss::BalanceMode;
use crate::model::BackboneKind;
use crate::session::Wake;

/// Draws the settings grid for `config`; `remote` keeps the remote server's fields and `wake`
/// redraws the window when its connection test answers.
pub(super) fn settings_grid(
    ui: &mut egui::Ui,
    config: &mut TrainConfig,
    remote: &mut RemotePanel,
    wake: Wake,
) {
    egui::Grid::new("training-settings")
        .num_columns(2)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            let label = ui.label("Backbone").on_hover_text(
                "The feature extractor under the FPN. ResNet-18 is the paper's; MobileNetV2 \
                 is about 3x faster on a CPU.",
            );
            egui::ComboBox::from_id_salt("backbone")
                .selected_text(backbone_name(config.backbone))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut config.backbone, BackboneKind::Resnet18, "resnet18");
                    ui.selectable_value(
                        &mut config.backbone,
                        BackboneKind::MobilenetV2,
                        "mobilenet_v2",
                    );
                })
                .response
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Clusters K").on_hover_text(
                "How many concepts to find. Auto: the number of labelled classes, else 27.",
            );
            let mut auto = config.clusters.is_none();
            ui.horizontal(|ui| {
                ui.checkbox(&mut auto, "auto");
                if auto {
                    config.clusters = None;
                } else {
                    let mut k = config.clusters.unwrap_or(27);
                    ui.add(egui::DragValue::new(&mut k).range(2..=255))
                        .labelled_by(label.id);
                    config.clusters = Some(k);
                }
            });
            ui.end_row();

            let label = ui.label("Overclustering K2").on_hover_text(
                "PiCIE + H: a second, larger clustering head trained alongside (the paper \
                 uses 100). Off by default.",
            );
            let mut overcluster = config.overclusters.is_some();
            ui.horizontal(|ui| {
                ui.checkbox(&mut overcluster, "on");
                if overcluster {
                    let mut k2 = config.overclusters.unwrap_or(100);
                    ui.add(egui::DragValue::new(&mut k2).range(2..=1000))
                        .labelled_by(label.id);
                    config.overclusters = Some(k2);
                } else {
                    config.overclusters = None;
                }
            });
            ui.end_row();

            let label = ui.label("Input size").on_hover_text(
                "Side of the square the network sees, in pixels. Larger sees more detail \
                 and costs quadratically more.",
            );
            ui.add(
                egui::DragValue::new(&mut config.input_size)
                    .range(32..=1024)
                    .speed(8),
            )
            .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Base size").on_hover_text(
                "Images are first resized so the shorter side is this, then centre-cropped \
                 square; crops for the views come from there.",
            );
            ui.add(
                egui::DragValue::new(&mut config.base_size)
                    .range(32..=2048)
                    .speed(8),
            )
            .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Epochs").on_hover_text(
                "Each epoch clusters the whole dataset again, then trains on the new labels.",
            );
            ui.add(egui::DragValue::new(&mut config.epochs).range(1..=1000))
                .labelled_by(label.id);
            ui.end_row();

            let label = ui
                .label("Batch")
                .on_hover_text("Images per optimisation step.");
            ui.add(egui::DragValue::new(&mut config.batch_size).range(1..=256))
                .labelled_by(label.id);
            ui.end_row();

            let label = ui
                .label("Learning rate")
                .on_hover_text("Adam's step size (the paper: 1e-4).");
            ui.add(
                egui::DragValue::new(&mut config.learning_rate)
                    .range(1e-6..=1e-1)
                    .speed(1e-5)
                    .custom_formatter(|value, _| format!("{value:.0e}")),
            )
            .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Rate schedule").on_hover_text(
                "constant = the same rate throughout (the paper); cosine = falling to zero \
                 by the last epoch, so the clusters settle instead of moving to the end.",
            );
            egui::ComboBox::from_id_salt("lr-schedule")
                .selected_text(format!("{:?}", config.learning_rate_schedule).to_lowercase())
                .show_ui(ui, |ui| {
                    for schedule in [LearningRateSchedule::Constant, LearningRateSchedule::Cosine] {
                        ui.selectable_value(
                            &mut config.learning_rate_schedule,
                            schedule,
                            format!("{schedule:?}").to_lowercase(),
                        );
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Balance").on_hover_text(
                "Class weights in the loss: reference = the authors' (weights proportional \
                 to cluster size), inverse = rare clusters weigh more, none = plain.",
            );
            egui::ComboBox::from_id_salt("balance")
                .selected_text(format!("{:?}", config.balance).to_lowercase())
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut config.balance, BalanceMode::Reference, "reference");
                    ui.selectable_value(&mut config.balance, BalanceMode::Inverse, "inverse");
                    ui.selectable_value(&mut config.balance, BalanceMode::None, "none");
                })
                .response
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Device").on_hover_text(
                "auto: a real GPU through wgpu if there is one, else the CPU. wgpu forces \
                 the GPU backend even on a software adapter (slow). Remote server: the GPU \
                 of another machine running `picie serve`.",
            );
            let remote_selected = config.device.is_remote();
            egui::ComboBox::from_id_salt("device")
                .selected_text(if remote_selected {
                    "remote server".to_owned()
                } else {
                    config.device.to_string()
                })
                .show_ui(ui, |ui| {
                    for choice in DeviceChoice::LOCAL {
                        let name = choice.to_string();
                        ui.selectable_value(&mut config.device, choice, name);
                    }
                    if ui
                        .selectable_label(remote_selected, "Remote server…")
                        .clicked()
                        && !remote_selected
                    {
                        // An address typed before is kept; a fresh one needs editing.
                        config.device = remote.choice().unwrap_or_else(|_| {
                            DeviceChoice::Remote(crate::device::RemoteServer {
                                url: super::remote_ui::DEFAULT_ADDRESS.to_owned(),
                                token: None,
                            })
                        });
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
            if config.device.is_remote() {
                remote.show(ui, &mut config.device, wake.clone());
            }

            let label = ui.label("Seed").on_hover_text(
                "Fixes the views, the batch order, k-means and random init: the same seed \
                 repeats a run exactly on the CPU.",
            );
            ui.add(egui::DragValue::new(&mut config.seed))
                .labelled_by(label.id);
            ui.end_row();

            let label = ui
                .label("Preview images")
                .on_hover_text("How many images get live cluster maps.");
            ui.add(egui::DragValue::new(&mut config.preview_images).range(0..=64))
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Refresh maps every").on_hover_text(
                "Steps between map updates within an epoch (0: only after each clustering).",
            );
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut config.preview_every_steps).range(0..=1000))
                    .labelled_by(label.id);
                ui.label("steps");
            });
            ui.end_row();
        });
}

/// The backbone as the settings show it.
pub(super) fn backbone_name(backbone: BackboneKind) -> &'static str {
    match backbone {
        BackboneKind::Resnet18 => "resnet18",
        BackboneKind::MobilenetV2 => "mobilenet_v2",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::*;

    #[test]
    fn the_grid_shows_every_setting_and_changes_the_backbone() {
        let mut harness = Harness::new_ui_state(
            |ui, (config, remote): &mut (TrainConfig, RemotePanel)| {
                settings_grid(ui, config, remote, Arc::new(|| {}));
            },
            (TrainConfig::default(), RemotePanel::default()),
        );
        for label in [
            "Backbone",
            "Clusters K",
            "Input size",
            "Epochs",
            "Batch",
            "Learning rate",
            "Device",
            "Seed",
        ] {
            harness.get_by_label(label);
        }
        assert_eq!(harness.state().0.backbone, BackboneKind::Resnet18);
        // The first drop-down is the backbone's.
        harness
            .get_all_by_role(egui::accesskit::Role::ComboBox)
            .next()
            .expect("the backbone drop-down")
            .click();
        harness.run();
        harness.get_by_label("mobilenet_v2").click();
        harness.run();
        assert_eq!(harness.state().0.backbone, BackboneKind::MobilenetV2);
    }
}
