//! Centroid statistics: per-cluster table, the centroid similarity heatmap, and curves over
//! time of the loss terms, cluster sizes, label change and (with labels) Acc / mIoU.

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::ExplorerApp;

impl ExplorerApp {
    pub(super) fn statistics_tab(&mut self, ui: &mut egui::Ui) {
        let Some(session) = self.session.clone() else {
            ui.label("Statistics appear once training starts.");
            return;
        };
        let Some(latest) = session.latest_clusters().cloned() else {
            ui.label("Statistics appear after the first clustering.");
            return;
        };
        let k = latest.pixel_share.len();
        let similarity = latest.centroid_similarity();
        let score = session.latest_score().cloned();
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading(format!("Epoch {}", latest.epoch));
                if let Some(change) = latest.label_change {
                    ui.label(format!(
                        "{:.1}% of pixels changed cluster since the last epoch",
                        change * 100.0
                    ));
                }
                if let Some(score) = &score {
                    ui.separator();
                    ui.strong(format!(
                        "Acc {:.2}  mIoU {:.2}",
                        score.accuracy, score.mean_iou
                    ))
                    .on_hover_text(format!(
                        "Scored after epoch {} against the labels",
                        score.epoch
                    ));
                }
            });
            ui.add_space(6.0);
            egui::Grid::new("cluster-table")
                .striped(true)
                .num_columns(7)
                .spacing([12.0, 4.0])
                .show(ui, |ui| {
                    ui.strong("Cluster");
                    ui.strong("Pixel share");
                    ui.strong("Images").on_hover_text(
                        "Images of the dataset it appears in (view 1 of this epoch)",
                    );
                    ui.strong("Similarity")
                        .on_hover_text("Mean cosine similarity of its pixels to its centroid");
                    ui.strong("Nearest cluster")
                        .on_hover_text("The most similar other centroid");
                    ui.strong("Matched class")
                        .on_hover_text("Hungarian matching against the labels");
                    ui.end_row();
                    let max_share = latest
                        .pixel_share
                        .iter()
                        .copied()
                        .fold(0.0, f64::max)
                        .max(1e-9);
                    for cluster in 0..k {
                        ui.horizontal(|ui| {
                            let (swatch, _) = ui
                                .allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                            ui.painter()
                                .rect_filled(swatch, 2.0, self.colour32(cluster));
                            ui.label(self.cluster_name(cluster));
                        });
                        let share = latest.pixel_share[cluster];
                        ui.horizontal(|ui| {
                            let (bar, _) = ui
                                .allocate_exact_size(egui::vec2(120.0, 12.0), egui::Sense::hover());
                            ui.painter()
                                .rect_filled(bar, 2.0, ui.visuals().extreme_bg_color);
                            let mut filled = bar;
                            filled.set_width(bar.width() * (share / max_share) as f32);
                            ui.painter()
                                .rect_filled(filled, 2.0, self.colour32(cluster));
                            ui.label(format!("{:.1}%", share * 100.0));
                        });
                        ui.label(format!(
                            "{}",
                            latest
                                .images_with_cluster
                                .get(cluster)
                                .copied()
                                .unwrap_or(0)
                        ));
                        ui.label(format!(
                            "{:.3}",
                            latest.compactness.get(cluster).copied().unwrap_or(0.0)
                        ));
                        let nearest = (0..k).filter(|&other| other != cluster).max_by(|&a, &b| {
                            similarity[cluster * k + a].total_cmp(&similarity[cluster * k + b])
                        });
                        match nearest {
                            Some(other) => ui.label(format!(
                                "{other} (cos {:.2})",
                                similarity[cluster * k + other]
                            )),
                            None => ui.label("–"),
                        };
                        let class = score
                            .as_ref()
                            .and_then(|score| score.cluster_class.get(cluster).copied().flatten())
                            .map(|class| {
                                session
                                    .class_names
                                    .as_ref()
                                    .and_then(|names| names.get(class).cloned())
                                    .unwrap_or_else(|| format!("class {class}"))
                            })
                            .unwrap_or_else(|| "–".into());
                        ui.label(class);
                        ui.end_row();
                    }
                });
            ui.add_space(12.0);
            ui.columns(2, |columns| {
                columns[0].strong("Centroid similarity");
                self.heatmap(&mut columns[0], &similarity, k);
                columns[1].strong("Loss terms");
                loss_plot(&mut columns[1], &session.losses);
            });
            ui.add_space(12.0);
            ui.columns(2, |columns| {
                columns[0].strong("Cluster sizes (pixel share per epoch)");
                let ui = &mut columns[0];
                Plot::new("cluster-sizes")
                    .height(200.0)
                    .x_axis_label("epoch")
                    .include_y(0.0)
                    .show(ui, |plot| {
                        for cluster in 0..k {
                            let points: PlotPoints = session
                                .clusters
                                .iter()
                                .filter_map(|s| {
                                    Some([s.epoch as f64, *s.pixel_share.get(cluster)? * 100.0])
                                })
                                .collect();
                            plot.line(
                                Line::new(format!("cluster {cluster}"), points)
                                    .color(self.colour32(cluster)),
                            );
                        }
                    });
                columns[1].strong("Label change and scores per epoch");
                let ui = &mut columns[1];
                Plot::new("label-change")
                    .height(200.0)
                    .x_axis_label("epoch")
                    .include_y(0.0)
                    .legend(Legend::default())
                    .show(ui, |plot| {
                        let change: PlotPoints = session
                            .clusters
                            .iter()
                            .filter_map(|s| Some([s.epoch as f64, s.label_change? * 100.0]))
                            .collect();
                        plot.line(Line::new("label change %", change));
                        if !session.scores.is_empty() {
                            let acc: PlotPoints = session
                                .scores
                                .iter()
                                .map(|s| [s.epoch as f64, s.accuracy])
                                .collect();
                            let miou: PlotPoints = session
                                .scores
                                .iter()
                                .map(|s| [s.epoch as f64, s.mean_iou])
                                .collect();
                            plot.line(Line::new("Acc %", acc));
                            plot.line(Line::new("mIoU %", miou));
                        }
                    });
            });
        });
    }

    fn heatmap(&self, ui: &mut egui::Ui, similarity: &[f32], k: usize) {
        if k == 0 {
            return;
        }
        let side = ui.available_width().min(260.0);
        let (rect, response) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
        let cell = side / k as f32;
        let painter = ui.painter_at(rect);
        for a in 0..k {
            for b in 0..k {
                let value = similarity[a * k + b].clamp(-1.0, 1.0);
                // Blue for dissimilar, white around 0.5, red for similar.
                let t = (value + 1.0) / 2.0;
                let colour = egui::Color32::from_rgb(
                    (255.0 * t.min(0.5) * 2.0) as u8,
                    (255.0 * (1.0 - (t - 0.5).abs() * 2.0)) as u8,
                    (255.0 * (1.0 - t).min(0.5) * 2.0) as u8,
                );
                let min = rect.min + egui::vec2(b as f32 * cell, a as f32 * cell);
                painter.rect_filled(
                    egui::Rect::from_min_size(min, egui::vec2(cell, cell)),
                    0.0,
                    colour,
                );
            }
        }
        if let Some(pointer) = response.hover_pos() {
            let b = (((pointer.x - rect.min.x) / cell) as usize).min(k - 1);
            let a = (((pointer.y - rect.min.y) / cell) as usize).min(k - 1);
            response.on_hover_text_at_pointer(format!(
                "clusters {a} and {b}: cosine {:.3}",
                similarity[a * k + b]
            ));
        }
    }
}

