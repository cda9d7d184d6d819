//! The cluster list: show/hide, names, colours, merges, "ignore", undo/redo, and adopting the
//! matched class names. Every change is saved at once to the run's `labelmap.json`.

use std::collections::BTreeSet;

use eframe::egui;

use super::ExplorerApp;
use crate::labelmap::{LabelEdit, LabelHistory, LabelMap};

/// Edits in progress in the cluster list.
#[derive(Default)]
pub struct RelabelState {
    /// Clusters ticked for a merge.
    pub selected: BTreeSet<usize>,
    /// Name being typed, per cluster (applied when the field loses focus).
    pub editing_names: std::collections::HashMap<usize, String>,
}

impl ExplorerApp {
    /// Loads (or starts) the label map of the run shown.
    pub(super) fn load_labels(&mut self) {
        let Some(session) = &self.session else {
            self.labels = None;
            return;
        };
        let clusters = session.status.clusters;
        match LabelMap::load_or_new(&session.run_dir, clusters) {
            Ok(map) => self.labels = Some(LabelHistory::new(map)),
            Err(error) => {
                self.labels = Some(LabelHistory::new(LabelMap::new(clusters)));
                self.notify(format!("{error}"), true);
            }
        }
        self.relabel = RelabelState::default();
    }

    /// Applies a label edit, saves the map, and reports problems.
    pub fn edit_labels(&mut self, edit: LabelEdit) {
        let clusters = self.cluster_count();
        let Some(history) = &mut self.labels else {
            return;
        };
        if let Err(error) = history.apply(&edit) {
            self.notify(format!("{error}"), true);
            return;
        }
        history_len_guard(history, clusters);
        self.save_labels();
    }

    pub(super) fn save_labels_now(&mut self) {
        self.save_labels();
    }

    fn save_labels(&mut self) {
        let (Some(history), Some(session)) = (&self.labels, &self.session) else {
            return;
        };
        if let Err(error) = history.map().save(&session.run_dir) {
            self.notify(
                format!("could not save the cluster names: {error}; check the disk"),
                true,
            );
        }
    }

    /// Undo (Ctrl+Z) and redo (Ctrl+Shift+Z or Ctrl+Y) of label edits.
    pub fn undo_labels(&mut self, redo: bool) {
        let changed = self
            .labels
            .as_mut()
            .is_some_and(|history| if redo { history.redo() } else { history.undo() });
        if changed {
            self.relabel.editing_names.clear();
            self.save_labels();
        }
    }

