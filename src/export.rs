//! Exporting segmentations with the user's label map, and scoring exactly what is exported
//! (with [`crate::eval::masks`], which also scores exported mask folders).
//!
//! Every image is segmented at its original resolution ([`Segmenter::segment`] upsamples the
//! logits before the argmax), its cluster ids are mapped through the run's [`LabelMap`]
//! (a merged cluster takes its root's id, an ignored one [`IGNORE_INDEX`]) and written as
//!
//! ```text
//! OUT/index/<name>.png     8-bit index mask: root cluster id per pixel, 255 = ignored
//! OUT/colour/<name>.png    RGB: the label map's colour per pixel, ignored pixels black
//! OUT/overlay/<name>.png   the image blended 50/50 with the colour mask (ignored: the image)
//! OUT/legend.json          id, name, colour, pixel share and member clusters of every id
//! OUT/labelmap.txt         the label map of the colour masks in CVAT "Segmentation mask 1.1"
//! ```
//!
//! `<name>` is the image's path relative to the image folder with `.png` for its extension
//! (see [`mask_paths`]), so the index folder can be given wherever a label folder is expected.
//! Every file is encoded in memory and written atomically (a temporary name, then a rename),
//! so an interrupted export never leaves a partial file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use image::{GrayImage, RgbImage};

use crate::config::TrainConfig;
use crate::data::{DatasetError, ImageFolder, load_label, load_one};
use crate::device::{ComputeDevice, DeviceError};
use crate::eval::Evaluation;
pub use crate::eval::masks::mask_paths;
use crate::eval::masks::{MaskScores, ScoreError, check_label_values, labelled_entries};
use crate::labelmap::{IGNORE_INDEX, LabelMap, LegendEntry};
use crate::model::FEATURE_DIM;
use crate::run::{RunError, RunFolder};
use crate::segment::{Segmenter, encode_png};

/// Sub-folder of the index masks.
pub const INDEX_DIR: &str = "index";
/// Sub-folder of the colour masks.
pub const COLOUR_DIR: &str = "colour";
/// Sub-folder of the overlays.
pub const OVERLAY_DIR: &str = "overlay";
/// The legend of an export.
pub const LEGEND_FILE: &str = "legend.json";
/// The CVAT label map of an export.
pub const CVAT_LABELMAP_FILE: &str = "labelmap.txt";

/// Values an 8-bit index mask can hold: 0..=254 are ids, 255 is "ignored".
const MASK_VALUES: usize = 256;

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// 8-bit index masks in `index/`.
    pub index: bool,
    /// RGB colour masks in `colour/`.
    pub colour: bool,
    /// The images blended with their colour masks in `overlay/`.
    pub overlay: bool,
    /// `labelmap.txt` for CVAT's "Segmentation mask 1.1" import (of the colour masks).
    pub cvat: bool,
    /// Only these images (names relative to the image folder, as [`ImageEntry::name`]);
    /// `None` exports all of them.
    pub only: Option<Vec<String>>,
}

impl Default for ExportOptions {
    /// Everything, for every image.
    fn default() -> Self {
        Self {
            index: true,
            colour: true,
            overlay: true,
            cvat: true,
            only: None,
        }
    }
}

/// How far an export has got; reported before each image and once at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportProgress {
    /// Images finished (written or failed).
    pub done: usize,
    /// Images selected.
    pub total: usize,
    /// The image being exported now (empty in the final report).
    pub current: String,
}

/// What an export did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// Images whose files were all written.
    pub written: usize,
    /// `(image name, reason)` of every image that could not be exported (unreadable, corrupt,
    /// or not in the folder); the others were still written.
    pub failed: Vec<(String, String)>,
    /// The legend written to `legend.json`: pixel shares over the written images.
    pub legend: Vec<LegendEntry>,
    /// The export was cancelled before every image was done. Every image that was started
    /// has all its files; the legend describes those images.
    pub cancelled: bool,
}

