//! Nearest-neighbour patch galleries: click a pixel to see the most similar patches across the
//! dataset, or open a cluster's most typical and most unusual patches. Queries run on a
//! background thread against the run's feature bank (exact cosine top-k, or its index for
//! large banks), so the window never waits for them. The answers come from the engine
//! ([`crate::bank::gallery`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use eframe::egui;

use super::maps::ZoomState;
use super::{ExplorerApp, ImageRequest};
use crate::bank::gallery::answer;
pub use crate::bank::gallery::{GALLERY_PAGE, GalleryHit, GalleryQuery, GalleryResult};
use crate::bank::{BankIndex, FeatureBank, INDEX_MIN_PATCHES, IndexConfig};
use crate::session::{Job, JobError, Service, Wake};
use crate::train::ClusterMap;

enum Request {
    Query(GalleryQuery, Arc<Vec<f32>>),
}

enum Reply {
    Bank(Result<Arc<FeatureBank>, String>),
    Result(Result<GalleryResult, String>),
}

/// The gallery's state in the window.
#[derive(Default)]
pub struct GalleryState {
    /// The window is open.
    pub open: bool,
    /// The query last asked.
    pub query: Option<GalleryQuery>,
    /// Its answer.
    pub result: Option<GalleryResult>,
    /// Waiting for an answer.
    pub pending: bool,
    /// Why the last query failed.
    pub error: Option<String>,
    /// The bank, once loaded.
    pub bank: Option<Arc<FeatureBank>>,
    /// Neighbours per query.
    pub k: usize,
    worker: Option<(Service<Request, Reply>, PathBuf)>,
    bank_maps: HashMap<(String, u64), ClusterMap>,
    building: Option<BankBuildJob>,
}

/// How far a bank build has got: the stage, and items done of the stage's total.
type BuildProgress = (String, usize, usize);

/// Building the run's feature bank in the background.
type BankBuildJob = Job<BuildProgress, Result<(), crate::bank::BankError>>;

/// Queries waiting for the gallery's search thread at most (one is usual).
const QUERY_QUEUE: usize = 8;

/// Loads the run's feature bank, then answers queries against it.
fn spawn_worker(run_dir: PathBuf, wake: Wake) -> Result<Service<Request, Reply>, JobError> {
    Service::spawn("gallery", QUERY_QUEUE, wake, move |context| {
        let loaded = FeatureBank::load(&run_dir)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let bank = loaded.as_ref().ok().cloned();
        let load_error = loaded.as_ref().err().cloned();
        if !context.reply(Reply::Bank(loaded)) {
            return;
        }
        // A large bank is indexed on rayon's pool while the exact search answers; queries
        // switch to the index once it is there.
        let index = Arc::new(OnceLock::new());
        if let Some(bank) = bank.as_ref().filter(|bank| bank.len() >= INDEX_MIN_PATCHES) {
            let (bank, index) = (Arc::clone(bank), Arc::clone(&index));
            rayon::spawn(move || {
                if let Ok(built) = BankIndex::build(&bank, &IndexConfig::for_patches(bank.len())) {
                    let _ = index.set(built);
                }
            });
        }
        while let Some(Request::Query(query, centroids)) = context.next_request() {
            let result = match &bank {
                Some(bank) => {
                    answer(bank, index.get(), &query, &centroids).map_err(|error| error.to_string())
                }
                // Repeat why, so the message stays the informative one.
                None => Err(load_error
                    .clone()
                    .unwrap_or_else(|| "the feature bank could not be loaded".into())),
            };
            if !context.reply(Reply::Result(result)) {
                break;
            }
        }
    })
}

impl ExplorerApp {
    /// The centroids the gallery names clusters with: the latest epoch's (stable ids).
    fn gallery_centroids(&self) -> Arc<Vec<f32>> {
        Arc::new(
            self.session
                .as_ref()
                .and_then(|s| s.latest_clusters())
                .map(|stats| stats.centroids.clone())
                .unwrap_or_default(),
        )
    }