    pub(super) fn label_shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            // A text field has focus: Ctrl+Z belongs to it.
            return;
        }
        let undo = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Z);
        let redo = egui::KeyboardShortcut::new(
            egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
            egui::Key::Z,
        );
        let redo_y = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Y);
        // The longer shortcut first: Ctrl+Shift+Z also matches Ctrl+Z loosely.
        if ctx.input_mut(|input| input.consume_shortcut(&redo) || input.consume_shortcut(&redo_y)) {
            self.undo_labels(true);
        } else if ctx.input_mut(|input| input.consume_shortcut(&undo)) {
            self.undo_labels(false);
        }
    }

    pub(super) fn cluster_panel(&mut self, ui: &mut egui::Ui) {
        let clusters = self.cluster_count();
        if let Some(history) = &mut self.labels {
            history_len_guard(history, clusters);
        }
        ui.horizontal(|ui| {
            ui.heading("Clusters");
            let (can_undo, can_redo) = self
                .labels
                .as_ref()
                .map_or((false, false), |h| (h.can_undo(), h.can_redo()));
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo").small())
                .on_hover_text("Undo the last name, colour, merge or ignore (Ctrl+Z)")
                .clicked()
            {
                self.undo_labels(false);
            }
            if ui
                .add_enabled(can_redo, egui::Button::new("Redo").small())
                .on_hover_text("Redo (Ctrl+Shift+Z)")
                .clicked()
            {
                self.undo_labels(true);
            }
        });
        if clusters == 0 {
            ui.weak("Clusters appear after the first clustering.");
            return;
        }
        ui.horizontal_wrapped(|ui| {
            if ui.small_button("Show all").clicked() {
                self.view.hidden.clear();
            }
            if ui.small_button("Hide all").clicked() {
                self.view.hidden = (0..clusters).collect();
            }
            let matched: Vec<Option<String>> = (0..clusters)
                .map(|cluster| self.matched_class(cluster))
                .collect();
            if matched.iter().any(Option::is_some)
                && ui
                    .small_button("Use matched class names")
                    .on_hover_text(
                        "Name every cluster after the labelled class it matches best \
                         (Hungarian matching of the latest evaluation)",
                    )
                    .clicked()
            {
                self.edit_labels(LabelEdit::AdoptNames { names: matched });
            }
        });
        self.merge_bar(ui);
        ui.separator();
        let shares = self
            .session
            .as_ref()
            .and_then(|s| s.latest_clusters())
            .map(|stats| stats.pixel_share.clone())
            .unwrap_or_default();
        let map = self
            .labels
            .as_ref()
            .map_or_else(|| LabelMap::new(clusters), |h| h.map().clone());
        egui::ScrollArea::vertical().show(ui, |ui| {
            for (root, members) in group_by_root(&map, clusters) {
                let share: f64 = members.iter().filter_map(|&m| shares.get(m)).sum();
                self.cluster_row(ui, &map, root, &members, share);
            }
        });
    }

    fn cluster_row(
        &mut self,
        ui: &mut egui::Ui,
        map: &LabelMap,
        root: usize,
        members: &[usize],
        share: f64,
    ) {
        ui.horizontal(|ui| {
            let mut selected = self.relabel.selected.contains(&root);
            if ui
                .checkbox(&mut selected, "")
                .on_hover_text("Select for merging")
                .changed()
            {
                if selected {
                    self.relabel.selected.insert(root);
                } else {
                    self.relabel.selected.remove(&root);
                }
            }
            let mut visible = !self.view.hidden.contains(&root);
            if ui
                .toggle_value(&mut visible, "show")
                .on_hover_text("Show or hide this cluster's colour on the maps")
                .changed()
            {
                if visible {
                    self.view.hidden.remove(&root);
                } else {
                    self.view.hidden.insert(root);
                }
            }
            let mut colour = map.colour(root);
            if egui::color_picker::color_edit_button_srgb(ui, &mut colour)
                .on_hover_text("Change the colour")
                .changed()
            {
                self.edit_labels(LabelEdit::Recolour {
                    cluster: root,
                    colour,
                });
            }
            let hint = self.cluster_name(root);
            // The row already says which cluster it is: the hint leads with the matched class.
            let short_hint = match self.matched_class(root) {
                Some(class) => format!("{root} · {class}"),
                None => hint.clone(),
            };
            let text = self.relabel.editing_names.entry(root).or_insert_with(|| {
                if map.is_named(root) {
                    map.name(root)
                } else {
                    String::new()
                }
            });
            // The field takes the row's width left after the share, so names are not cut
            // short; the tooltip shows the whole name when the panel is narrow.
            let share_width = 48.0;
            let response = ui
                .add(
                    egui::TextEdit::singleline(text)
                        .hint_text(short_hint)
                        .desired_width((ui.available_width() - share_width).max(110.0)),
                )
                .on_hover_text(hint);
            if response.lost_focus() {
                let name = text.clone();
                if name.trim()
                    != if map.is_named(root) {
                        map.name(root)
                    } else {
                        String::new()
                    }
                {
                    self.edit_labels(LabelEdit::Rename {
                        cluster: root,
                        name,
                    });
                }
            }
            ui.weak(format!("{:.1}%", share * 100.0));
        });
        ui.horizontal(|ui| {
            ui.add_space(24.0);
            let mut ignored = map.is_ignored(root);
            if ui
                .checkbox(&mut ignored, "ignore")
                .on_hover_text("Not a class: written as 255 in exported index masks")
                .changed()
            {
                self.edit_labels(LabelEdit::SetIgnored {
                    cluster: root,
                    ignored,
                });
            }
            if ui
                .small_button("Patches")
                .on_hover_text("Its most typical and most unusual patches")
                .clicked()
            {
                self.open_cluster_gallery(root);
            }
            if self.is_training()
                && ui
                    .small_button("Split")
                    .on_hover_text(
                        "Divide this cluster in two (k-means on its own pixels) from the next \
                         epoch on; the new half gets the next free id",
                    )
                    .clicked()
            {
                self.command(crate::session::Command::Edit(
                    crate::cluster::ClusterEdit::Split { cluster: root },
                ));
            }
            for &member in members.iter().filter(|&&m| m != root) {
                if ui
                    .small_button(format!("unmerge {member}"))
                    .on_hover_text(format!("Cluster {member} was merged into this one"))
                    .clicked()
                {
                    self.edit_labels(LabelEdit::Unmerge { cluster: member });
                }
            }
        });
    }

    fn merge_bar(&mut self, ui: &mut egui::Ui) {
        let selected: Vec<usize> = self.relabel.selected.iter().copied().collect();
        if selected.len() < 2 {
            ui.weak("Tick two or more clusters to merge them.");
            return;
        }
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("{} selected:", selected.len()));
            for &into in &selected {
                if ui
                    .small_button(format!("merge into {}", self.cluster_name(into)))
                    .clicked()
                {
                    let sources = selected.iter().copied().filter(|&s| s != into).collect();
                    self.edit_labels(LabelEdit::Merge { sources, into });
                    self.relabel.selected.clear();
                    self.relabel.editing_names.clear();
                }
            }
            if self.is_training() {
                let into = selected[0];
                if ui
                    .small_button(format!("merge in training into {into}"))
                    .on_hover_text(
                        "The trainer merges these centroids and continues from them at the \
                         next epoch (ids above the merged ones move down)",
                    )
                    .clicked()
                {
                    let sources = selected.iter().copied().filter(|&s| s != into).collect();
                    self.command(crate::session::Command::Edit(
                        crate::cluster::ClusterEdit::Merge { sources, into },
                    ));
                    self.relabel.selected.clear();
                }
            }
            if ui.small_button("clear").clicked() {
                self.relabel.selected.clear();
            }
        });
    }
}