fn loss_plot(ui: &mut egui::Ui, losses: &[crate::session::LossPoint]) {
    // Long runs have many steps: every n-th point is plenty for a 400-pixel plot.
    let stride = (losses.len() / 2000).max(1);
    let series = |pick: fn(&crate::train::LossTerms) -> f32| -> PlotPoints {
        losses
            .iter()
            .step_by(stride)
            .map(|point| [point.time, pick(&point.loss) as f64])
            .collect()
    };
    Plot::new("losses")
        .height(260.0)
        .x_axis_label("epoch")
        .legend(Legend::default())
        .show(ui, |plot| {
            plot.line(Line::new("total", series(|l| l.total)).width(2.0));
            plot.line(Line::new("L11", series(|l| l.within_first)));
            plot.line(Line::new("L22", series(|l| l.within_second)));
            plot.line(Line::new("L12", series(|l| l.cross_first_second)));
            plot.line(Line::new("L21", series(|l| l.cross_second_first)));
        });
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::super::test_support::app_with_three_clusters;
    use super::*;

    #[test]
    fn the_statistics_tab_lists_every_cluster_with_its_nearest_centroid() {
        let run = tempfile::tempdir().unwrap();
        let harness = Harness::new_ui_state(
            |ui, app: &mut ExplorerApp| app.statistics_tab(ui),
            app_with_three_clusters(run.path()),
        );
        harness.get_by_label("Epoch 1");
        for name in ["cluster 0", "cluster 1", "cluster 2"] {
            harness.get_by_label(name);
        }
        harness.get_by_label("30.0%");
        // Centroids (1, 0), (0, 1) and (0.6, 0.8): each one's most similar other centroid.
        harness.get_by_label("2 (cos 0.60)");
        harness.get_by_label("2 (cos 0.80)");
        harness.get_by_label("1 (cos 0.80)");
        harness.get_by_label("Centroid similarity");
    }
}
