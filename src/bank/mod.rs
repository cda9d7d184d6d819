//! The feature bank: one pooled, unit-length feature per image patch of a run's dataset, saved
//! in the run folder, with exact nearest-neighbour search over it.
//!
//! ```text
//! RUN_DIR/bank/info.json      header: BankInfo, format, number of patches
//! RUN_DIR/bank/features.f16   [patches, dim] row-major little-endian IEEE half floats
//! ```
//!
//! Patch `p` is cell `(x, y)` of image `i` with `p = (i * grid + y) * grid + x`: a square of
//! `patch` input pixels whose feature is the average of the network's unit pixel features
//! (stride 4) over it, normalised again. The bank is replaced atomically (written into a
//! temporary folder that is renamed into place), so a reader sees an old or a new bank.
//!
//! Search is exact: every query scores every patch (cosine similarity), streamed in chunks so
//! no `N x N` (or even `N x 128` f32) matrix is ever built, and the best `k` are kept with ties
//! going to the lower patch index. [`DeviceBank`] holds the bank on a burn device for repeated
//! queries by chunked matrix products; its candidates are re-scored on the host, so it returns
//! exactly what [`FeatureBank::nearest`] returns.
//!
//! Rooms: this file holds the bank's type, its errors and where a patch lies; `format.rs`
//! reads and writes the files, `search.rs` answers queries, `build.rs` computes a bank from a
//! run's network, `sheet.rs` draws and writes the neighbours of a patch.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use crate::run::RunError;

mod build;
mod format;
pub mod gallery;
mod index;
mod search;
mod sheet;

use format::{publish_folder, write_header};
use search::{Assignments, Rows, unit_vector};

pub use build::{BankBuilder, BuiltBank, build_bank, build_run_bank, check_patch, write_bank};
pub use format::BankInfo;
pub use index::{BankIndex, INDEX_MIN_PATCHES, IndexConfig};
pub use search::{DeviceBank, SEARCH_CHUNK};
pub use sheet::{
    NeighboursReport, NeighboursRequest, PatchReport, SHEET_BORDER, SHEET_COLUMNS, SHEET_GAP,
    SHEET_MAX_PICTURES, SHEET_TILE, SHEET_WINDOW, contact_sheet_size, recorded_images_dir,
    render_contact_sheet, write_contact_sheet, write_neighbours,
};

pub use crate::run::paths::BANK_DIR;
/// The header file inside [`BANK_DIR`].
pub const INFO_FILE: &str = "info.json";
/// The feature file inside [`BANK_DIR`].
pub const FEATURES_FILE: &str = "features.f16";
/// Default patch side in input pixels.
pub const DEFAULT_PATCH: usize = crate::config::DEFAULT_BANK_PATCH;

/// The one-line hint every "no bank / broken bank" message ends with.
const BUILD_HINT: &str = "build it with `picie bank --run RUN_DIR --images DIR` or from the app";

/// Errors of building, reading, writing and querying a feature bank; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The run has no bank yet.
    #[error("run {} has no feature bank ({} is missing); {BUILD_HINT}", run.display(), crate::run::paths::bank(run).join(INFO_FILE).display())]
    Missing {
        /// The run folder.
        run: PathBuf,
    },
    /// A bank file could not be read.
    #[error("cannot read {}: {reason}; rebuild the bank: {BUILD_HINT}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A bank file is not what its header says.
    #[error("feature bank file {} is not valid: {reason}; rebuild the bank: {BUILD_HINT}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}. Check free disk space and write permission", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The patch size does not fit the network's input.
    #[error(
        "feature bank patch {patch} must be a multiple of 4 (the feature stride) that divides the input size {input_size}; use e.g. 8 (config field bank_patch)"
    )]
    Patch {
        /// The patch side asked for, in input pixels.
        patch: usize,
        /// The network input side.
        input_size: u32,
    },
    /// Nothing to put into a bank.
    #[error("cannot build a feature bank of a dataset without images")]
    Empty,
    /// Values that do not form a bank (wrong counts, non-finite numbers).
    #[error("invalid feature bank: {0}")]
    Invalid(String),
    /// The device failed to run or read back a computation.
    #[error("device error in the feature bank: {0}")]
    Device(String),
    /// A decoded image could not be read back from its cache file.
    #[error(transparent)]
    DecodedImage(#[from] crate::data::StackReadError),
    /// An image name the bank does not hold.
    #[error(
        "the feature bank has no image named '{name}' (it holds {count} images, e.g. '{example}')"
    )]
    UnknownImage {
        /// The name asked for.
        name: String,
        /// Images in the bank.
        count: usize,
        /// A name of the bank, to show the expected form.
        example: String,
    },
    /// An image of the bank could not be read from the image folder.
    #[error("cannot read image {}: {reason}; pass the image folder the bank was built from (--images DIR)", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A query point outside the part of the image the network sees.
    #[error(
        "point ({x}, {y}) is outside the centre square crop of {image} that the network sees: x {crop_x}..{}, y {crop_y}..{} of the {width}x{height} image; pick a point inside it",
        crop_x + crop_side, crop_y + crop_side
    )]
    OutsideCrop {
        /// The image name.
        image: String,
        /// Query x in original pixels.
        x: u32,
        /// Query y in original pixels.
        y: u32,
        /// Left of the crop.
        crop_x: u32,
        /// Top of the crop.
        crop_y: u32,
        /// Side of the crop.
        crop_side: u32,
        /// Original width.
        width: u32,
        /// Original height.
        height: u32,
    },
    /// A query vector that cannot be searched with.
    #[error("invalid query: {0}")]
    Query(String),
    /// The run folder could not be read.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// The patch index (see [`FeatureBank::location`]).
    pub patch: usize,
    /// Cosine similarity to the query (or to the centroid, for cluster members).
    pub similarity: f32,
}

