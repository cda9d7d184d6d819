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
//! This file holds the format (reading, writing, checking) and the search; `build.rs` computes
//! a bank from a run's network, `sheet.rs` draws and writes the neighbours of a patch.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::run::RunError;

mod build;
mod sheet;

pub use build::{BankBuilder, BuiltBank, build_bank, build_run_bank, check_patch, write_bank};
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
/// Patches per chunk of the device path (one matrix product each; 32 MiB of f32 at dim 128,
/// below wgpu's default storage-buffer limit).
pub const SEARCH_CHUNK: usize = 65_536;

/// Written into the header; a bank of another format is refused with "rebuild it".
const FORMAT: &str = "picie-feature-bank/1";
/// Element type of the feature file, as named in the header.
const DTYPE: &str = "f16-le";
/// Rows per CPU task: small enough to balance threads, large enough to amortise the task.
const CPU_BLOCK: usize = 2048;
/// Bound on how far a device's f32 similarity may be from the host's (unit vectors, f32
/// accumulation: the real error is ~1e-6). Patches within twice this of the device's k-th best
/// are re-scored on the host, which makes the device result exact.
const DEVICE_TOLERANCE: f32 = 1e-3;
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

/// What a bank holds, saved as its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankInfo {
    /// Feature dimension.
    pub dim: usize,
    /// Patch side in input pixels (a multiple of 4).
    pub patch: usize,
    /// Network input side the images were fed at.
    pub input_size: u32,
    /// Base square side (shorter side resized to this, then centre crop).
    pub base_size: u32,
    /// Patches per image side: `input_size / patch`.
    pub grid: usize,
    /// Epoch of the network (0: untrained).
    pub epoch: usize,
    /// Image names (relative paths), in dataset order.
    pub names: Vec<String>,
}

impl BankInfo {
    /// Patches of one image: `grid²`.
    pub fn patches_per_image(&self) -> usize {
        self.grid * self.grid
    }

    /// Patches of all images.
    pub fn patches(&self) -> usize {
        self.names.len() * self.patches_per_image()
    }

    /// Checks that the fields agree with each other.
    fn check(&self) -> Result<(), String> {
        if self.dim == 0 {
            return Err("the feature dimension is 0".into());
        }
        if self.grid == 0 || self.patch == 0 || self.grid * self.patch != self.input_size as usize {
            return Err(format!(
                "grid {} x patch {} does not make the input size {}",
                self.grid, self.patch, self.input_size
            ));
        }
        if self.base_size == 0 {
            return Err("the base size is 0".into());
        }
        Ok(())
    }
}

/// The header file: the info and what is needed to check the feature file against it.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    dtype: String,
    patches: usize,
    #[serde(flatten)]
    info: BankInfo,
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

/// The feature matrix with what every search needs.
struct Rows {
    /// `[len, dim]` row-major.
    values: Vec<f16>,
    /// `1 / |row|` (0 for a zero row), so scores are cosines of the stored f16 vectors.
    inv_norms: Vec<f32>,
    dim: usize,
}

