//! Live cluster maps: preview images with their maps as overlays (GPU shader or CPU
//! fallback), hover read-outs, a large pan-and-zoom view, the cluster list with show/hide, and
//! the timeline that scrubs through every kept snapshot.
//!
//! One concern, in one file: the maps tab and its zoom window (about 630 lines) and their
//! panel tests (about 90).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use eframe::egui;
use eframe::egui_wgpu;

use super::gpu::OverlayCallback;
use super::{ExplorerApp, ImageRequest};
use crate::palette::cluster_colour;
use crate::session::Snapshot;
use crate::train::ClusterMap;

/// Seconds each snapshot stays on screen while the timeline plays.
const PLAY_SECONDS_PER_SNAPSHOT: f64 = 0.35;
/// Sub-cells per feature cell in the CPU overlay, so boundaries are thinner than a cell.
const CPU_OVERLAY_SCALE: usize = 4;

/// How the maps are shown.
pub struct MapView {
    /// Show the newest snapshot as it arrives.
    pub follow_latest: bool,
    /// The snapshot shown when not following.
    pub position: usize,
    /// The timeline animates.
    pub playing: bool,
    /// Clusters whose colour is hidden.
    pub hidden: BTreeSet<usize>,
    /// The preview image open large (index into the snapshot's maps).
    pub zoomed: Option<ZoomState>,
    last_advance: f64,
    cpu_overlays: HashMap<u64, egui::TextureHandle>,
}

impl Default for MapView {
    fn default() -> Self {
        Self {
            follow_latest: true,
            position: 0,
            playing: false,
            hidden: BTreeSet::new(),
            zoomed: None,
            last_advance: 0.0,
            cpu_overlays: HashMap::new(),
        }
    }
}

/// The large view's camera.
#[derive(Debug, Clone)]
pub struct ZoomState {
    /// The image shown (its name in the dataset).
    pub image_name: String,
    /// A patch to outline, in `0..1` coordinates of the image (a gallery hit).
    pub marker: Option<egui::Rect>,
    /// Magnification over fitting the view.
    pub zoom: f32,
    /// Offset of the image centre from the view centre, in points.
    pub pan: egui::Vec2,
}

impl ExplorerApp {
    /// Index of the snapshot on screen.
    pub fn shown_snapshot_index(&self) -> Option<usize> {
        let len = self.session.as_ref()?.timeline.len();
        if len == 0 {
            return None;
        }
        Some(if self.view.follow_latest {
            len - 1
        } else {
            self.view.position.min(len - 1)
        })
    }

    fn shown_snapshot(&self) -> Option<&Snapshot> {
        let index = self.shown_snapshot_index()?;
        self.session.as_ref()?.timeline.snapshots().get(index)
    }

    /// Number of clusters to list: the session's K, or what the maps show.
    pub fn cluster_count(&self) -> usize {
        let session_k = self.session.as_ref().map_or(0, |s| s.status.clusters);
        let from_stats = self
            .session
            .as_ref()
            .and_then(|s| s.latest_clusters())
            .map_or(0, |stats| stats.pixel_share.len());
        let from_maps = self
            .shown_snapshot()
            .and_then(|snapshot| {
                snapshot
                    .maps
                    .iter()
                    .flat_map(|map| map.labels.iter())
                    .max()
                    .map(|&max| max as usize + 1)
            })
            .unwrap_or(0);
        session_k.max(from_stats).max(from_maps)
    }

    /// The class the latest evaluation matched a cluster to, by name.
    pub fn matched_class(&self, cluster: usize) -> Option<String> {
        let session = self.session.as_ref()?;
        let class = session
            .latest_score()?
            .cluster_class
            .get(cluster)
            .copied()??;
        session.class_names.as_ref()?.get(class).cloned()
    }

    /// The name shown for a cluster: the user's name for it (or for the cluster it was merged
    /// into); otherwise `cluster N`, with the class it matches when the dataset has labels.
    pub fn cluster_name(&self, cluster: usize) -> String {
        let labels = self.labels.as_ref().map(|history| history.map());
        if let Some(labels) = labels
            && labels.is_named(cluster)
        {
            return labels.name(cluster);
        }
        let root = labels.map_or(cluster, |labels| labels.root(cluster));
        match self.matched_class(root) {
            Some(class) => format!("cluster {root} · {class}"),
            None => format!("cluster {root}"),
        }
    }

