//! Computing a feature bank: patch features of a run's network over its images.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{
    BankError, BankInfo, FEATURES_FILE, FeatureBank, publish_folder, unit_vector, write_error,
    write_header,
};
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
    push_all(&mut builder, network, data, device, progress)?;
    builder.finish(data, epoch)
}

/// [`build_bank`] written straight into the run folder `run_dir` (as `RUN_DIR/bank/`) as the
/// features are computed, so the bank's size costs no memory.
pub fn write_bank(
    network: &PicieNet,
    data: &TrainingData,
    patch: usize,
    epoch: usize,
    device: &Device,
    run_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), BankError> {
    let mut builder = BankBuilder::streaming(data, patch, run_dir)?;
    push_all(&mut builder, network, data, device, progress)?;
    builder.publish(data, epoch, run_dir)
}

/// Runs `network` over every evaluation image of `data` into `builder`.
fn push_all(
    builder: &mut BankBuilder,
    network: &PicieNet,
    data: &TrainingData,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), BankError> {
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
    Ok(())
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
    /// The rows so far (in memory), or the rows of the last push (streaming).
    values: Vec<f16>,
    stream: Option<BankStream>,
}

/// A bank being written straight into a folder of the run, so its size costs no memory.
#[derive(Debug)]
struct BankStream {
    folder: PathBuf,
    run_dir: PathBuf,
    features: BufWriter<File>,
    rows: usize,
    published: bool,
}

impl Drop for BankStream {
    fn drop(&mut self) {
        // An unpublished bank (an error, a stop) is of no use to anyone.
        if !self.published {
            let _ = fs::remove_dir_all(&self.folder);
        }
    }
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
            stream: None,
        })
    }

    /// A builder that writes the rows into a folder of the run `run_dir` as they come, for
    /// [`BankBuilder::publish`]: memory stays bounded however many patches the bank holds.
    pub fn streaming(data: &TrainingData, patch: usize, run_dir: &Path) -> Result<Self, BankError> {
        let mut builder = Self::new(data, patch)?;
        let folder = crate::run::paths::bank_streaming(run_dir);
        if folder.exists() {
            fs::remove_dir_all(&folder).map_err(write_error(&folder))?;
        }
        fs::create_dir_all(&folder).map_err(write_error(&folder))?;
        let features_path = folder.join(FEATURES_FILE);
        let file = File::create(&features_path).map_err(write_error(&features_path))?;
        builder.stream = Some(BankStream {
            folder,
            run_dir: run_dir.to_owned(),
            features: BufWriter::with_capacity(1 << 20, file),
            rows: 0,
            published: false,
        });
        Ok(builder)
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
        if let Some(stream) = &mut self.stream {
            let path = stream.folder.join(FEATURES_FILE);
            let bytes: Vec<u8> = self
                .values
                .iter()
                .flat_map(|value| value.to_bits().to_le_bytes())
                .collect();
            stream
                .features
                .write_all(&bytes)
                .map_err(write_error(&path))?;
            stream.rows += self.values.len() / channels;
            self.values.clear();
        }
        Ok(())
    }

    /// The bank's description for `data` and `epoch`.
    fn info(&self, data: &TrainingData, epoch: usize) -> BankInfo {
        BankInfo {
            dim: self.dim,
            patch: self.patch,
            input_size: data.eval_size,
            base_size: data.base_size,
            grid: self.grid,
            epoch,
            names: data.names.clone(),
        }
    }

    /// Makes the bank `RUN_DIR/bank/` of the run it was streamed for (or, built in memory,
    /// of `run_dir`), replacing any older one in one rename.
    pub fn publish(
        self,
        data: &TrainingData,
        epoch: usize,
        run_dir: &Path,
    ) -> Result<(), BankError> {
        if self.stream.is_none() {
            return self.finish(data, epoch)?.save(run_dir);
        }
        let info = self.info(data, epoch);
        info.check().map_err(BankError::Invalid)?;
        let mut stream = self.stream.expect("checked above");
        if stream.rows != info.patches() {
            return Err(BankError::Invalid(format!(
                "{} patches written for {} images of {}x{} patches",
                stream.rows,
                info.names.len(),
                info.grid,
                info.grid
            )));
        }
        let features_path = stream.folder.join(FEATURES_FILE);
        stream
            .features
            .flush()
            .and_then(|()| stream.features.get_ref().sync_all())
            .map_err(write_error(&features_path))?;
        write_header(&stream.folder, &info, stream.rows)?;
        publish_folder(&stream.run_dir, &stream.folder)?;
        stream.published = true;
        Ok(())
    }

    /// The bank of `data`'s images, from the features pushed, for `epoch`.
    pub fn finish(mut self, data: &TrainingData, epoch: usize) -> Result<FeatureBank, BankError> {
        if self.stream.is_some() {
            return Err(BankError::Invalid(
                "a bank streamed to the run folder is made by publish, not finish".into(),
            ));
        }
        let info = self.info(data, epoch);
        FeatureBank::from_f16(info, std::mem::take(&mut self.values))
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
