//! The dataset as training needs it: base images for the views, and the un-augmented
//! evaluation inputs (with labels when there are any), decoded once, in memory or in cache
//! files ([`DecodedStorage`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::decode::load_entry;
use super::stack::{ImageStack, StackReadError, StackTarget, StackWriter};
use super::{BaseTransform, DatasetError, IGNORE_LABEL, ImageFolder, LoadedDataset, SkippedFile};

/// Decoded images up to this many bytes stay in memory under [`DecodedStorage::Auto`]; larger
/// datasets go to cache files. (CamVid at the default sizes is about 0.35 GB.)
pub const DEFAULT_DECODED_MEMORY_BUDGET: u64 = 1 << 30;

/// Where a dataset's decoded images are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedStorage {
    /// In memory, whatever their size.
    Memory,
    /// In cache files in this folder, read back as they are needed.
    Disk(PathBuf),
    /// In memory when they take at most `memory_budget_bytes`, else in cache files in
    /// `folder`.
    Auto {
        /// The folder for cache files.
        folder: PathBuf,
        /// The most bytes kept in memory.
        memory_budget_bytes: u64,
    },
}

impl DecodedStorage {
    /// [`DecodedStorage::Auto`] with [`DEFAULT_DECODED_MEMORY_BUDGET`].
    pub fn auto(folder: impl Into<PathBuf>) -> Self {
        Self::Auto {
            folder: folder.into(),
            memory_budget_bytes: DEFAULT_DECODED_MEMORY_BUDGET,
        }
    }

    /// The cache folder for a dataset of `bytes` decoded bytes, or `None` for memory.
    fn folder_for(&self, bytes: u64) -> Option<&Path> {
        match self {
            Self::Memory => None,
            Self::Disk(folder) => Some(folder),
            Self::Auto {
                folder,
                memory_budget_bytes,
            } => (bytes > *memory_budget_bytes).then_some(folder.as_path()),
        }
    }
}

/// Images decoded at the base size, and their evaluation-size copies.
#[derive(Debug, Clone)]
pub struct TrainingData {
    /// Display names (relative paths), in dataset order.
    pub names: Vec<String>,
    /// Original sizes (width, height).
    pub original_sizes: Vec<(u32, u32)>,
    /// Side of the base images.
    pub base_size: u32,
    /// RGB HWC base images, `base_size`² each.
    pub bases: ImageStack,
    /// Side of the evaluation inputs (the training input size).
    pub eval_size: u32,
    /// RGB HWC evaluation inputs: each original reduced straight to `eval_size` (as `picie
    /// eval` and the reference decode them), not resized from the base image.
    pub eval_images: ImageStack,
    /// Labels reduced straight to `eval_size` by [`BaseTransform::apply_label`], when every
    /// image has one: one label path for every evaluation.
    pub eval_labels: Option<ImageStack>,
    /// The largest class index in `eval_labels` ([`IGNORE_LABEL`] aside).
    largest_label: Option<u8>,
    /// Class names from `classes.txt`.
    pub class_names: Option<Vec<String>>,
    /// Files that could not be read, with the reason.
    pub skipped: Vec<SkippedFile>,
}

/// Names of the cache files in a [`DecodedStorage`] folder.
const BASES_FILE: &str = "bases.bin";
const EVAL_IMAGES_FILE: &str = "eval-images.bin";
const EVAL_LABELS_FILE: &str = "eval-labels.bin";

