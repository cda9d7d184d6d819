//! Scoring from stored pixel features on the host, so an epoch's evaluation reuses the
//! features its clustering already computed instead of running the network again.
//!
//! The arithmetic is that of [`super::upsample_logits_argmax`]: logits `<z, mu_k>` at feature
//! resolution, upsampled bilinearly (`align_corners = false`) to the label size, argmax (the
//! first cluster on ties); bilinear resizing is linear, so upsampling the logits equals taking
//! the logits of upsampled features. The features come from the store's f16 rows.

use rayon::prelude::*;

use super::bilateral::{BilateralParams, bilateral_upsample_argmax};
use super::{ConfusionMatrix, EvalError};
use crate::cluster::{Centroids, FeatureStore, MAX_CLUSTERS};
use crate::data::ImageStack;
use crate::linalg::{MatRef, Threads, matmul};
use crate::model::resize::{AxisWindow, bilinear_taps};

/// The labelled pixels of images whose features fill `store` in image order (`grid`
/// rows x columns of features per image), predicted with `centroids` and counted against
/// `labels` (one row-major `label_size` map per image, as [`ConfusionMatrix::add`]). With
/// `guides` (one RGB image of `label_size` per image) the logits are upsampled by
/// [`bilateral_upsample_argmax`] instead of bilinearly.
pub fn confusion_from_store(
    store: &FeatureStore,
    grid: [usize; 2],
    centroids: &Centroids,
    labels: &ImageStack,
    label_size: [usize; 2],
    classes: usize,
    guides: Option<&ImageStack>,
) -> Result<ConfusionMatrix, EvalError> {
    let clusters = centroids.clusters;
    if centroids.dim != store.dim() {
        return Err(EvalError::DimensionMismatch {
            features: store.dim(),
            centroids: centroids.dim,
        });
    }
    if clusters > MAX_CLUSTERS {
        return Err(EvalError::TooManyClusters(clusters));
    }
    let cells = grid[0] * grid[1];
    if clusters == 0 || cells == 0 {
        return Err(EvalError::NothingToUpsample {
            clusters,
            height: grid[0],
            width: grid[1],
        });
    }
    if let Some(guides) = guides
        && (guides.len() != labels.len()
            || guides.record_bytes() != label_size[0] * label_size[1] * 3)
    {
        return Err(EvalError::LengthMismatch {
            predictions: guides.len(),
            labels: labels.len(),
        });
    }
    if store.len() != labels.len() * cells {
        return Err(EvalError::LengthMismatch {
            predictions: store.len() / cells,
            labels: labels.len(),
        });
    }
    let row_taps = bilinear_taps(grid[0], AxisWindow::whole(grid[0]), label_size[0]);
    let col_taps = bilinear_taps(grid[1], AxisWindow::whole(grid[1]), label_size[1]);
    let read_error = |error: crate::data::StackReadError| EvalError::Device(error.to_string());
    // Folded per thread, so memory does not grow with the number of images.
    let empty = || ConfusionMatrix::new(clusters, classes);
    let total = (0..labels.len())
        .into_par_iter()
        .try_fold(empty, |mut total, image| {
            let image_labels = labels.get(image).map_err(read_error)?;
            let mut features = Vec::new();
            store
                .read_into(image * cells..(image + 1) * cells, &mut features)
                .map_err(|error| EvalError::Device(error.to_string()))?;
            // [h*w, D] x [D, K] -> logits [h*w, K]
            let mut logits = vec![0.0; cells * clusters];
            matmul(
                &mut logits,
                MatRef::row_major(&features, cells, centroids.dim),
                MatRef::row_major(&centroids.values, clusters, centroids.dim).transposed(),
                false,
                Threads::Current,
            );
            if let Some(guides) = guides {
                let predictions = bilateral_upsample_argmax(
                    &logits,
                    clusters,
                    grid,
                    &guides.get(image).map_err(read_error)?,
                    label_size,
                    &BilateralParams::default(),
                );
                total.add(&predictions, &image_labels)?;
                return Ok(total);
            }
            // Along x first: [h, W, K].
            let mut wide = vec![0.0f32; grid[0] * label_size[1] * clusters];
            for (row, out_row) in wide.chunks_exact_mut(label_size[1] * clusters).enumerate() {
                let source = &logits[row * grid[1] * clusters..(row + 1) * grid[1] * clusters];
                for (tap, out) in col_taps.iter().zip(out_row.chunks_exact_mut(clusters)) {
                    blend(
                        &source[tap.lower * clusters..][..clusters],
                        &source[tap.upper * clusters..][..clusters],
                        tap.upper_weight,
                        out,
                    );
                }
            }
            // Then along y, with the argmax over K of each output pixel.
            let mut predictions = Vec::with_capacity(label_size[0] * label_size[1]);
            let mut pixel = vec![0.0f32; clusters];
            let row_len = label_size[1] * clusters;
            for tap in &row_taps {
                let lower = &wide[tap.lower * row_len..][..row_len];
                let upper = &wide[tap.upper * row_len..][..row_len];
                for (lower, upper) in lower
                    .chunks_exact(clusters)
                    .zip(upper.chunks_exact(clusters))
                {
                    blend(lower, upper, tap.upper_weight, &mut pixel);
                    predictions.push(argmax(&pixel));
                }
            }
            total.add(&predictions, &image_labels)?;
            Ok(total)
        })
        .try_reduce(empty, |mut total, other| {
            total.merge(&other)?;
            Ok(total)
        })?;
    Ok(total)
}