impl Rows {
    fn new(values: Vec<f16>, dim: usize) -> Result<Self, String> {
        if dim == 0 || !values.len().is_multiple_of(dim) {
            return Err(format!(
                "{} values are not whole rows of {dim}",
                values.len()
            ));
        }
        let inv_norms = values
            .par_chunks(dim)
            .map(|row| {
                let norm = row
                    .iter()
                    .map(|value| f64::from(value.to_f32()).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if !norm.is_finite() {
                    None
                } else if norm > 1e-12 {
                    Some((1.0 / norm) as f32)
                } else {
                    Some(0.0)
                }
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| "a feature is not a finite number".to_owned())?;
        Ok(Self {
            values,
            inv_norms,
            dim,
        })
    }

    fn len(&self) -> usize {
        self.inv_norms.len()
    }

    fn row(&self, index: usize) -> &[f16] {
        &self.values[index * self.dim..(index + 1) * self.dim]
    }

    /// Cosine of row `index` (already converted to f32 in `row`) with the unit vector `unit`.
    /// The one formula every path uses, so equal rows always score equally.
    fn score(&self, index: usize, row: &[f32], unit: &[f32]) -> f32 {
        // `+ 0.0` turns -0.0 into 0.0, so the total order sees one zero.
        dot(row, unit) * self.inv_norms[index] + 0.0
    }
}

/// Inner product with eight independent accumulators (vectorises; fixed order, so the result
/// depends only on the two vectors).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in chunks_a.zip(chunks_b) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `values` scaled to unit length in f64; `None` for a zero, non-finite or wrong-length vector.
fn unit_vector(values: &[f32], dim: usize) -> Option<Vec<f32>> {
    if values.len() != dim || values.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let norm = values
        .iter()
        .map(|&value| f64::from(value).powi(2))
        .sum::<f64>()
        .sqrt();
    (norm > 1e-12).then(|| {
        values
            .iter()
            .map(|&value| (f64::from(value) / norm) as f32)
            .collect()
    })
}

/// Centroids (`K x dim`) with each row scaled to unit length (zero rows stay zero); `None`
/// unless they are a non-empty whole number of finite rows.
fn unit_centroids(centroids: &[f32], dim: usize) -> Option<Vec<f32>> {
    if dim == 0
        || centroids.is_empty()
        || !centroids.len().is_multiple_of(dim)
        || centroids.iter().any(|value| !value.is_finite())
    {
        return None;
    }
    Some(
        centroids
            .chunks(dim)
            .flat_map(|row| unit_vector(row, dim).unwrap_or_else(|| vec![0.0; dim]))
            .collect(),
    )
}

/// A search candidate in rank order: higher similarity first, then lower patch index.
#[derive(Debug, Clone, Copy)]
struct Ranked(Neighbour);

impl Ord for Ranked {
    /// `Less` ranks first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .similarity
            .total_cmp(&self.0.similarity)
            .then(self.0.patch.cmp(&other.0.patch))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The best `k` offered so far; the heap's top is the worst kept.
struct TopK {
    k: usize,
    heap: BinaryHeap<Ranked>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    fn offer(&mut self, patch: usize, similarity: f32) {
        let candidate = Ranked(Neighbour { patch, similarity });
        if self.heap.len() < self.k {
            self.heap.push(candidate);
        } else if let Some(mut worst) = self.heap.peek_mut()
            && candidate < *worst
        {
            *worst = candidate;
        }
    }

    fn merge(self, other: Self) -> Self {
        let (mut keep, rest) = if self.heap.len() >= other.heap.len() {
            (self, other)
        } else {
            (other, self)
        };
        for Ranked(neighbour) in rest.heap {
            keep.offer(neighbour.patch, neighbour.similarity);
        }
        keep
    }

    fn into_sorted(self) -> Vec<Neighbour> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|ranked| ranked.0)
            .collect()
    }
}

/// Exact top-k of every row against the unit vector `unit`, over rayon in blocks.
fn scan_top_k(rows: &Rows, unit: &[f32], k: usize) -> Vec<Neighbour> {
    if k == 0 || rows.len() == 0 {
        return Vec::new();
    }
    let dim = rows.dim;
    rows.values
        .par_chunks(CPU_BLOCK * dim)
        .enumerate()
        .map_init(
            || vec![0f32; CPU_BLOCK * dim],
            |buffer, (block, values)| {
                let buffer = &mut buffer[..values.len()];
                values.convert_to_f32_slice(buffer);
                let mut top = TopK::new(k);
                for (offset, row) in buffer.chunks_exact(dim).enumerate() {
                    let index = block * CPU_BLOCK + offset;
                    top.offer(index, rows.score(index, row, unit));
                }
                top
            },
        )
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}

/// Exact top-k among the rows `candidates`, scored as [`scan_top_k`] scores them.
fn candidates_top_k(rows: &Rows, unit: &[f32], k: usize, candidates: &[usize]) -> Vec<Neighbour> {
    let dim = rows.dim;
    candidates
        .par_chunks(1024)
        .map_init(
            || vec![0f32; dim],
            |buffer, chunk| {
                let mut top = TopK::new(k);
                for &index in chunk {
                    rows.row(index).convert_to_f32_slice(buffer);
                    top.offer(index, rows.score(index, buffer, unit));
                }
                top
            },
        )
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}

/// The nearest of the unit `centroids` to row `index` (converted into `row`): ties go to the
/// lower cluster index.
fn best_centroid(rows: &Rows, index: usize, row: &[f32], centroids: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (cluster, centroid) in centroids.chunks_exact(rows.dim).enumerate() {
        let similarity = rows.score(index, row, centroid);
        if similarity > best.1 {
            best = (cluster, similarity);
        }
    }
    best
}

/// Every patch's nearest centroid, for one set of centroids.
struct Assignments {
    /// The centroids as given, bit for bit, to recognise them.
    key: Vec<u32>,
    /// `(cluster, similarity)` per patch.
    labels: Vec<(u32, f32)>,
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

/// Writes the header of a bank of `patches` rows into `folder` (beside its features file).
fn write_header(folder: &Path, info: &BankInfo, patches: usize) -> Result<(), BankError> {
    let header = Header {
        format: FORMAT.to_owned(),
        dtype: DTYPE.to_owned(),
        patches,
        info: info.clone(),
    };
    let info_path = folder.join(INFO_FILE);
    let text = serde_json::to_string_pretty(&header)
        .map_err(|error| write_error(&info_path)(std::io::Error::other(error)))?;
    fsutil::write_bytes_atomic(&info_path, text.as_bytes()).map_err(write_error(&info_path))
}

/// Renames the complete bank folder `partial` to `RUN_DIR/bank/`, the previous bank moved
/// aside first and removed after (put back if the rename fails).
fn publish_folder(run_dir: &Path, partial: &Path) -> Result<(), BankError> {
    let final_dir = bank_dir(run_dir);
    let old = crate::run::paths::bank_old(run_dir);
    if old.exists() {
        fs::remove_dir_all(&old).map_err(write_error(&old))?;
    }
    let had_old = final_dir.exists();
    if had_old {
        fs::rename(&final_dir, &old).map_err(write_error(&final_dir))?;
    }
    if let Err(source) = fs::rename(partial, &final_dir) {
        if had_old {
            let _ = fs::rename(&old, &final_dir);
        }
        return Err(BankError::Write {
            path: final_dir.clone(),
            source,
        });
    }
    if had_old {
        // Only disk space is at stake now.
        let _ = fs::remove_dir_all(&old);
    }
    Ok(())
}

impl FeatureBank {
    /// A bank of f32 features (`info.patches() x info.dim`, row-major); each row is scaled
    /// to unit length and stored as f16.
    pub fn from_features(info: BankInfo, features: &[f32]) -> Result<Self, BankError> {
        info.check().map_err(BankError::Invalid)?;
        let dim = info.dim;
        if features.len() != info.patches() * dim {
            return Err(BankError::Invalid(format!(
                "{} values for {} patches of {dim}",
                features.len(),
                info.patches()
            )));
        }
        if features.par_iter().any(|value| !value.is_finite()) {
            return Err(BankError::Invalid(
                "a feature is not a finite number".into(),
            ));
        }
        let mut values = vec![f16::ZERO; features.len()];
        values
            .par_chunks_mut(dim)
            .zip(features.par_chunks(dim))
            .for_each(|(out, row)| {
                let unit = unit_vector(row, dim).unwrap_or_else(|| vec![0.0; dim]);
                out.convert_from_f32_slice(&unit);
            });
        Self::from_f16(info, values)
    }