impl TrainingData {
    /// Scans and decodes a dataset into memory. `progress(done, total)` is called while
    /// decoding.
    pub fn load(
        images: &Path,
        labels: Option<&Path>,
        base_size: u32,
        eval_size: u32,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self, DatasetError> {
        Self::load_into(
            images,
            labels,
            base_size,
            eval_size,
            &DecodedStorage::Memory,
            progress,
        )
    }

    /// Scans and decodes a dataset into `storage`, in parallel, each image written where it
    /// goes as soon as it is decoded, so only the images being decoded are in memory at once.
    /// `progress(done, total)` is called while decoding.
    pub fn load_into(
        images: &Path,
        labels: Option<&Path>,
        base_size: u32,
        eval_size: u32,
        storage: &DecodedStorage,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self, DatasetError> {
        let folder = ImageFolder::scan(images, labels)?;
        let unlabelled = folder.unlabelled();
        if let Some(labels) = labels
            && !unlabelled.is_empty()
        {
            let mut examples = unlabelled
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if unlabelled.len() > 3 {
                examples.push_str(", …");
            }
            return Err(DatasetError::MissingLabels {
                labels: labels.to_owned(),
                missing: unlabelled.len(),
                total: folder.len(),
                examples,
            });
        }
        let count = folder.len();
        let (base, eval) = (base_size as usize, eval_size as usize);
        let labelled = labels.is_some();
        let record_sizes = [
            3 * base * base,
            3 * eval * eval,
            if labelled { eval * eval } else { 0 },
        ];
        let bytes = record_sizes.iter().sum::<usize>() as u64 * count as u64;
        let cache = storage.folder_for(bytes);
        if cache.is_none()
            && let DecodedStorage::Auto { folder, .. } = storage
        {
            // Left by a run that was killed: its pixels are not needed by this one.
            for name in [BASES_FILE, EVAL_IMAGES_FILE, EVAL_LABELS_FILE] {
                let _ = std::fs::remove_file(folder.join(name));
            }
            let _ = std::fs::remove_dir(folder);
        }
        let target = |name: &str| match cache {
            Some(folder) => StackTarget::File(folder.join(name)),
            None => StackTarget::Memory,
        };
        let writer = |name: &str, record_bytes: usize| {
            let target = target(name);
            StackWriter::new(&target, record_bytes, count).map_err(|source| DatasetError::Write {
                path: match target {
                    StackTarget::File(path) => path,
                    StackTarget::Memory => images.to_owned(),
                },
                source,
            })
        };
        let bases = writer(BASES_FILE, record_sizes[0])?;
        let eval_images = writer(EVAL_IMAGES_FILE, record_sizes[1])?;
        let eval_labels = labelled
            .then(|| writer(EVAL_LABELS_FILE, record_sizes[2]))
            .transpose()?;
        let write_error = |name: &str| {
            let path = match target(name) {
                StackTarget::File(path) => path,
                StackTarget::Memory => images.to_owned(),
            };
            move |source| DatasetError::Write { path, source }
        };

        let base_transform = BaseTransform::new(base_size);
        let eval_transform = BaseTransform::new(eval_size);
        let class_count = folder.class_names().map(<[String]>::len);
        let largest_label = AtomicU8::new(0);
        let any_label = std::sync::atomic::AtomicBool::new(false);
        let done = AtomicUsize::new(0);
        // Per image: its size when it was decoded and written, or why it was skipped.
        let outcomes = folder
            .entries()
            .par_iter()
            .enumerate()
            .map(|(slot, entry)| {
                let loaded = load_entry(entry, &base_transform, Some(&eval_transform), class_count);
                let outcome = match loaded {
                    Ok(image) => {
                        bases
                            .write(slot, &image.rgb)
                            .map_err(write_error(BASES_FILE))?;
                        let eval_rgb = image.eval_rgb.as_deref().expect("asked for eval copies");
                        eval_images
                            .write(slot, eval_rgb)
                            .map_err(write_error(EVAL_IMAGES_FILE))?;
                        if let (Some(writer), Some(label)) = (&eval_labels, &image.eval_label) {
                            writer
                                .write(slot, label)
                                .map_err(write_error(EVAL_LABELS_FILE))?;
                            if let Some(&largest) =
                                label.iter().filter(|&&value| value != IGNORE_LABEL).max()
                            {
                                largest_label.fetch_max(largest, Ordering::Relaxed);
                                any_label.store(true, Ordering::Relaxed);
                            }
                        }
                        Ok(image.original_size)
                    }
                    Err(error) => Err(SkippedFile {
                        path: entry.path.clone(),
                        name: entry.name.clone(),
                        reason: error.to_string(),
                    }),
                };
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, count);
                Ok(outcome)
            })
            .collect::<Result<Vec<_>, DatasetError>>();
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                bases.discard();
                eval_images.discard();
                if let Some(writer) = eval_labels {
                    writer.discard();
                }
                return Err(error);
            }
        };

