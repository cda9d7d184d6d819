//! Computing a feature bank: patch features of a run's network over its images.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{BankError, BankInfo, FeatureBank, unit_vector};
use crate::data::{DecodedStorage, TrainingData};
use crate::model::{FEATURE_STRIDE, PicieNet, images_to_tensor};

/// Checks a bank patch side against the input side.
pub fn check_patch(patch: usize, input_size: u32) -> Result<(), BankError> {
    if patch == 0
        || !patch.is_multiple_of(FEATURE_STRIDE)
        || !(input_size as usize).is_multiple_of(patch)
    {
        return Err(BankError::Patch { patch, input_size });
    }
    Ok(())
}

/// Builds the bank of `data` (its un-augmented `eval_images` at the input size) with
/// `network` in eval mode on `device`: each image's unit pixel features averaged over
/// `patch/4 x patch/4` cells and normalised again. `progress(images done, images)`.
pub fn build_bank(
    network: &PicieNet,
    data: &TrainingData,
    patch: usize,
    epoch: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureBank, BankError> {
    let mut builder = BankBuilder::new(data, patch)?;
    let size = data.eval_size as usize;
    // About 16 images of 320² a batch, fewer for larger inputs.
    let batch = (16 * 320 * 320 / (size * size)).clamp(1, 64);
    let mut done = 0;
    progress(0, data.len());
    for indices in (0..data.len()).collect::<Vec<_>>().chunks(batch) {
        let images = data.eval_images.gather(indices)?;
        let images: Vec<&[u8]> = images.iter().map(AsRef::as_ref).collect();
        builder.push(network.forward(images_to_tensor(&images, size, device)))?;
        done += indices.len();
        progress(done, data.len());
    }
    builder.finish(data, epoch)
}

/// Collects a bank batch by batch from the network's features of the un-augmented images,
/// so a caller that already runs the network over them (the trainer's evaluation) does not
/// run it a second time.
#[derive(Debug)]
pub struct BankBuilder {
    patch: usize,
    grid: usize,
    cell: usize,
    feature_side: usize,
    dim: usize,
    values: Vec<f16>,
}

impl BankBuilder {
    /// A builder for the images of `data` with patches of `patch` input pixels.
    pub fn new(data: &TrainingData, patch: usize) -> Result<Self, BankError> {
        check_patch(patch, data.eval_size)?;
        if data.is_empty() || data.eval_images.len() != data.len() {
            return Err(BankError::Empty);
        }
        let size = data.eval_size as usize;
        Ok(Self {
            patch,
            grid: size / patch,
            cell: patch / FEATURE_STRIDE,
            feature_side: size / FEATURE_STRIDE,
            dim: 0,
            values: Vec::new(),
        })
    }

    /// Adds the next images' features `[B, D, h, w]` (the network's output, in image order).
    pub fn push(&mut self, features: Tensor<4>) -> Result<(), BankError> {
        let [count, channels, height, width] = features.dims();
        let (grid, cell) = (self.grid, self.cell);
        if height != self.feature_side || width != self.feature_side {
            return Err(BankError::Device(format!(
                "the network gave {height}x{width} features for a {}-pixel input, expected {}x{}",
                self.feature_side * FEATURE_STRIDE,
                self.feature_side,
                self.feature_side
            )));
        }
        self.dim = channels;
        // [B, D, h, w] -> [B, D, g, c, g, c] -> mean over the c's -> [B, g, g, D]
        let pooled = if cell == 1 {
            features
        } else {
            features
                .reshape([count, channels, grid, cell, grid, cell])
                .mean_dim(5)
                .mean_dim(3)
                .reshape([count, channels, grid, grid])
        };
        let rows = crate::model::permute_axes(pooled, [0, 2, 3, 1])
            .reshape([count * grid * grid, channels])
            .try_into_vec_as::<f32>()
            .map_err(|error| BankError::Device(format!("{error:?}")))?;
        let start = self.values.len();
        self.values.resize(start + rows.len(), f16::ZERO);
        self.values[start..]
            .par_chunks_mut(channels)
            .zip(rows.par_chunks(channels))
            .for_each(|(out, row)| {
                let unit = unit_vector(row, channels).unwrap_or_else(|| vec![0.0; channels]);
                out.convert_from_f32_slice(&unit);
            });
        Ok(())
    }

    /// The bank of `data`'s images, from the features pushed, for `epoch`.
    pub fn finish(self, data: &TrainingData, epoch: usize) -> Result<FeatureBank, BankError> {
        FeatureBank::from_f16(
            BankInfo {
                dim: self.dim,
                patch: self.patch,
                input_size: data.eval_size,
                base_size: data.base_size,
                grid: self.grid,
                epoch,
                names: data.names.clone(),
            },
            self.values,
        )
    }
}

/// Builds and saves the feature bank of a finished run from its latest checkpoint, over the
/// images in `images` (what `picie bank` and the app's "Build the feature bank" do). `patch`
/// overrides the run's `bank_patch`; the network runs on `compute`. `progress(stage, done,
/// total)` reports decoding and feature extraction.
pub fn build_run_bank(
    run_dir: &Path,
    images: &Path,
    patch: Option<usize>,
    compute: &crate::device::ComputeDevice,
    progress: &mut (dyn FnMut(&str, usize, usize) + Send),
) -> Result<BuiltBank, BankError> {
    let run =
        crate::run::RunFolder::open(run_dir).map_err(|e| BankError::Invalid(e.to_string()))?;
    let config = run
        .config()
        .map_err(|e| BankError::Invalid(e.to_string()))?;
    let patch = patch.unwrap_or(config.bank_patch);
    check_patch(patch, config.input_size)?;
    let (network, epoch, _) = run
        .latest_network(&compute.device)
        .map_err(|e| BankError::Invalid(e.to_string()))?;
    let progress = std::sync::Mutex::new(progress);
    let data = TrainingData::load_into(
        images,
        None,
        config.base_size,
        config.input_size,
        &DecodedStorage::auto(crate::run::paths::decoded_for_bank(run_dir)),
        &|done, total| {
            if let Ok(mut progress) = progress.lock() {
                progress("decoding images", done, total);
            }
        },
    )
    .map_err(|e| BankError::Invalid(format!("cannot read the images: {e}")))?;
    let progress = progress
        .into_inner()
        .map_err(|_| BankError::Invalid("progress callback panicked".into()))?;
    let bank = build_bank(
        &network,
        &data,
        patch,
        epoch,
        &compute.device,
        &mut |done, total| progress("feature bank", done, total),
    )?;
    bank.save(run.root())?;
    Ok(BuiltBank {
        bank,
        device: compute.description.clone(),
        skipped: data
            .skipped
            .iter()
            .map(|file| format!("{}: {}", file.path.display(), file.reason))
            .collect(),
    })
}

/// What [`build_run_bank`] made.
pub struct BuiltBank {
    /// The bank (already saved in the run folder).
    pub bank: FeatureBank,
    /// The device it was computed on, in words.
    pub device: String,
    /// Images that could not be read, with the reason.
    pub skipped: Vec<String>,
}