    /// A bank of f16 features as they will be stored (rows should have unit length; scores
    /// are cosines either way).
    pub fn from_f16(info: BankInfo, features: Vec<f16>) -> Result<Self, BankError> {
        info.check().map_err(BankError::Invalid)?;
        if features.len() != info.patches() * info.dim {
            return Err(BankError::Invalid(format!(
                "{} values for {} patches of {}",
                features.len(),
                info.patches(),
                info.dim
            )));
        }
        let rows = Rows::new(features, info.dim).map_err(BankError::Invalid)?;
        Ok(Self {
            info,
            rows: Arc::new(rows),
            assignments: Mutex::new(None),
        })
    }

    /// Reads `RUN_DIR/bank/`. A missing bank is [`BankError::Missing`], which says how to
    /// build one.
    pub fn load(run_dir: &Path) -> Result<Self, BankError> {
        let folder = bank_dir(run_dir);
        let info_path = folder.join(INFO_FILE);
        if !info_path.is_file() {
            return Err(BankError::Missing {
                run: run_dir.to_owned(),
            });
        }
        let corrupt = |path: &Path, reason: String| BankError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let text = fs::read_to_string(&info_path).map_err(|error| BankError::Read {
            path: info_path.clone(),
            reason: error.to_string(),
        })?;
        let header: Header =
            serde_json::from_str(&text).map_err(|error| corrupt(&info_path, error.to_string()))?;
        if header.format != FORMAT || header.dtype != DTYPE {
            return Err(corrupt(
                &info_path,
                format!(
                    "format '{}' ({}) is not '{FORMAT}' ({DTYPE})",
                    header.format, header.dtype
                ),
            ));
        }
        header
            .info
            .check()
            .map_err(|reason| corrupt(&info_path, reason))?;
        if header.patches != header.info.patches() {
            return Err(corrupt(
                &info_path,
                format!(
                    "{} patches listed, but {} images of {}x{} patches make {}",
                    header.patches,
                    header.info.names.len(),
                    header.info.grid,
                    header.info.grid,
                    header.info.patches()
                ),
            ));
        }
        let features_path = folder.join(FEATURES_FILE);
        let mut file = File::open(&features_path).map_err(|error| BankError::Read {
            path: features_path.clone(),
            reason: error.to_string(),
        })?;
        let expected = header
            .patches
            .checked_mul(header.info.dim)
            .and_then(|values| values.checked_mul(2))
            .ok_or_else(|| corrupt(&info_path, "the bank size overflows".into()))?;
        let length = file
            .metadata()
            .map_err(|error| BankError::Read {
                path: features_path.clone(),
                reason: error.to_string(),
            })?
            .len();
        if length != expected as u64 {
            return Err(corrupt(
                &features_path,
                format!(
                    "{length} bytes, but {} patches of {} half floats need {expected}",
                    header.patches, header.info.dim
                ),
            ));
        }
        // Read straight into the f16 buffer: the file is the in-memory layout on little-endian
        // machines, so loading 256 MB costs one copy.
        let mut values = vec![f16::ZERO; expected / 2];
        file.read_exact(bytemuck::cast_slice_mut(values.reinterpret_cast_mut()))
            .map_err(|error| BankError::Read {
                path: features_path.clone(),
                reason: error.to_string(),
            })?;
        if cfg!(target_endian = "big") {
            for bits in values.reinterpret_cast_mut() {
                *bits = u16::from_le(*bits);
            }
        }
        let rows =
            Rows::new(values, header.info.dim).map_err(|reason| corrupt(&features_path, reason))?;
        Ok(Self {
            info: header.info,
            rows: Arc::new(rows),
            assignments: Mutex::new(None),
        })
    }