    fn gallery_ask(&mut self, query: GalleryQuery) {
        let Some(session) = &self.session else {
            return;
        };
        let run_dir = session.run_dir.clone();
        let stale = self
            .gallery
            .worker
            .as_ref()
            .is_none_or(|(_, dir)| *dir != run_dir);
        self.gallery.query = Some(query.clone());
        self.gallery.open = true;
        if stale {
            self.gallery.worker = None;
            self.gallery.bank = None;
            self.gallery.bank_maps.clear();
            match spawn_worker(run_dir.clone(), self.wake()) {
                Ok(worker) => self.gallery.worker = Some((worker, run_dir)),
                Err(error) => {
                    self.gallery.error = Some(error.to_string());
                    self.gallery.pending = false;
                    return;
                }
            }
        }
        let centroids = self.gallery_centroids();
        let asked = match &self.gallery.worker {
            Some((worker, _)) => worker
                .ask(Request::Query(query, centroids))
                .map_err(|busy| busy.to_string()),
            None => Ok(()),
        };
        self.gallery.pending = asked.is_ok();
        self.gallery.error = asked.err();
    }

    /// Shows the patches most similar to the one under `(u, v)` of an image.
    pub fn query_similar_patches(&mut self, image: &str, u: f32, v: f32) {
        self.gallery_ask(GalleryQuery::Pixel {
            image: image.to_string(),
            u,
            v,
        });
    }

    /// Shows a cluster's most typical patches.
    pub fn open_cluster_gallery(&mut self, cluster: usize) {
        self.gallery_ask(GalleryQuery::Cluster {
            cluster,
            outliers: false,
            offset: 0,
        });
    }

    /// Builds the run's feature bank on a background thread, then repeats the last query.
    fn build_bank(&mut self) {
        let (Some(session), Some(dataset)) = (&self.session, &self.dataset) else {
            return;
        };
        let run_dir = session.run_dir.clone();
        let images = dataset.paths.images.clone();
        let device = self.settings.config.device.clone();
        let job = Job::spawn("bank", self.wake(), move |job| {
            if device.is_remote() {
                job.report(("connecting to the server".to_string(), 0, 0));
            }
            let compute = crate::device::select_device(&device)
                .map_err(|error| crate::bank::BankError::Device(error.to_string()))?;
            crate::bank::build_run_bank(
                &run_dir,
                &images,
                None,
                &compute,
                &mut |stage, done, total| job.report((stage.to_string(), done, total)),
            )
            .map(|_| ())
        });
        match job {
            Ok(job) => {
                self.gallery.building = Some(job);
                self.gallery.error = None;
            }
            Err(error) => self.gallery.error = Some(error.to_string()),
        }
    }

    pub(super) fn poll_gallery(&mut self) {
        if let Some(job) = &mut self.gallery.building
            && let Some(outcome) = job.try_result()
        {
            self.gallery.building = None;
            match outcome {
                Ok(Ok(())) => {
                    // A fresh worker loads the new bank; ask again.
                    self.gallery.worker = None;
                    if let Some(query) = self.gallery.query.clone() {
                        self.gallery_ask(query);
                    }
                }
                Ok(Err(error)) => self.gallery.error = Some(error.to_string()),
                Err(error) => self.gallery.error = Some(error.to_string()),
            }
        }
        let Some((worker, _)) = &self.gallery.worker else {
            return;
        };
        let replies = worker.replies(QUERY_QUEUE + 1);
        for reply in replies {
            match reply {
                Reply::Bank(Ok(bank)) => self.gallery.bank = Some(bank),
                Reply::Bank(Err(error)) => {
                    self.gallery.error = Some(error);
                    self.gallery.pending = false;
                }
                Reply::Result(Ok(result)) => {
                    // An older answer to a query the user has moved on from is dropped.
                    if Some(&result.query) == self.gallery.query.as_ref() {
                        self.gallery.result = Some(result);
                        self.gallery.pending = false;
                    }
                }
                Reply::Result(Err(error)) => {
                    self.gallery.error = Some(error);
                    self.gallery.pending = false;
                }
            }
        }
    }