/// Which members of a cluster come first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberOrder {
    /// Most similar to the centroid first.
    Typical,
    /// Least similar to the centroid first.
    Outliers,
}

/// Pooled, unit-length patch features of every image of a dataset, as f16.
pub struct FeatureBank {
    /// What the bank holds.
    pub info: BankInfo,
    rows: Arc<Rows>,
    /// The last full assignment, so paging through a cluster's members is cheap.
    assignments: Mutex<Option<Arc<Assignments>>>,
}

impl std::fmt::Debug for FeatureBank {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FeatureBank")
            .field("info", &self.info)
            .field("patches", &self.len())
            .finish()
    }
}

impl Clone for FeatureBank {
    fn clone(&self) -> Self {
        Self {
            info: self.info.clone(),
            rows: Arc::clone(&self.rows),
            assignments: Mutex::new(None),
        }
    }
}

/// `RUN_DIR/bank`.
pub fn bank_dir(run_dir: &Path) -> PathBuf {
    crate::run::paths::bank(run_dir)
}

/// Whether a run folder has a bank (its header exists; it may still fail to load).
pub fn has_bank(run_dir: &Path) -> bool {
    bank_dir(run_dir).join(INFO_FILE).is_file()
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> BankError + '_ {
    move |source| BankError::Write {
        path: path.to_owned(),
        source,
    }
}

impl FeatureBank {
    /// Number of patches.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the bank holds no patch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored features, `[len, dim]` row-major f16.
    pub fn features_f16(&self) -> &[f16] {
        &self.rows.values
    }

    /// The unit feature of `patch` (empty for a patch outside the bank).
    pub fn feature(&self, patch: usize) -> Vec<f32> {
        if patch >= self.len() {
            return Vec::new();
        }
        let mut row = vec![0f32; self.rows.dim];
        self.rows.row(patch).convert_to_f32_slice(&mut row);
        let scale = self.rows.inv_norms[patch];
        row.iter_mut().for_each(|value| *value *= scale);
        row
    }

    /// `(image, x, y)` of a patch: its image index and its cell in the `grid x grid` patch
    /// grid (pure arithmetic; the image index is past the end for a patch outside the bank).
    pub fn location(&self, patch: usize) -> (usize, usize, usize) {
        let grid = self.info.grid.max(1);
        let per_image = grid * grid;
        let cell = patch % per_image;
        (patch / per_image, cell % grid, cell / grid)
    }

    /// The patch of `image` at `(u, v)` in `[0, 1]` over its base square (`u` across; the far
    /// edges belong to the last row and column), or `None` outside the image or the bank.
    pub fn patch_at(&self, image: usize, u: f32, v: f32) -> Option<usize> {
        let grid = self.info.grid;
        let inside = |t: f32| (0.0..=1.0).contains(&t);
        if image >= self.info.names.len() || !inside(u) || !inside(v) {
            return None;
        }
        let cell = |t: f32| ((t * grid as f32) as usize).min(grid.saturating_sub(1));
        let patch = (image * grid + cell(v)) * grid + cell(u);
        (patch < self.len()).then_some(patch)
    }