    /// Writes `RUN_DIR/bank/` atomically: into a temporary folder, then renamed into place
    /// (an existing bank is moved aside first and removed after).
    pub fn save(&self, run_dir: &Path) -> Result<(), BankError> {
        fs::create_dir_all(run_dir).map_err(write_error(run_dir))?;
        let partial = crate::run::paths::bank_partial(run_dir);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(write_error(&partial))?;
        }
        let result = self
            .write_files(&partial)
            .and_then(|()| publish_folder(run_dir, &partial));
        if result.is_err() {
            let _ = fs::remove_dir_all(&partial);
        }
        result
    }

    fn write_files(&self, folder: &Path) -> Result<(), BankError> {
        fs::create_dir_all(folder).map_err(write_error(folder))?;
        let features_path = folder.join(FEATURES_FILE);
        let write_features = || -> std::io::Result<()> {
            let mut writer = BufWriter::new(File::create(&features_path)?);
            let mut bytes = Vec::with_capacity(2 << 20);
            for piece in self.rows.values.chunks(1 << 20) {
                bytes.clear();
                bytes.extend(piece.iter().flat_map(|value| value.to_bits().to_le_bytes()));
                writer.write_all(&bytes)?;
            }
            writer.flush()?;
            writer
                .into_inner()
                .map_err(|error| error.into_error())?
                .sync_all()
        };
        write_features().map_err(write_error(&features_path))?;
        write_header(folder, &self.info, self.len())
    }

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