    /// A cluster's colour (the user's, or the palette's; merged clusters share their root's).
    pub fn cluster_rgb(&self, cluster: usize) -> [u8; 3] {
        match &self.labels {
            Some(history) => history.map().colour(cluster),
            None => cluster_colour(cluster),
        }
    }

    pub(super) fn colour32(&self, cluster: usize) -> egui::Color32 {
        let [r, g, b] = self.cluster_rgb(cluster);
        egui::Color32::from_rgb(r, g, b)
    }

    /// Whether a cluster's colour is drawn: hidden by the user or marked ignore, it is not.
    fn cluster_drawn(&self, cluster: usize) -> bool {
        let ignored = self
            .labels
            .as_ref()
            .is_some_and(|history| history.map().is_ignored(cluster));
        let root = self
            .labels
            .as_ref()
            .map_or(cluster, |history| history.map().root(cluster));
        !ignored && !self.view.hidden.contains(&root)
    }

    fn palette_rgba(&self, clusters: usize) -> Vec<[u8; 4]> {
        (0..clusters)
            .map(|cluster| {
                let [r, g, b] = self.cluster_rgb(cluster);
                let alpha = if self.cluster_drawn(cluster) { 255 } else { 0 };
                [r, g, b, alpha]
            })
            .collect()
    }

    pub(super) fn maps_tab(&mut self, ui: &mut egui::Ui) {
        self.timeline_bar(ui);
        ui.horizontal(|ui| {
            let label = ui.label("Opacity");
            ui.add(egui::Slider::new(&mut self.settings.opacity, 0.0..=1.0).show_value(false))
                .labelled_by(label.id)
                .on_hover_text("How strongly the cluster colours cover the image");
            ui.checkbox(&mut self.settings.boundaries, "Boundaries")
                .on_hover_text("Draw a line where the cluster changes");
            ui.weak("Hover a pixel to read its cluster; click an image to open it large.");
        });
        ui.separator();
        let Some(snapshot) = self.shown_snapshot().cloned() else {
            ui.add_space(20.0);
            ui.vertical_centered(|ui| {
                if self.is_training() {
                    ui.spinner();
                    ui.label("The first cluster maps appear after the first clustering.");
                } else {
                    ui.label("Press Start in the training panel to discover clusters.");
                }
            });
            return;
        };
        if snapshot.maps.is_empty() {
            ui.label("This run shows no preview images (Preview images is 0).");
            return;
        }
        let tile = 220.0f32;
        let columns = ((ui.available_width() / (tile + 10.0)).floor() as usize).max(1);
        egui::ScrollArea::vertical().show(ui, |ui| {
            egui::Grid::new("preview-maps")
                .spacing([10.0, 10.0])
                .show(ui, |ui| {
                    for (index, map) in snapshot.maps.iter().enumerate() {
                        ui.vertical(|ui| {
                            let (rect, response) = ui
                                .allocate_exact_size(egui::vec2(tile, tile), egui::Sense::click());
                            let clip = ui.clip_rect();
                            self.paint_map(ui, map, map_key(&snapshot, map), rect, clip);
                            self.hover_readout(ui, &response, map, rect);
                            if response.clicked() {
                                // Open it large, and show the patches most like the one clicked.
                                self.view.zoomed = Some(ZoomState {
                                    image_name: map.image_name.clone(),
                                    marker: None,
                                    zoom: 1.0,
                                    pan: egui::Vec2::ZERO,
                                });
                                if let Some(pointer) = response.interact_pointer_pos() {
                                    let uv = tile_uv(rect, pointer);
                                    self.query_similar_patches(&map.image_name, uv.x, uv.y);
                                }
                            }
                            ui.add(
                                egui::Label::new(egui::RichText::new(&map.image_name).small())
                                    .truncate(),
                            );
                        });
                        if (index + 1) % columns == 0 {
                            ui.end_row();
                        }
                    }
                });
        });
    }