    /// A patch-level cluster map of any image, from the feature bank.
    pub(super) fn bank_map(&mut self, image_name: &str) -> Option<(ClusterMap, u64)> {
        let bank = self.gallery.bank.clone()?;
        let centroids = self.gallery_centroids();
        if centroids.is_empty() {
            return None;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        centroids.len().hash(&mut hasher);
        for value in centroids.iter().take(64) {
            value.to_bits().hash(&mut hasher);
        }
        let key = (image_name.to_string(), hasher.finish());
        if let Some(map) = self.gallery.bank_maps.get(&key) {
            return Some((map.clone(), key.1 ^ 0x5bd1_e995));
        }
        let image = bank.info.names.iter().position(|name| name == image_name)?;
        let grid = bank.info.grid;
        let mut labels = Vec::with_capacity(grid * grid);
        let mut similarity = Vec::with_capacity(grid * grid);
        for v in 0..grid {
            for u in 0..grid {
                let patch = bank.patch_at(
                    image,
                    (u as f32 + 0.5) / grid as f32,
                    (v as f32 + 0.5) / grid as f32,
                )?;
                let (cluster, score) = bank.assign(patch, &centroids);
                labels.push(cluster as u16);
                similarity.push(score);
            }
        }
        let map = ClusterMap {
            image_index: image,
            image_name: image_name.to_string(),
            width: grid,
            height: grid,
            labels,
            similarity,
        };
        if self.gallery.bank_maps.len() > 64 {
            self.gallery.bank_maps.clear();
        }
        self.gallery.bank_maps.insert(key.clone(), map.clone());
        Some((map, key.1 ^ 0x5bd1_e995))
    }

    pub(super) fn gallery_window(&mut self, ctx: &egui::Context) {
        if !self.gallery.open {
            return;
        }
        let mut open = true;
        let mut next_query = None;
        let mut jump = None;
        egui::Window::new("Similar patches")
            .id(egui::Id::unique("gallery-window"))
            .open(&mut open)
            .default_size([720.0, 330.0])
            .default_pos([270.0, 440.0])
            .resizable(true)
            .show(ctx, |ui| {
                match &self.gallery.query {
                    Some(GalleryQuery::Pixel { image, u, v }) => {
                        ui.label(format!(
                            "Patches most like the one at ({:.0}%, {:.0}%) of {image}",
                            u * 100.0,
                            v * 100.0
                        ));
                    }
                    Some(GalleryQuery::Cluster {
                        cluster,
                        outliers,
                        offset,
                    }) => {
                        ui.horizontal(|ui| {
                            ui.label(self.cluster_name(*cluster));
                            let mut show_outliers = *outliers;
                            if ui
                                .selectable_value(&mut show_outliers, false, "Typical")
                                .clicked()
                                || ui
                                    .selectable_value(&mut show_outliers, true, "Outliers")
                                    .clicked()
                            {
                                next_query = Some(GalleryQuery::Cluster {
                                    cluster: *cluster,
                                    outliers: show_outliers,
                                    offset: 0,
                                });
                            }
                            let total = self.gallery.result.as_ref().and_then(|r| r.total);
                            if ui
                                .add_enabled(*offset > 0, egui::Button::new("Previous"))
                                .clicked()
                            {
                                next_query = Some(GalleryQuery::Cluster {
                                    cluster: *cluster,
                                    outliers: *outliers,
                                    offset: offset.saturating_sub(GALLERY_PAGE),
                                });
                            }
                            let more = total.is_some_and(|t| offset + GALLERY_PAGE < t);
                            if ui.add_enabled(more, egui::Button::new("Next")).clicked() {
                                next_query = Some(GalleryQuery::Cluster {
                                    cluster: *cluster,
                                    outliers: *outliers,
                                    offset: offset + GALLERY_PAGE,
                                });
                            }
                            if let Some(total) = total {
                                ui.weak(format!(
                                    "{}–{} of {total}",
                                    (offset + 1).min(total),
                                    (offset + GALLERY_PAGE).min(total)
                                ));
                            }
                        });
                    }
                    None => {}
                }
                if let Some(job) = &mut self.gallery.building {
                    match job.progress() {
                        Some((stage, done, total)) => ui.add(
                            egui::ProgressBar::new(*done as f32 / (*total).max(1) as f32)
                                .text(format!("{stage} {done}/{total}")),
                        ),
                        None => ui.spinner(),
                    };
                    return;
                }
                if let Some(error) = self.gallery.error.clone() {
                    ui.colored_label(ui.visuals().error_fg_color, &error);
                    let can_build = self.gallery.bank.is_none()
                        && !self.is_training()
                        && self.dataset.is_some();
                    if can_build
                        && ui
                            .button("Build the feature bank")
                            .on_hover_text(
                                "Compute every image's patch features with the run's latest \
                                 network (one pass over the dataset)",
                            )
                            .clicked()
                    {
                        self.build_bank();
                    }
                    return;
                }
                if self.gallery.pending {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label("Searching the feature bank…");
                    });
                }
                let Some(result) = self.gallery.result.clone() else {
                    return;
                };
                ui.weak(match result.index_probes {
                    Some((probes, lists)) => format!(
                        "indexed search of {} patches (the nearest {probes} of {lists} groups) in {:.1} ms; click a patch to open its image",
                        result.bank_size, result.milliseconds
                    ),
                    None => format!(
                        "exact search over {} patches in {:.1} ms; click a patch to open its image",
                        result.bank_size, result.milliseconds
                    ),
                });
                let relative = relative_similarities(&result.hits);
                let first_rank = match result.query {
                    GalleryQuery::Cluster { offset, .. } => offset + 1,
                    GalleryQuery::Pixel { .. } => 1,
                };
                if let (Some(low), Some(high)) = (
                    result
                        .hits
                        .iter()
                        .map(|hit| hit.similarity)
                        .reduce(f32::min),
                    result
                        .hits
                        .iter()
                        .map(|hit| hit.similarity)
                        .reduce(f32::max),
                ) {
                    ui.weak(format!(
                        "cosine similarity {low:.4} to {high:.4} on this page; each bar places \
                         a patch between the two"
                    ));
                }
                ui.separator();
                let tile = 96.0;
                let columns = ((ui.available_width() / (tile + 8.0)).floor() as usize).max(1);
                egui::ScrollArea::vertical().show(ui, |ui| {
                    egui::Grid::new("gallery-grid")
                        .spacing([8.0, 8.0])
                        .show(ui, |ui| {
                            for (index, hit) in result.hits.iter().enumerate() {
                                ui.vertical(|ui| {
                                    ui.set_width(tile);
                                    if self.gallery_tile(ui, hit, tile).clicked() {
                                        jump = Some(hit.clone());
                                    }
                                    ui.horizontal(|ui| {
                                        let (swatch, _) = ui.allocate_exact_size(
                                            egui::vec2(10.0, 10.0),
                                            egui::Sense::hover(),
                                        );
                                        ui.painter().rect_filled(
                                            swatch,
                                            2.0,
                                            self.colour32(hit.cluster),
                                        );
                                        let rank = first_rank + index;
                                        ui.small(format!("#{rank}"));
                                        similarity_bar(ui, relative[index]);
                                    })
                                    .response
                                    .on_hover_text(format!(
                                        "{}\n{}\nrank {rank}, cosine similarity {:.4}",
                                        hit.image,
                                        self.cluster_name(hit.cluster),
                                        hit.similarity,
                                        rank = first_rank + index,
                                    ));
                                });
                                if (index + 1) % columns == 0 {
                                    ui.end_row();
                                }
                            }
                        });
                });
            });
        if let Some(query) = next_query {
            self.gallery_ask(query);
        }
        if let Some(hit) = jump {
            self.view.zoomed = Some(ZoomState {
                image_name: hit.image.clone(),
                marker: Some(uv_rect(&hit)),
                zoom: 1.0,
                pan: egui::Vec2::ZERO,
            });
        }
        self.gallery.open = open;
    }

    /// A crop around a hit (4 x 4 patches), the hit outlined.
    fn gallery_tile(&mut self, ui: &mut egui::Ui, hit: &GalleryHit, tile: f32) -> egui::Response {
        let (rect, response) = ui.allocate_exact_size(egui::vec2(tile, tile), egui::Sense::click());
        let uv = uv_rect(hit);
        let window = egui::Rect::from_center_size(uv.center(), uv.size() * 4.0);
        // Keep the crop inside the image.
        let shift = egui::vec2(
            (-window.min.x).max(0.0) - (window.max.x - 1.0).max(0.0),
            (-window.min.y).max(0.0) - (window.max.y - 1.0).max(0.0),
        );
        let window = window.translate(shift);
        let base_size = self.settings.config.base_size;
        let request = self
            .dataset
            .as_ref()
            .map(|dataset| ImageRequest::Base(dataset.paths.images.join(&hit.image), base_size));
        let ctx = ui.ctx().clone();
        let texture = request
            .as_ref()
            .and_then(|request| self.images(&ctx).get(request).map(|t| t.id()));
        let painter = ui.painter_at(rect);
        match texture {
            Some(id) => painter.image(id, rect, window, egui::Color32::WHITE),
            None => painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color),
        };
        let to_tile =
            |point: egui::Pos2| rect.min + (point - window.min) / window.size() * rect.size();
        painter.rect_stroke(
            egui::Rect::from_min_max(to_tile(uv.min), to_tile(uv.max)),
            0.0,
            egui::Stroke::new(2.0, self.colour32(hit.cluster)),
            egui::StrokeKind::Outside,
        );
        if response.hovered() {
            painter.rect_stroke(
                rect,
                0.0,
                egui::Stroke::new(1.0, egui::Color32::WHITE),
                egui::StrokeKind::Inside,
            );
        }
        response
    }
}