/// Errors of exporting and scoring; each names the file or folder at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The run folder could not be read.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The device could not be selected.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// An image folder, image or label problem.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The run has no centroids to segment with.
    #[error(
        "run {} has no segmentation.json (the centroids used to segment, written when \
         training ends); finish the run, or continue it with `picie train --resume`",
        .0.display()
    )]
    NoSegmentation(PathBuf),
    /// The centroids file does not fit the network.
    #[error("{}: {reason}", .path.display())]
    BadCentroids {
        /// `segmentation.json`.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An output file or folder could not be written.
    #[error(
        "cannot write {}: {error}. Choose an output folder you can write to and check that \
         the disk is not full",
        .path.display()
    )]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// Scoring failed (no labels, a missing or wrong mask...).
    #[error(transparent)]
    Score(#[from] ScoreError),
}

/// Loads the network of a run's latest checkpoint and the centroids of its un-augmented images
/// (`segmentation.json`) onto `compute`. Returns the run's configuration too.
pub fn segmenter_for_run(
    run_dir: &Path,
    compute: &ComputeDevice,
) -> Result<(Segmenter, TrainConfig), ExportError> {
    let run = RunFolder::open(run_dir)?;
    let config = run.config()?;
    let path = run.segmentation_path();
    if !path.is_file() {
        return Err(ExportError::NoSegmentation(run_dir.to_owned()));
    }
    let centroids = run.segmentation()?;
    if centroids.dim != FEATURE_DIM
        || centroids.clusters == 0
        || centroids.centroids.len() != centroids.clusters * FEATURE_DIM
    {
        return Err(ExportError::BadCentroids {
            path,
            reason: format!(
                "expected {} x {FEATURE_DIM} centroid values, found {} of dimension {}; the \
                 file is damaged: continue the run with `picie train --resume` to rewrite it",
                centroids.clusters,
                centroids.centroids.len(),
                centroids.dim
            ),
        });
    }
    // A damaged latest checkpoint falls back to the previous one; the centroid check below
    // then says the centroids belong to another epoch.
    let (network, epoch, _) = run.latest_network(&compute.device)?;
    // Centroids of another epoch's network would give meaningless clusters.
    if centroids.epoch != epoch {
        return Err(ExportError::BadCentroids {
            path,
            reason: format!(
                "the centroids are of epoch {} but the latest checkpoint is epoch {epoch} (the \
                 run was interrupted); continue it with `picie train --resume` to recompute them",
                centroids.epoch
            ),
        });
    }
    let segmenter = Segmenter::new(
        network,
        centroids.centroids,
        config.input_size,
        compute.device.clone(),
    )
    .with_inference(config.test_time_flip, config.upsampling);
    Ok((segmenter, config))
}

/// The index mask export writes for an image: cluster per pixel mapped through `ids`.
fn output_mask(segmenter: &Segmenter, image: &RgbImage, ids: &[u8]) -> GrayImage {
    let segmentation = segmenter.segment(image);
    let pixels = segmentation
        .labels
        .iter()
        .map(|&cluster| {
            ids.get(usize::from(cluster))
                .copied()
                .unwrap_or(IGNORE_INDEX)
        })
        .collect();
    GrayImage::from_raw(segmentation.width, segmentation.height, pixels)
        .unwrap_or_else(|| GrayImage::new(segmentation.width, segmentation.height))
}

/// The colour of every mask value (looked up once, not per pixel); ignored is black.
fn colour_table(labelmap: &LabelMap) -> Vec<[u8; 3]> {
    (0..MASK_VALUES)
        .map(|id| {
            if id == usize::from(IGNORE_INDEX) {
                [0, 0, 0]
            } else {
                labelmap.colour(id)
            }
        })
        .collect()
}