    fn timeline_bar(&mut self, ui: &mut egui::Ui) {
        let Some(session) = &self.session else {
            return;
        };
        let len = session.timeline.len();
        if len == 0 {
            return;
        }
        let now = ui.input(|input| input.time);
        // Keyboard: arrows step through snapshots, space plays, unless a field has focus.
        let typing = ui.ctx().egui_wants_keyboard_input();
        let (left, right, space) = ui.input(|input| {
            (
                input.key_pressed(egui::Key::ArrowLeft),
                input.key_pressed(egui::Key::ArrowRight),
                input.key_pressed(egui::Key::Space),
            )
        });
        let mut position = self.shown_snapshot_index().unwrap_or(0);
        if !typing {
            if left && position > 0 {
                position -= 1;
                self.view.follow_latest = false;
            }
            if right && position + 1 < len {
                position += 1;
            }
            if space {
                self.view.playing = !self.view.playing;
            }
        }
        if self.view.playing {
            if self.view.follow_latest || position + 1 >= len {
                // Play from the start when at the end.
                if position + 1 >= len {
                    position = 0;
                }
                self.view.follow_latest = false;
                self.view.last_advance = now;
            } else if now - self.view.last_advance >= PLAY_SECONDS_PER_SNAPSHOT {
                position += 1;
                self.view.last_advance = now;
                if position + 1 >= len {
                    self.view.playing = false;
                }
            }
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_secs_f64(
                    PLAY_SECONDS_PER_SNAPSHOT,
                ));
        }
        ui.horizontal(|ui| {
            let play_label = if self.view.playing { "Pause" } else { "Play" };
            if ui
                .button(play_label)
                .on_hover_text("Play the timeline (Space)")
                .clicked()
            {
                self.view.playing = !self.view.playing;
                self.view.last_advance = now;
            }
            let label = ui.label("Timeline");
            let mut slider_position = position;
            let slider = ui
                .add(
                    egui::Slider::new(&mut slider_position, 0..=len - 1)
                        .show_value(false)
                        .text(""),
                )
                .labelled_by(label.id);
            if slider.changed() {
                position = slider_position;
                self.view.follow_latest = false;
                self.view.playing = false;
            }
            let snapshot = &session.timeline.snapshots()[position.min(len - 1)];
            let when = if snapshot.epoch == 0 {
                "untrained".to_string()
            } else if snapshot.step == 0 {
                format!("epoch {}, after clustering", snapshot.epoch)
            } else {
                format!("epoch {}, step {}", snapshot.epoch, snapshot.step)
            };
            ui.label(format!("{when}  ({}/{len})", position + 1));
            if ui
                .checkbox(&mut self.view.follow_latest, "Latest")
                .on_hover_text("Always show the newest maps")
                .changed()
                && self.view.follow_latest
            {
                // Ticking Latest jumps to the newest maps (and stops playing).
                position = len - 1;
                self.view.playing = false;
            }
        });
        if !self.view.follow_latest || position + 1 < len {
            self.view.follow_latest = self.view.follow_latest && position + 1 >= len;
        }
        self.view.position = position;
    }

    /// Draws the base image and its cluster map in `rect`, clipped to `clip`.
    fn paint_map(
        &mut self,
        ui: &mut egui::Ui,
        map: &ClusterMap,
        key: u64,
        rect: egui::Rect,
        clip: egui::Rect,
    ) {
        let painter = ui.painter().with_clip_rect(clip.intersect(ui.clip_rect()));
        let base_size = self.settings.config.base_size;
        let request = self.dataset.as_ref().map(|dataset| {
            ImageRequest::Base(dataset.paths.images.join(&map.image_name), base_size)
        });
        let ctx = ui.ctx().clone();
        let texture = request
            .as_ref()
            .and_then(|request| self.images(&ctx).get(request).map(|t| t.id()));
        match texture {
            Some(id) => {
                painter.image(
                    id,
                    rect,
                    egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                    egui::Color32::WHITE,
                );
            }
            None => {
                painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            }
        }
        let clusters = self.cluster_count().max(1);
        if self.gpu_overlays {
            let callback = OverlayCallback {
                key,
                labels: map.labels.clone(),
                width: map.width as u32,
                height: map.height as u32,
                palette: self.palette_rgba(clusters),
                opacity: self.settings.opacity,
                boundaries: self.settings.boundaries,
                rect,
                frame: self.frame,
            };
            painter.add(egui_wgpu::Callback::new_paint_callback(rect, callback));
        } else {
            let texture = self.cpu_overlay(&ctx, map, key, clusters);
            painter.image(
                texture,
                rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            );
        }
    }

    /// The overlay coloured on the CPU (no wgpu renderer: tests, the glow backend).
    fn cpu_overlay(
        &mut self,
        ctx: &egui::Context,
        map: &ClusterMap,
        key: u64,
        clusters: usize,
    ) -> egui::TextureId {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        self.settings.opacity.to_bits().hash(&mut hasher);
        self.settings.boundaries.hash(&mut hasher);
        self.view.hidden.hash(&mut hasher);
        self.palette_rgba(clusters).hash(&mut hasher);
        let full_key = hasher.finish();
        if let Some(texture) = self.view.cpu_overlays.get(&full_key) {
            return texture.id();
        }
        let palette = self.palette_rgba(clusters);
        // Maps at the feature grid are enlarged so their cell edges can be drawn; maps at
        // image resolution are drawn as they are.
        let scale = if map.width >= 96 {
            1
        } else {
            CPU_OVERLAY_SCALE
        };
        let (width, height) = (map.width * scale, map.height * scale);
        let label_at = |x: usize, y: usize| {
            map.labels[y.min(map.height - 1) * map.width + x.min(map.width - 1)]
        };
        let opacity = self.settings.opacity;
        let mut pixels = Vec::with_capacity(width * height);
        for y in 0..height {
            for x in 0..width {
                let (cx, cy) = (x / scale, y / scale);
                let label = label_at(cx, cy);
                let edge_right = x % scale == scale - 1 && label_at(cx + 1, cy) != label;
                let edge_down = y % scale == scale - 1 && label_at(cx, cy + 1) != label;
                let [r, g, b, a] = palette.get(label as usize).copied().unwrap_or([0; 4]);
                let colour = if self.settings.boundaries && (edge_right || edge_down) {
                    egui::Color32::from_rgba_unmultiplied(13, 13, 13, 230)
                } else if a == 0 {
                    egui::Color32::TRANSPARENT
                } else {
                    egui::Color32::from_rgba_unmultiplied(r, g, b, (opacity * 255.0) as u8)
                };
                pixels.push(colour);
            }
        }
        let image = egui::ColorImage::new([width, height], pixels);
        if self.view.cpu_overlays.len() > 256 {
            self.view.cpu_overlays.clear();
        }
        let texture = ctx.load_texture("cluster-overlay", image, egui::TextureOptions::NEAREST);
        let id = texture.id();
        self.view.cpu_overlays.insert(full_key, texture);
        id
    }

    /// Under the pointer: the cell's cluster, its name and its similarity to the centroid.
    fn hover_readout(
        &self,
        ui: &egui::Ui,
        response: &egui::Response,
        map: &ClusterMap,
        rect: egui::Rect,
    ) {
        let Some(pointer) = response.hover_pos() else {
            return;
        };
        let Some((label, similarity)) = cell_at(map, rect, pointer) else {
            return;
        };
        let cluster = label as usize;
        let name = self.cluster_name(cluster);
        let colour = self.colour32(cluster);
        egui::Tooltip::always_open(
            ui.ctx().clone(),
            ui.layer_id(),
            egui::Id::unique("map-hover"),
            egui::PopupAnchor::Pointer,
        )
        .show(|ui| {
            ui.horizontal(|ui| {
                let (swatch, _) =
                    ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                ui.painter().rect_filled(swatch, 2.0, colour);
                ui.strong(name);
            });
            ui.label(format!("similarity to centroid {similarity:.3}"));
        });
    }

    /// The map to show over an image: its preview map in the shown snapshot, or one built
    /// from the feature bank for any other image.
    fn map_for_image(&mut self, image_name: &str) -> Option<(ClusterMap, u64)> {
        if let Some(snapshot) = self.shown_snapshot()
            && let Some(map) = snapshot.maps.iter().find(|m| m.image_name == image_name)
        {
            return Some((map.clone(), map_key(snapshot, map)));
        }
        self.bank_map(image_name)
    }

    /// The large pan-and-zoom view of one image.
    pub(super) fn zoom_window(&mut self, ctx: &egui::Context) {
        let Some(mut zoom) = self.view.zoomed.clone() else {
            return;
        };
        if ctx.input(|input| input.key_pressed(egui::Key::Escape)) {
            self.view.zoomed = None;
            return;
        }
        let map = self.map_for_image(&zoom.image_name);
        let mut open = true;
        egui::Window::new(format!("Image {}", zoom.image_name))
            .id(egui::Id::unique("zoom-window"))
            .open(&mut open)
            .default_size([640.0, 640.0])
            .resizable(true)
            .show(ctx, |ui| {
                ui.weak(
                    "Scroll to zoom, drag to pan, double-click to fit, click for similar \
                     patches, Esc to close.",
                );
                let size = ui.available_size().max(egui::vec2(100.0, 100.0));
                let (view, response) = ui.allocate_exact_size(size, egui::Sense::click_and_drag());
                if response.dragged() {
                    zoom.pan += response.drag_delta();
                }
                if response.double_clicked() {
                    zoom.zoom = 1.0;
                    zoom.pan = egui::Vec2::ZERO;
                }
                let scroll = ui.input(|input| input.smooth_scroll_delta.y);
                if response.hovered() && scroll != 0.0 {
                    let factor = (scroll / 200.0).exp();
                    let new_zoom = (zoom.zoom * factor).clamp(1.0, 32.0);
                    // Keep the point under the pointer still.
                    if let Some(pointer) = response.hover_pos() {
                        let from_centre = pointer - view.center() - zoom.pan;
                        zoom.pan -= from_centre * (new_zoom / zoom.zoom - 1.0);
                    }
                    zoom.zoom = new_zoom;
                }
                let side = view.width().min(view.height()) * zoom.zoom;
                let image_rect =
                    egui::Rect::from_center_size(view.center() + zoom.pan, egui::vec2(side, side));
                match &map {
                    Some((map, key)) => {
                        self.paint_map(ui, map, *key, image_rect, view);
                        if view.contains(response.hover_pos().unwrap_or(egui::Pos2::ZERO)) {
                            self.hover_readout(ui, &response, map, image_rect);
                        }
                    }
                    None => self.paint_image_only(ui, &zoom.image_name, image_rect, view),
                }
                if let Some(marker) = zoom.marker {
                    let outline = egui::Rect::from_min_max(
                        image_rect.lerp_inside(marker.min.to_vec2()),
                        image_rect.lerp_inside(marker.max.to_vec2()),
                    );
                    ui.painter().with_clip_rect(view).rect_stroke(
                        outline,
                        0.0,
                        egui::Stroke::new(2.0, egui::Color32::WHITE),
                        egui::StrokeKind::Outside,
                    );
                }
                if response.clicked()
                    && let Some(pointer) = response.interact_pointer_pos()
                    && image_rect.contains(pointer)
                {
                    let uv = (pointer - image_rect.min) / image_rect.size();
                    let name = zoom.image_name.clone();
                    self.query_similar_patches(&name, uv.x, uv.y);
                }
            });
        if open {
            self.view.zoomed = Some(zoom);
        } else {
            self.view.zoomed = None;
        }
    }

    /// An image without a cluster map (no bank yet).
    fn paint_image_only(
        &mut self,
        ui: &mut egui::Ui,
        name: &str,
        rect: egui::Rect,
        clip: egui::Rect,
    ) {
        let base_size = self.settings.config.base_size;
        let request = self
            .dataset
            .as_ref()
            .map(|dataset| ImageRequest::Base(dataset.paths.images.join(name), base_size));
        let ctx = ui.ctx().clone();
        let texture = request
            .as_ref()
            .and_then(|request| self.images(&ctx).get(request).map(|t| t.id()));
        let painter = ui.painter().with_clip_rect(clip);
        match texture {
            Some(id) => painter.image(
                id,
                rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            ),
            None => painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color),
        };
    }
}