        let mut kept = Vec::with_capacity(count);
        let mut names = Vec::with_capacity(count);
        let mut original_sizes = Vec::with_capacity(count);
        let mut skipped = Vec::new();
        for (slot, (outcome, entry)) in outcomes.into_iter().zip(folder.entries()).enumerate() {
            match outcome {
                Ok(size) => {
                    kept.push(slot);
                    names.push(entry.name.clone());
                    original_sizes.push(size);
                }
                Err(skip) => skipped.push(skip),
            }
        }
        if kept.is_empty() {
            bases.discard();
            eval_images.discard();
            if let Some(writer) = eval_labels {
                writer.discard();
            }
            return Err(DatasetError::NothingLoaded {
                path: folder.root().to_owned(),
                count: skipped.len(),
                first_reason: skipped
                    .first()
                    .map(|skip| skip.reason.clone())
                    .unwrap_or_else(|| "the folder lists no images".to_owned()),
            });
        }
        let bases = bases.finish(&kept).map_err(write_error(BASES_FILE))?;
        let eval_images = eval_images
            .finish(&kept)
            .map_err(write_error(EVAL_IMAGES_FILE))?;
        let eval_labels = eval_labels
            .map(|writer| writer.finish(&kept))
            .transpose()
            .map_err(write_error(EVAL_LABELS_FILE))?;
        Ok(Self {
            names,
            original_sizes,
            base_size,
            bases,
            eval_size,
            eval_images,
            eval_labels,
            largest_label: any_label.into_inner().then(|| largest_label.into_inner()),
            class_names: folder.class_names().map(<[String]>::to_vec),
            skipped,
        })
    }

    /// Builds the training data in memory from decoded images. Evaluation copies the loader
    /// kept ([`super::ImageFolder::load_with_eval`]) are used as they are; images without one
    /// are resized from the base image.
    pub fn from_loaded(
        loaded: LoadedDataset,
        class_names: Option<Vec<String>>,
        eval_size: u32,
    ) -> Self {
        let base_size = loaded.size;
        let resize_rgb = |rgb: &[u8]| -> Vec<u8> {
            if eval_size == base_size {
                return rgb.to_vec();
            }
            let image = image::RgbImage::from_raw(base_size, base_size, rgb.to_vec())
                .expect("base images have base_size² pixels");
            image::imageops::resize(&image, eval_size, eval_size, FilterType::Triangle).into_raw()
        };
        let resize_label = |label: &[u8]| -> Vec<u8> {
            if eval_size == base_size {
                return label.to_vec();
            }
            let image = image::GrayImage::from_raw(base_size, base_size, label.to_vec())
                .expect("labels have base_size² pixels");
            image::imageops::resize(&image, eval_size, eval_size, FilterType::Nearest).into_raw()
        };
        let mut loaded = loaded;
        let (base, eval) = (base_size as usize, eval_size as usize);
        let eval_images = loaded
            .images
            .iter_mut()
            .map(|image| {
                image
                    .eval_rgb
                    .take()
                    .unwrap_or_else(|| resize_rgb(&image.rgb))
            })
            .collect();
        // Scores need a label for every image; a partly labelled set is trained but not scored.
        let eval_labels = loaded
            .images
            .iter_mut()
            .map(|image| {
                let label = image.label.as_deref()?;
                Some(
                    image
                        .eval_label
                        .take()
                        .unwrap_or_else(|| resize_label(label)),
                )
            })
            .collect::<Option<Vec<_>>>();
        let largest_label = eval_labels.as_deref().and_then(largest_in);
        Self {
            names: loaded
                .images
                .iter()
                .map(|image| image.name.clone())
                .collect(),
            original_sizes: loaded
                .images
                .iter()
                .map(|image| image.original_size)
                .collect(),
            base_size,
            bases: ImageStack::from_records(
                3 * base * base,
                loaded.images.into_iter().map(|image| image.rgb).collect(),
            ),
            eval_size,
            eval_images: ImageStack::from_records(3 * eval * eval, eval_images),
            eval_labels: eval_labels.map(|labels| ImageStack::from_records(eval * eval, labels)),
            largest_label,
            class_names,
            skipped: loaded.skipped,
        }
    }

    /// Splits off the images whose relative path starts with `prefix`: `(the rest, those)`,
    /// for training on one part and scoring on the other. An error says when the prefix
    /// matches no image or every image.
    pub fn split_held_out(&self, prefix: &str) -> Result<(Self, Self), String> {
        let (held, kept): (Vec<usize>, Vec<usize>) =
            (0..self.len()).partition(|&index| self.names[index].starts_with(prefix));
        if held.is_empty() {
            return Err(format!(
                "no image name starts with the held-out prefix '{prefix}' (the first is '{}'): \
                 check the prefix, or leave it out to train on every image",
                self.names.first().map_or("", String::as_str)
            ));
        }
        if kept.is_empty() {
            return Err(format!(
                "every image name starts with the held-out prefix '{prefix}', so none would be \
                 left to train on: choose a prefix that names only part of the images"
            ));
        }
        let subset = |indices: &[usize]| self.subset(indices).map_err(|error| error.to_string());
        Ok((subset(&kept)?, subset(&held)?))
    }

    /// The images at `indices`, in that order, sharing this data's storage.
    fn subset(&self, indices: &[usize]) -> Result<Self, StackReadError> {
        let eval_labels = self
            .eval_labels
            .as_ref()
            .map(|labels| labels.subset(indices));
        // The subset's own classes, as if it had been loaded alone.
        let largest_label = match &eval_labels {
            Some(labels) => largest_in(&labels.to_records()?),
            None => None,
        };
        Ok(Self {
            names: indices.iter().map(|&i| self.names[i].clone()).collect(),
            original_sizes: indices.iter().map(|&i| self.original_sizes[i]).collect(),
            base_size: self.base_size,
            bases: self.bases.subset(indices),
            eval_size: self.eval_size,
            eval_images: self.eval_images.subset(indices),
            eval_labels,
            largest_label,
            class_names: self.class_names.clone(),
            skipped: Vec::new(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.bases.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty()
    }

    /// Number of label classes, when labelled.
    pub fn classes(&self) -> Option<usize> {
        self.eval_labels.as_ref()?;
        if let Some(names) = &self.class_names {
            return Some(names.len());
        }
        self.largest_label.map(|largest| usize::from(largest) + 1)
    }

    /// The cache file of the base images, when they are on disk rather than in memory.
    pub fn cache_file(&self) -> Option<&Path> {
        self.bases.cache_file()
    }
}

/// The largest class index in `labels`, [`IGNORE_LABEL`] aside.
fn largest_in(labels: &[Vec<u8>]) -> Option<u8> {
    labels
        .iter()
        .flat_map(|label| label.iter().copied().filter(|&value| value != IGNORE_LABEL))
        .max()
}
