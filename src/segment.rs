//! Segmenting images at their original resolution with a trained run.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::imageops::FilterType;
use rayon::prelude::*;

use crate::config::Upsampling;
use crate::data::{DatasetError, load_one};
use crate::eval::{BilateralParams, bilateral_upsample_argmax};
use crate::model::{FEATURE_DIM, PicieNet, images_to_tensor_rect};

/// The network and centroids that turn an image into cluster indices.
pub struct Segmenter {
    network: PicieNet,
    /// K x D row-major unit centroids.
    centroids: Vec<f32>,
    clusters: usize,
    /// The shorter side images are resized to before the network sees them.
    input_size: u32,
    device: Device,
    /// Average with the mirror image's features.
    test_time_flip: bool,
    upsampling: Upsampling,
}

/// One segmented image.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// Width in pixels (the original image's).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Cluster index per pixel, row-major.
    pub labels: Vec<u16>,
}

impl Segmenter {
    /// A segmenter from a network (in eval mode) and its K x D centroids.
    pub fn new(network: PicieNet, centroids: Vec<f32>, input_size: u32, device: Device) -> Self {
        let clusters = centroids.len() / FEATURE_DIM;
        Self {
            network,
            centroids,
            clusters,
            input_size,
            device,
            test_time_flip: false,
            upsampling: Upsampling::Bilinear,
        }
    }

    /// With test-time flip (features averaged with the mirror image's) and the given way of
    /// bringing logits to pixel resolution.
    pub fn with_inference(mut self, test_time_flip: bool, upsampling: Upsampling) -> Self {
        self.test_time_flip = test_time_flip;
        self.upsampling = upsampling;
        self
    }

    /// Number of clusters.
    pub fn clusters(&self) -> usize {
        self.clusters
    }

    /// Segments an RGB image at its own resolution: the network sees it with the shorter side
    /// at the input size (no crop), and the logits `<z, mu>` are brought to every original
    /// pixel (bilinearly, or guided by the image's edges) before the argmax.
    pub fn segment(&self, image: &image::RgbImage) -> Segmentation {
        let (width, height) = image.dimensions();
        let scale = self.input_size as f64 / f64::from(width.min(height));
        let input_width = ((f64::from(width) * scale).round() as u32).max(32);
        let input_height = ((f64::from(height) * scale).round() as u32).max(32);
        let resized =
            image::imageops::resize(image, input_width, input_height, FilterType::Triangle);
        let input = images_to_tensor_rect(
            &[resized.as_raw()],
            input_width as usize,
            input_height as usize,
            &self.device,
        );
        // [1, D, h, w]
        let features = if self.test_time_flip {
            self.network.forward_flip_averaged(input)
        } else {
            self.network.forward(input)
        };
        let [_, dim, feature_height, feature_width] = features.dims();
        let values = features
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let cells = feature_height * feature_width;
        // Logits per cell: [K, h*w], computed on the CPU from the downloaded features since
        // K x h x w is small; only the final interpolation touches every pixel.
        let mut logits = vec![0f32; self.clusters * cells];
        for k in 0..self.clusters {
            let centroid = &self.centroids[k * dim..(k + 1) * dim];
            for cell in 0..cells {
                let mut sum = 0f32;
                for (d, &weight) in centroid.iter().enumerate() {
                    sum += values[d * cells + cell] * weight;
                }
                logits[k * cells + cell] = sum;
            }
        }
        let labels = match self.upsampling {
            Upsampling::Bilinear => upsample_argmax(
                &logits,
                self.clusters,
                feature_width,
                feature_height,
                width as usize,
                height as usize,
            ),
            Upsampling::Bilateral => {
                // Pixel-major, as the bilateral filter reads one cell's K logits at a time.
                let mut by_cell = vec![0f32; cells * self.clusters];
                for k in 0..self.clusters {
                    for cell in 0..cells {
                        by_cell[cell * self.clusters + k] = logits[k * cells + cell];
                    }
                }
                bilateral_upsample_argmax(
                    &by_cell,
                    self.clusters,
                    [feature_height, feature_width],
                    image.as_raw(),
                    [height as usize, width as usize],
                    &BilateralParams::default(),
                )
            }
        };
        Segmentation {
            width,
            height,
            labels,
        }
    }