/// `out = (1 - weight) * lower + weight * upper`.
fn blend(lower: &[f32], upper: &[f32], weight: f32, out: &mut [f32]) {
    for ((out, &a), &b) in out.iter_mut().zip(lower).zip(upper) {
        *out = (1.0 - weight) * a + weight * b;
    }
}

/// The index of the largest value (the first one on ties).
pub(super) fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (index, &value) in values.iter().enumerate().skip(1) {
        if value > values[best] {
            best = index;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::eval::upsample_logits_argmax;

    #[test]
    fn stored_scoring_predicts_what_the_device_path_predicts() {
        let device = Device::flex();
        let (batch, dim, height, width, clusters) = (3, 8, 5, 6, 4);
        // Multiples of 1/64 are exact in f16, so the store holds the very same features.
        let value = |i: usize| ((i * 37 + 11) % 129) as f32 / 64.0 - 1.0;
        let features: Vec<f32> = (0..batch * dim * height * width).map(value).collect();
        let centroid_values: Vec<f32> = (0..clusters * dim).map(|i| value(i * 5 + 3)).collect();
        let features = Tensor::<4>::from_data(
            TensorData::new(features, [batch, dim, height, width]),
            &device,
        );
        let mu = Tensor::<2>::from_data(
            TensorData::new(centroid_values.clone(), [clusters, dim]),
            &device,
        );
        let label_size = [11, 13];
        let expected = upsample_logits_argmax(features.clone(), mu, label_size).expect("labels");
        // Labels equal to the device path's predictions: the stored scoring must put every
        // pixel on the diagonal.
        let labels: Vec<Vec<u8>> = expected
            .iter()
            .map(|image| image.iter().map(|label| label as u8).collect())
            .collect();
        let mut store = FeatureStore::in_memory(dim).expect("store");
        store.push_feature_maps(features).expect("push");
        let centroids = Centroids {
            values: centroid_values,
            clusters,
            dim,
        };
        let confusion = confusion_from_store(
            &store,
            [height, width],
            &centroids,
            &ImageStack::from_records(label_size[0] * label_size[1], labels),
            label_size,
            clusters,
            None,
        )
        .expect("confusion");
        let diagonal: u64 = (0..clusters).map(|k| confusion.get(k, k)).sum();
        assert_eq!(diagonal, confusion.total());
        assert_eq!(
            confusion.total(),
            (batch * label_size[0] * label_size[1]) as u64
        );
    }
}