/// Each hit's similarity placed between the page's lowest (0) and highest (1): similarities of
/// close neighbours differ in the third decimal, so raw numbers would all read alike. A page
/// whose hits are all equally similar gives 1 for each.
fn relative_similarities(hits: &[GalleryHit]) -> Vec<f32> {
    let low = hits
        .iter()
        .map(|hit| hit.similarity)
        .fold(f32::INFINITY, f32::min);
    let high = hits
        .iter()
        .map(|hit| hit.similarity)
        .fold(f32::NEG_INFINITY, f32::max);
    let spread = high - low;
    hits.iter()
        .map(|hit| {
            if spread > f32::EPSILON {
                (hit.similarity - low) / spread
            } else {
                1.0
            }
        })
        .collect()
}

/// A small bar filled to `fraction` (0 to 1) of its width.
fn similarity_bar(ui: &mut egui::Ui, fraction: f32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(48.0, 6.0), egui::Sense::hover());
    let visuals = ui.visuals();
    ui.painter()
        .rect_filled(rect, 2.0, visuals.widgets.inactive.bg_fill);
    let mut filled = rect;
    filled.set_width(rect.width() * fraction.clamp(0.04, 1.0));
    ui.painter()
        .rect_filled(filled, 2.0, visuals.selection.bg_fill);
}