    /// The index of an image by name: its relative path, or else its file name or stem when
    /// exactly one image has it.
    pub fn image_index(&self, name: &str) -> Option<usize> {
        let names = &self.info.names;
        if let Some(index) = names.iter().position(|candidate| candidate == name) {
            return Some(index);
        }
        let matches: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, candidate)| {
                let path = Path::new(candidate.as_str());
                path.file_name().is_some_and(|file| file == name)
                    || path.file_stem().is_some_and(|stem| stem == name)
            })
            .map(|(index, _)| index)
            .collect();
        (matches.len() == 1).then(|| matches[0])
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::search::TopK;
    use super::*;

    /// The header of a bank of `images` images of `grid²` patches of `dim` values (also used
    /// by the index's tests).
    pub(super) fn info(images: usize, grid: usize, dim: usize) -> BankInfo {
        BankInfo {
            dim,
            patch: 8,
            input_size: (grid * 8) as u32,
            base_size: (grid * 16) as u32,
            grid,
            epoch: 0,
            names: (0..images)
                .map(|index| format!("dir/image-{index}.png"))
                .collect(),
        }
    }

    #[test]
    fn top_k_keeps_the_best_with_ties_to_lower_patches() {
        let mut top = TopK::new(3);
        for (patch, similarity) in [(5, 0.5), (1, 0.9), (4, 0.5), (2, 0.5), (3, -0.0), (0, 0.1)] {
            top.offer(patch, similarity);
        }
        let other = {
            let mut top = TopK::new(3);
            top.offer(7, 0.9);
            top
        };
        let best: Vec<(usize, f32)> = top
            .merge(other)
            .into_sorted()
            .iter()
            .map(|n| (n.patch, n.similarity))
            .collect();
        assert_eq!(best, vec![(1, 0.9), (7, 0.9), (2, 0.5)]);
    }

    #[test]
    fn locations_and_patches_agree() {
        let bank = FeatureBank::from_features(info(3, 4, 2), &[1.0; 3 * 16 * 2]).unwrap();
        assert_eq!(bank.location(0), (0, 0, 0));
        assert_eq!(bank.location(16 + 4 * 2 + 3), (1, 3, 2));
        for patch in 0..bank.len() {
            let (image, x, y) = bank.location(patch);
            let u = (x as f32 + 0.5) / 4.0;
            let v = (y as f32 + 0.5) / 4.0;
            assert_eq!(bank.patch_at(image, u, v), Some(patch));
        }
        assert_eq!(bank.patch_at(3, 0.5, 0.5), None);
        // A click on the image's right edge is its last column's patch; past it, none.
        assert_eq!(bank.patch_at(0, 1.0, 0.5), Some(2 * 4 + 3));
        assert_eq!(bank.patch_at(0, 1.01, 0.5), None);
        assert_eq!(bank.patch_at(0, f32::NAN, 0.5), None);
        assert_eq!(bank.image_index("image-1"), Some(1));
        assert_eq!(bank.image_index("image-1.png"), Some(1));
        assert_eq!(bank.image_index("dir/image-2.png"), Some(2));
        assert_eq!(bank.image_index("nope"), None);
    }

    #[test]
    fn bad_input_gives_empty_results_not_panics() {
        let bank = FeatureBank::from_features(info(1, 2, 3), &[0.5; 4 * 3]).unwrap();
        assert!(bank.nearest(&[1.0, 0.0], 3).is_empty());
        assert!(bank.nearest(&[0.0; 3], 3).is_empty());
        assert!(bank.nearest(&[f32::NAN, 0.0, 1.0], 3).is_empty());
        assert!(bank.nearest(&[1.0, 0.0, 0.0], 0).is_empty());
        assert!(bank.feature(4).is_empty());
        assert!(bank.assign(4, &[1.0, 0.0, 0.0]).1.is_nan());
        assert!(bank.assign(0, &[1.0, 0.0]).1.is_nan());
        assert_eq!(
            bank.cluster_members(&[], 0, MemberOrder::Typical, 0, 5),
            (Vec::new(), 0)
        );
        assert!(FeatureBank::from_features(info(1, 2, 3), &[0.5; 5]).is_err());
        assert!(check_patch(6, 64).is_err());
        assert!(check_patch(12, 64).is_err());
        assert!(check_patch(0, 64).is_err());
        assert!(check_patch(16, 64).is_ok());
    }

    #[test]
    fn contact_sheet_size_follows_the_grid() {
        let cell = SHEET_TILE + 2 * SHEET_BORDER;
        assert_eq!(
            contact_sheet_size(1),
            (2 * SHEET_GAP + cell, 2 * SHEET_GAP + cell)
        );
        let (width, height) = contact_sheet_size(SHEET_COLUMNS + 1);
        assert_eq!(width, SHEET_GAP + SHEET_COLUMNS as u32 * (cell + SHEET_GAP));
        assert_eq!(height, SHEET_GAP + 2 * (cell + SHEET_GAP));
    }
}