    /// Segments the image file at `path`.
    pub fn segment_file(&self, path: &Path) -> Result<Segmentation, DatasetError> {
        Ok(self.segment(&load_one(path)?))
    }
}

/// Bilinear interpolation (align_corners = false) of `[K, h, w]` logits to `out_w x out_h`,
/// then the argmax per pixel. Equal to upsampling the logits and taking the argmax, without
/// ever holding K x H x W values.
pub fn upsample_argmax(
    logits: &[f32],
    clusters: usize,
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
) -> Vec<u16> {
    let cells = width * height;
    let source = |out: usize, size_in: usize, size_out: usize| -> (usize, usize, f32) {
        let position = ((out as f32 + 0.5) * size_in as f32 / size_out as f32 - 0.5).max(0.0);
        let low = (position.floor() as usize).min(size_in - 1);
        let high = (low + 1).min(size_in - 1);
        (low, high, position - low as f32)
    };
    let columns: Vec<(usize, usize, f32)> = (0..out_width)
        .map(|x| source(x, width, out_width))
        .collect();
    let mut labels = vec![0u16; out_width * out_height];
    labels
        .par_chunks_mut(out_width)
        .enumerate()
        .for_each(|(y, row)| {
            let (y0, y1, fy) = source(y, height, out_height);
            for (x, label) in row.iter_mut().enumerate() {
                let (x0, x1, fx) = columns[x];
                let mut best = (f32::NEG_INFINITY, 0usize);
                for k in 0..clusters {
                    let plane = &logits[k * cells..(k + 1) * cells];
                    let top = plane[y0 * width + x0] * (1.0 - fx) + plane[y0 * width + x1] * fx;
                    let bottom = plane[y1 * width + x0] * (1.0 - fx) + plane[y1 * width + x1] * fx;
                    let value = top * (1.0 - fy) + bottom * fy;
                    if value > best.0 {
                        best = (value, k);
                    }
                }
                *label = best.1 as u16;
            }
        });
    labels
}

/// Writes cluster indices as an index PNG (8-bit when every index fits, else 16-bit),
/// atomically.
pub fn write_index_png(path: &Path, segmentation: &Segmentation) -> Result<(), SegmentError> {
    let write_error = |source: std::io::Error| SegmentError::Write {
        path: path.to_owned(),
        source,
    };
    let fits_u8 = segmentation.labels.iter().all(|&label| label <= 255);
    let encoded = if fits_u8 {
        let pixels: Vec<u8> = segmentation
            .labels
            .iter()
            .map(|&label| label as u8)
            .collect();
        encode_png(
            &pixels,
            segmentation.width,
            segmentation.height,
            image::ExtendedColorType::L8,
        )
    } else {
        let pixels: Vec<u8> = segmentation
            .labels
            .iter()
            .flat_map(|label| label.to_be_bytes())
            .collect();
        encode_png(
            &pixels,
            segmentation.width,
            segmentation.height,
            image::ExtendedColorType::L16,
        )
    }
    .map_err(|error| write_error(std::io::Error::other(error)))?;
    crate::fsutil::write_bytes_atomic(path, &encoded).map_err(write_error)
}

/// Encodes pixels as a PNG in memory (so the file can then be written atomically).
pub(crate) fn encode_png(
    pixels: &[u8],
    width: u32,
    height: u32,
    colour: image::ExtendedColorType,
) -> Result<Vec<u8>, image::ImageError> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes).write_image(pixels, width, height, colour)?;
    Ok(bytes)
}

/// Errors of writing segmentations.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A mask could not be written; nothing partial was left.
    #[error("cannot write {path}: {source}. Check free disk space and write permission")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}