/// Where a hit's patch lies in its image, in `0..1` coordinates.
fn uv_rect(hit: &GalleryHit) -> egui::Rect {
    egui::Rect::from_min_size(
        egui::pos2(hit.uv_min[0], hit.uv_min[1]),
        egui::vec2(hit.uv_size, hit.uv_size),
    )
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::{NodeT, Queryable};

    use super::super::test_support::app_with_three_clusters;
    use super::*;

    fn hit(similarity: f32) -> GalleryHit {
        GalleryHit {
            image: "a.png".into(),
            uv_min: [0.0, 0.0],
            uv_size: 0.1,
            similarity,
            cluster: 0,
        }
    }

    #[test]
    fn a_cluster_gallery_pages_through_its_members() {
        let run = tempfile::tempdir().unwrap();
        let mut app = app_with_three_clusters(run.path());
        let first_page = GalleryQuery::Cluster {
            cluster: 1,
            outliers: false,
            offset: 0,
        };
        app.gallery.open = true;
        app.gallery.query = Some(first_page.clone());
        app.gallery.result = Some(GalleryResult {
            query: first_page,
            hits: vec![hit(0.97), hit(0.95), hit(0.90)],
            total: Some(GALLERY_PAGE + 5),
            milliseconds: 2.5,
            bank_size: 1000,
            index_probes: None,
        });
        let mut harness = Harness::new_ui_state(
            |ui, app: &mut ExplorerApp| app.gallery_window(ui.ctx()),
            app,
        );
        harness.get_by_label("cluster 1");
        harness.get_by_label(&format!("1–{GALLERY_PAGE} of {}", GALLERY_PAGE + 5));
        harness.get_by_label(
            "exact search over 1000 patches in 2.5 ms; click a patch to open its image",
        );
        for rank in ["#1", "#2", "#3"] {
            harness.get_by_label(rank);
        }
        assert!(
            harness
                .get_by_label("Previous")
                .accesskit_node()
                .is_disabled()
        );
        harness.get_by_label("Next").click();
        // A spinner turns while the answer is awaited: step frames rather than settle.
        harness.run_steps(2);
        harness.get_by_label("Searching the feature bank…");
        // The next page is asked of the search thread (this run has no bank: it will answer
        // with an error the window shows).
        let gallery = &harness.state().gallery;
        assert_eq!(
            gallery.query,
            Some(GalleryQuery::Cluster {
                cluster: 1,
                outliers: false,
                offset: GALLERY_PAGE,
            })
        );
        assert!(gallery.pending);
    }

    #[test]
    fn near_equal_similarities_are_spread_over_the_whole_bar() {
        let hits = [hit(1.0), hit(0.9990), hit(0.9985), hit(0.9980)];
        let relative = relative_similarities(&hits);
        assert_eq!(relative[0], 1.0);
        assert_eq!(relative[3], 0.0);
        assert!((relative[1] - 0.5).abs() < 1e-3, "{relative:?}");
        assert!(relative[1] > relative[2] && relative[2] > relative[3]);
        // A page of equal hits shows full bars, not a division by zero.
        assert_eq!(relative_similarities(&[hit(0.5), hit(0.5)]), vec![1.0, 1.0]);
    }
}