    /// The patch of `image` at `(u, v)` in `[0, 1)` over its base square (`u` across), or
    /// `None` outside the image or the bank.
    pub fn patch_at(&self, image: usize, u: f32, v: f32) -> Option<usize> {
        let grid = self.info.grid;
        if image >= self.info.names.len() || !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
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

    /// The `k` patches most similar (cosine) to `query`, best first, exact, on the CPU: every
    /// patch is scored in blocks over rayon. Ties go to the lower patch index. Empty for
    /// `k = 0` or a query that is not `dim` finite values of non-zero length.
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        match unit_vector(query, self.rows.dim) {
            Some(unit) => scan_top_k(&self.rows, &unit, k),
            None => Vec::new(),
        }
    }

    /// [`FeatureBank::nearest`] by chunked matrix products on `device` (the bank is uploaded
    /// for this one query; keep a [`DeviceBank`] for repeated queries).
    pub fn nearest_on_device(&self, query: &[f32], k: usize, device: &Device) -> Vec<Neighbour> {
        self.to_device(device).nearest(query, k)
    }

    /// Uploads the bank to `device` in chunks of [`SEARCH_CHUNK`] patches (f32, unit rows).
    pub fn to_device(&self, device: &Device) -> DeviceBank {
        let dim = self.rows.dim;
        let chunks = (0..self.len())
            .step_by(SEARCH_CHUNK)
            .map(|start| {
                let end = (start + SEARCH_CHUNK).min(self.len());
                let mut values = vec![0f32; (end - start) * dim];
                values
                    .par_chunks_mut(dim)
                    .enumerate()
                    .for_each(|(offset, out)| {
                        let index = start + offset;
                        self.rows.row(index).convert_to_f32_slice(out);
                        let scale = self.rows.inv_norms[index];
                        out.iter_mut().for_each(|value| *value *= scale);
                    });
                Tensor::<2>::from_data(TensorData::new(values, [end - start, dim]), device)
            })
            .collect();
        DeviceBank {
            rows: Arc::clone(&self.rows),
            chunks,
            device: device.clone(),
        }
    }

    /// The centroid (of `centroids`, `K x dim` row-major) nearest to `patch`, with its cosine
    /// similarity; ties go to the lower cluster. `(0, NaN)` for a patch outside the bank or
    /// centroids that are not a whole number of finite rows.
    pub fn assign(&self, patch: usize, centroids: &[f32]) -> (usize, f32) {
        let dim = self.rows.dim;
        let (Some(centroids), true) = (unit_centroids(centroids, dim), patch < self.len()) else {
            return (0, f32::NAN);
        };
        let mut row = vec![0f32; dim];
        self.rows.row(patch).convert_to_f32_slice(&mut row);
        best_centroid(&self.rows, patch, &row, &centroids)
    }

    /// Members of `cluster` (patches whose nearest centroid it is, as [`FeatureBank::assign`]
    /// decides), with their similarity to its centroid: `count` of them from `offset` in
    /// `order` (ties by patch index), and the number of members. The assignment of the last
    /// centroids asked about is kept, so paging is cheap. `(empty, 0)` for invalid centroids.
    pub fn cluster_members(
        &self,
        centroids: &[f32],
        cluster: usize,
        order: MemberOrder,
        offset: usize,
        count: usize,
    ) -> (Vec<Neighbour>, usize) {
        let Some(assignments) = self.assignments(centroids) else {
            return (Vec::new(), 0);
        };
        let mut members: Vec<Ranked> = assignments
            .labels
            .par_iter()
            .enumerate()
            .filter(|(_, (label, _))| *label as usize == cluster)
            .map(|(patch, &(_, similarity))| Ranked(Neighbour { patch, similarity }))
            .collect();
        let total = members.len();
        match order {
            MemberOrder::Typical => members.par_sort_unstable(),
            MemberOrder::Outliers => members.par_sort_unstable_by(|a, b| {
                a.0.similarity
                    .total_cmp(&b.0.similarity)
                    .then(a.0.patch.cmp(&b.0.patch))
            }),
        }
        let page = members
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|ranked| ranked.0)
            .collect();
        (page, total)
    }