/// The cell under `pointer` of a map drawn in `rect`: (label, similarity).
pub fn cell_at(map: &ClusterMap, rect: egui::Rect, pointer: egui::Pos2) -> Option<(u16, f32)> {
    if !rect.contains(pointer) || map.width == 0 || map.height == 0 {
        return None;
    }
    let u = ((pointer.x - rect.min.x) / rect.width()).clamp(0.0, 0.999_999);
    let v = ((pointer.y - rect.min.y) / rect.height()).clamp(0.0, 0.999_999);
    let x = (u * map.width as f32) as usize;
    let y = (v * map.height as f32) as usize;
    let index = y * map.width + x;
    Some((
        *map.labels.get(index)?,
        map.similarity.get(index).copied().unwrap_or(0.0),
    ))
}

/// Where a click on a map tile lies in the image, in `0..=1` per axis. egui counts clicks a few
/// points outside a widget as its own (its interaction radius), so a click at the tile's edge
/// may fall just outside: it asks for the edge patch, not for a point outside the image.
fn tile_uv(rect: egui::Rect, pointer: egui::Pos2) -> egui::Vec2 {
    ((pointer - rect.min) / rect.size()).clamp(egui::Vec2::ZERO, egui::Vec2::splat(1.0))
}

pub(super) fn map_key(snapshot: &Snapshot, map: &ClusterMap) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        snapshot.epoch,
        snapshot.step,
        map.image_index,
        &map.image_name,
    )
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::super::test_support::app_with_three_clusters;
    use super::*;
    use crate::session::Snapshot;

    fn snapshot(epoch: usize, step: usize) -> Snapshot {
        Snapshot {
            epoch,
            step,
            maps: vec![ClusterMap {
                image_index: 0,
                image_name: "street/0001.png".into(),
                width: 4,
                height: 4,
                labels: (0..16).map(|cell| (cell % 3) as u16).collect(),
                similarity: vec![0.9; 16],
            }],
        }
    }

    #[test]
    fn the_maps_tab_steps_through_the_timeline_with_the_arrow_keys() {
        let run = tempfile::tempdir().unwrap();
        let mut app = app_with_three_clusters(run.path());
        let timeline = &mut app.session.as_mut().unwrap().timeline;
        for (epoch, step) in [(0, 0), (1, 0), (1, 5)] {
            timeline.push(snapshot(epoch, step));
        }
        let mut harness = Harness::new_ui_state(|ui, app: &mut ExplorerApp| app.maps_tab(ui), app);
        // The newest maps, one tile per preview image.
        harness.get_by_label("epoch 1, step 5  (3/3)");
        harness.get_by_label("street/0001.png");
        harness.key_press(egui::Key::ArrowLeft);
        harness.run();
        harness.get_by_label("epoch 1, after clustering  (2/3)");
        assert!(
            !harness.state().view.follow_latest,
            "stepping back leaves Latest"
        );
        harness.key_press(egui::Key::ArrowLeft);
        harness.run();
        harness.get_by_label("untrained  (1/3)");
        harness.get_by_label("Latest").click();
        harness.run();
        harness.get_by_label("epoch 1, step 5  (3/3)");
    }

    #[test]
    fn a_click_just_outside_a_tile_asks_for_its_edge() {
        let tile = egui::Rect::from_min_size(egui::pos2(10.0, 20.0), egui::vec2(200.0, 200.0));
        assert_eq!(
            tile_uv(tile, egui::pos2(110.0, 70.0)),
            egui::vec2(0.5, 0.25)
        );
        assert_eq!(
            tile_uv(tile, egui::pos2(212.0, 174.0)),
            egui::vec2(1.0, 0.77)
        );
        assert_eq!(tile_uv(tile, egui::pos2(8.0, 18.0)), egui::Vec2::ZERO);
    }

    #[test]
    fn without_maps_the_tab_says_how_to_get_them() {
        let run = tempfile::tempdir().unwrap();
        let harness = Harness::new_ui_state(
            |ui, app: &mut ExplorerApp| app.maps_tab(ui),
            app_with_three_clusters(run.path()),
        );
        harness.get_by_label("Press Start in the training panel to discover clusters.");
    }
}