/// The encoded PNGs of one image, with the sub-folder each goes to.
fn encode_outputs(
    image: &RgbImage,
    mask: &GrayImage,
    colours: &[[u8; 3]],
    options: &ExportOptions,
) -> Result<Vec<(&'static str, Vec<u8>)>, image::ImageError> {
    let (width, height) = mask.dimensions();
    let colour_pixels = || -> Vec<u8> {
        mask.as_raw()
            .iter()
            .flat_map(|&id| colours[usize::from(id)])
            .collect()
    };
    let overlay_pixels = || -> Vec<u8> {
        let mut pixels = image.as_raw().clone();
        for (pixel, &id) in pixels.chunks_exact_mut(3).zip(mask.as_raw()) {
            if id != IGNORE_INDEX {
                for (value, &colour) in pixel.iter_mut().zip(&colours[usize::from(id)]) {
                    *value = (u16::from(*value) + u16::from(colour)).div_ceil(2) as u8;
                }
            }
        }
        pixels
    };
    let rgb = image::ExtendedColorType::Rgb8;
    // The three encodings are independent and PNG compression is single-threaded.
    let (index, (colour, overlay)) = rayon::join(
        || {
            options
                .index
                .then(|| encode_png(mask.as_raw(), width, height, image::ExtendedColorType::L8))
                .transpose()
        },
        || {
            rayon::join(
                || {
                    options
                        .colour
                        .then(|| encode_png(&colour_pixels(), width, height, rgb))
                        .transpose()
                },
                || {
                    options
                        .overlay
                        .then(|| encode_png(&overlay_pixels(), width, height, rgb))
                        .transpose()
                },
            )
        },
    );
    let mut files = Vec::new();
    for (folder, bytes) in [
        (INDEX_DIR, index?),
        (COLOUR_DIR, colour?),
        (OVERLAY_DIR, overlay?),
    ] {
        if let Some(bytes) = bytes {
            files.push((folder, bytes));
        }
    }
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    crate::fsutil::write_bytes_atomic(path, bytes).map_err(|error| ExportError::Write {
        path: path.to_owned(),
        error,
    })
}

/// Segments the selected images of `folder` at their original resolution and writes the
/// files `options` asks for under `out` (see the module documentation), then `legend.json`
/// (pixel shares over the written images) and, with `options.cvat`, `labelmap.txt`; both
/// only when at least one image was written.
///
/// An image that cannot be read or encoded is listed in [`ExportReport::failed`] and the
/// others are still exported. `cancel` is checked before each image: once it is set the
/// export stops, and since every file is written atomically and an image is never left half
/// done, nothing partial remains. `progress` is called before each image and at the end.
/// Errors are about the output (it cannot be created or written) and name the path.
///
/// Clusters with an id above 254 cannot be told apart in 8-bit masks and are written as
/// ignored ([`LabelMap::output_ids`]).
pub fn export_segmentations(
    segmenter: &Segmenter,
    folder: &ImageFolder,
    labelmap: &LabelMap,
    out: &Path,
    options: &ExportOptions,
    progress: &mut dyn FnMut(&ExportProgress),
    cancel: &AtomicBool,
) -> Result<ExportReport, ExportError> {
    std::fs::create_dir_all(out).map_err(|error| ExportError::Write {
        path: out.to_owned(),
        error,
    })?;
    let clusters = segmenter.clusters();
    let ids = labelmap.output_ids(clusters);
    let colours = colour_table(labelmap);
    let entries = folder.entries();
    let paths = mask_paths(entries);

    let mut failed = Vec::new();
    let selected: Vec<usize> = match &options.only {
        None => (0..entries.len()).collect(),
        Some(names) => {
            let index_of: HashMap<&str, usize> = entries
                .iter()
                .enumerate()
                .map(|(index, entry)| (entry.name.as_str(), index))
                .collect();
            let mut selected = Vec::new();
            let mut seen = HashSet::new();
            for name in names {
                match index_of.get(name.as_str()) {
                    Some(&index) => {
                        if seen.insert(index) {
                            selected.push(index);
                        }
                    }
                    None => failed.push((
                        name.clone(),
                        format!("not an image of {}", folder.root().display()),
                    )),
                }
            }
            selected
        }
    };

    let total = selected.len();
    let mut counts = vec![0u64; MASK_VALUES];
    let mut written = 0;
    let mut done = 0;
    let mut cancelled = false;
    for &index in &selected {
        let entry = &entries[index];
        progress(&ExportProgress {
            done,
            total,
            current: entry.name.clone(),
        });
        if cancel.load(Ordering::SeqCst) {
            cancelled = true;
            break;
        }
        done += 1;
        let image = match load_one(&entry.path) {
            Ok(image) => image,
            Err(error) => {
                failed.push((entry.name.clone(), error.to_string()));
                continue;
            }
        };
        let mask = output_mask(segmenter, &image, &ids);
        let files = match encode_outputs(&image, &mask, &colours, options) {
            Ok(files) => files,
            Err(error) => {
                failed.push((entry.name.clone(), format!("cannot encode PNG: {error}")));
                continue;
            }
        };
        for (folder, bytes) in files {
            write_file(&out.join(folder).join(&paths[index]), &bytes)?;
        }
        for &id in mask.as_raw() {
            counts[usize::from(id)] += 1;
        }
        written += 1;
    }
    progress(&ExportProgress {
        done,
        total,
        current: String::new(),
    });

    let legend = labelmap.legend(clusters, &counts);
    if written > 0 {
        let json = serde_json::to_string_pretty(&legend).map_err(|error| ExportError::Write {
            path: out.join(LEGEND_FILE),
            error: std::io::Error::other(error),
        })?;
        write_file(&out.join(LEGEND_FILE), json.as_bytes())?;
        if options.cvat {
            let ignored = counts[usize::from(IGNORE_INDEX)] > 0;
            write_file(
                &out.join(CVAT_LABELMAP_FILE),
                cvat_labelmap(&legend, ignored).as_bytes(),
            )?;
        }
    }
    Ok(ExportReport {
        written,
        failed,
        legend,
        cancelled,
    })
}