    /// Every patch's nearest centroid, cached for the last centroids given.
    fn assignments(&self, centroids: &[f32]) -> Option<Arc<Assignments>> {
        let dim = self.rows.dim;
        let unit = unit_centroids(centroids, dim)?;
        let key: Vec<u32> = centroids.iter().map(|value| value.to_bits()).collect();
        let mut cache = self
            .assignments
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(cached) = cache.as_ref().filter(|cached| cached.key == key) {
            return Some(Arc::clone(cached));
        }
        let rows = &self.rows;
        let labels: Vec<(u32, f32)> = rows
            .values
            .par_chunks(CPU_BLOCK * dim)
            .enumerate()
            .flat_map_iter(|(block, values)| {
                let mut buffer = vec![0f32; values.len()];
                values.convert_to_f32_slice(&mut buffer);
                let unit = &unit;
                buffer
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(offset, row)| {
                        let (cluster, similarity) =
                            best_centroid(rows, block * CPU_BLOCK + offset, row, unit);
                        (cluster as u32, similarity)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let assignments = Arc::new(Assignments { key, labels });
        *cache = Some(Arc::clone(&assignments));
        Some(assignments)
    }
}

/// A [`FeatureBank`] uploaded to a burn device once, for repeated queries.
pub struct DeviceBank {
    rows: Arc<Rows>,
    /// `[≤ SEARCH_CHUNK, dim]` unit rows.
    chunks: Vec<Tensor<2>>,
    device: Device,
}

impl std::fmt::Debug for DeviceBank {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeviceBank")
            .field("patches", &self.len())
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl DeviceBank {
    /// Number of patches.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the bank holds no patch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bank lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Exactly [`FeatureBank::nearest`]: the device scores every patch by chunked matrix
    /// products, the patches within the device's error of its k-th best are re-scored on the
    /// host, and the best `k` of those are returned. Should the device fail, the CPU path
    /// answers instead (see [`DeviceBank::try_nearest`] to see the error).
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        self.try_nearest(query, k).unwrap_or_else(|_| {
            unit_vector(query, self.rows.dim)
                .map(|unit| scan_top_k(&self.rows, &unit, k))
                .unwrap_or_default()
        })
    }

    /// [`DeviceBank::nearest`], with device failures (and invalid queries) as errors.
    pub fn try_nearest(&self, query: &[f32], k: usize) -> Result<Vec<Neighbour>, BankError> {
        let dim = self.rows.dim;
        let unit = unit_vector(query, dim).ok_or_else(|| {
            BankError::Query(format!(
                "expected {dim} finite values of non-zero length, got {}",
                query.len()
            ))
        })?;
        let len = self.len();
        if k == 0 || len == 0 {
            return Ok(Vec::new());
        }
        if k >= len {
            // Everything is returned: nothing for the device to narrow down.
            return Ok(scan_top_k(&self.rows, &unit, k));
        }
        let query_tensor =
            Tensor::<2>::from_data(TensorData::new(unit.clone(), [dim, 1]), &self.device);
        // [C, D] x [D, 1] per chunk -> [N, 1], read back once.
        let scores: Vec<Tensor<2>> = self
            .chunks
            .iter()
            .map(|chunk| chunk.clone().matmul(query_tensor.clone()))
            .collect();
        let scores = Tensor::cat(scores, 0)
            .try_into_vec_as::<f32>()
            .map_err(|error| BankError::Device(format!("{error:?}")))?;
        if scores.len() != len || scores.iter().any(|score| !score.is_finite()) {
            return Err(BankError::Device(format!(
                "the device returned {} scores for {len} patches, or a non-finite one",
                scores.len()
            )));
        }
        let mut order = scores.clone();
        let (_, kth, _) = order.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let floor = *kth - 2.0 * DEVICE_TOLERANCE;
        let candidates: Vec<usize> = scores
            .iter()
            .enumerate()
            .filter(|(_, score)| **score >= floor)
            .map(|(index, _)| index)
            .collect();
        Ok(candidates_top_k(&self.rows, &unit, k, &candidates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(images: usize, grid: usize, dim: usize) -> BankInfo {
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
        assert_eq!(bank.patch_at(0, 1.0, 0.5), None);
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
