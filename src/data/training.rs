//! The dataset as training needs it: base images for the views, and the un-augmented
//! evaluation inputs (with labels when there are any), decoded once.

use std::path::Path;

use image::imageops::FilterType;

use super::{BaseTransform, DatasetError, ImageFolder, LoadedDataset, SkippedFile};

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
    pub bases: Vec<Vec<u8>>,
    /// Side of the evaluation inputs (the training input size).
    pub eval_size: u32,
    /// RGB HWC evaluation inputs: each original reduced straight to `eval_size` (as `picie
    /// eval` and the reference decode them), not resized from the base image.
    pub eval_images: Vec<Vec<u8>>,
    /// Labels reduced straight to `eval_size` by [`BaseTransform::apply_label`], when every
    /// image has one: one label path for every evaluation.
    pub eval_labels: Option<Vec<Vec<u8>>>,
    /// Class names from `classes.txt`.
    pub class_names: Option<Vec<String>>,
    /// Files that could not be read, with the reason.
    pub skipped: Vec<SkippedFile>,
}

impl TrainingData {
    /// Scans and decodes a dataset. `progress(done, total)` is called while decoding.
    pub fn load(
        images: &Path,
        labels: Option<&Path>,
        base_size: u32,
        eval_size: u32,
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
        let loaded = folder
            .load_with_eval(
                &BaseTransform::new(base_size),
                Some(&BaseTransform::new(eval_size)),
                progress,
            )
            .into_non_empty()?;
        Ok(Self::from_loaded(
            loaded,
            folder.class_names().map(<[String]>::to_vec),
            eval_size,
        ))
    }

    /// Builds the training data from decoded images. Evaluation copies the loader kept
    /// ([`super::ImageFolder::load_with_eval`]) are used as they are; images without one are
    /// resized from the base image.
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
            bases: loaded.images.into_iter().map(|image| image.rgb).collect(),
            eval_size,
            eval_images,
            eval_labels,
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
        Ok((self.subset(&kept), self.subset(&held)))
    }

    /// The images at `indices`, in that order.
    fn subset(&self, indices: &[usize]) -> Self {
        let pick = |values: &[Vec<u8>]| indices.iter().map(|&i| values[i].clone()).collect();
        Self {
            names: indices.iter().map(|&i| self.names[i].clone()).collect(),
            original_sizes: indices.iter().map(|&i| self.original_sizes[i]).collect(),
            base_size: self.base_size,
            bases: pick(&self.bases),
            eval_size: self.eval_size,
            eval_images: pick(&self.eval_images),
            eval_labels: self.eval_labels.as_deref().map(pick),
            class_names: self.class_names.clone(),
            skipped: Vec::new(),
        }
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
        let labels = self.eval_labels.as_ref()?;
        labels
            .iter()
            .flat_map(|label| label.iter().copied().filter(|&value| value != 255))
            .max()
            .map(|max| usize::from(max) + 1)
    }
}