/// `labelmap.txt` of CVAT's "Segmentation mask 1.1" format: a header and one
/// `name:r,g,b::` line per legend entry, `background:0,0,0::` first when some pixels are
/// ignored (they are black in the colour masks). CVAT tells labels apart by name, and `:`
/// separates fields, so `:` in names becomes `-` and repeated names get their id appended.
pub fn cvat_labelmap(legend: &[LegendEntry], with_background: bool) -> String {
    let mut text = String::from("# label:color_rgb:parts:actions\n");
    let mut used = HashSet::new();
    if with_background {
        text.push_str("background:0,0,0::\n");
        used.insert("background".to_owned());
    }
    for entry in legend {
        let clean: String = entry
            .name
            .chars()
            .map(|c| if c == ':' || c.is_control() { '-' } else { c })
            .collect();
        let clean = clean.trim().to_owned();
        let name = if used.contains(&clean.to_lowercase()) {
            format!("{clean} ({})", entry.id)
        } else {
            clean
        };
        used.insert(name.to_lowercase());
        let [r, g, b] = entry.colour;
        text.push_str(&format!("{name}:{r},{g},{b}::\n"));
    }
    text
}

/// Pixel accuracy and mIoU of exactly the index masks [`export_segmentations`] writes for the
/// labelled images of `folder` (the same pixels, computed in memory), after Hungarian matching
/// of mask values to classes as `picie eval` does. Unlabelled pixels (255) are not scored;
/// pixels of ignored clusters (mask value 255) are never matched to a class, so where they
/// cover labelled pixels they count as wrong: ignoring a cluster cannot raise the score by
/// hiding its mistakes. Images that cannot be read are skipped, as export skips them; a bad
/// label file is an error naming it.
///
/// [`Evaluation::assignment`] and the confusion matrix have one row per mask value (0..=255).
pub fn score_segmentation(
    segmenter: &Segmenter,
    folder: &ImageFolder,
    labelmap: &LabelMap,
) -> Result<Evaluation, ExportError> {
    let ids = labelmap.output_ids(segmenter.clusters());
    let classes = folder.class_names().map(<[String]>::len);
    let mut pairs = MaskScores::new();
    for (entry, _) in labelled_entries(folder)? {
        let Some(label_path) = &entry.label else {
            continue;
        };
        let Ok(image) = load_one(&entry.path) else {
            continue;
        };
        let mask = output_mask(segmenter, &image, &ids);
        let label = load_label(label_path)?;
        if label.dimensions() != mask.dimensions() {
            return Err(DatasetError::LabelSizeMismatch {
                label: label_path.clone(),
                label_size: label.dimensions(),
                image: entry.path.clone(),
                image_size: mask.dimensions(),
            }
            .into());
        }
        check_label_values(&label, label_path, classes)?;
        pairs.add(mask.as_raw(), label.as_raw());
    }
    Ok(pairs.evaluate(folder)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvat_labelmap_has_background_only_when_asked_and_unique_names() {
        let entry = |id: usize, name: &str| LegendEntry {
            id,
            name: name.to_owned(),
            colour: [id as u8, 2, 3],
            pixel_share: 0.5,
            clusters: vec![id],
        };
        let legend = [entry(0, "road"), entry(4, "a:b"), entry(5, "road")];
        assert_eq!(
            cvat_labelmap(&legend, true),
            "# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:0,2,3::\na-b:4,2,3::\n\
             road (5):5,2,3::\n"
        );
        assert!(!cvat_labelmap(&legend, false).contains("background"));
    }
}