/// Keeps the map as long as the number of clusters shown.
fn history_len_guard(history: &mut LabelHistory, clusters: usize) {
    if history.map().len() < clusters {
        let mut map = history.map().clone();
        map.ensure_len(clusters);
        *history = LabelHistory::new(map);
    }
}

/// Roots in id order, each with its members (the root first, as the list shows it).
fn group_by_root(map: &LabelMap, clusters: usize) -> Vec<(usize, Vec<usize>)> {
    let mut groups = map.merge_groups(clusters);
    for (root, members) in &mut groups {
        members.sort_by_key(|&member| (member != *root, member));
    }
    groups
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::super::test_support::app_with_three_clusters;
    use super::*;

    #[test]
    fn the_cluster_list_merges_ticked_clusters_saves_and_undoes() {
        let run = tempfile::tempdir().unwrap();
        let mut harness = Harness::new_ui_state(
            |ui, app: &mut ExplorerApp| app.cluster_panel(ui),
            app_with_three_clusters(run.path()),
        );
        harness.get_by_label("Tick two or more clusters to merge them.");
        harness.get_by_label("50.0%");
        // The user ticks clusters 0 and 2 (their rows' boxes), then merges 2 into 0.
        harness.state_mut().relabel.selected.extend([0, 2]);
        harness.run();
        harness.get_by_label("merge into cluster 0").click();
        harness.run();
        let map = harness.state().labels.as_ref().unwrap().map().clone();
        assert_eq!(map.root(2), 0);
        assert_eq!(map.output_classes(3), vec![(0, vec![0, 2]), (1, vec![1])]);
        // The merged row shows both shares and can be unmerged; the run folder has the map.
        harness.get_by_label("70.0%");
        harness.get_by_label("unmerge 2");
        let saved = LabelMap::load_or_new(run.path(), 3).unwrap();
        assert_eq!(saved.root(2), 0);
        harness.get_by_label("Undo").click();
        harness.run();
        assert_eq!(harness.state().labels.as_ref().unwrap().map().root(2), 2);
    }
}
