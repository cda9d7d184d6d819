//! A procedural, labelled demo dataset, so the app can be tried without downloading anything.
//!
//! Each scene is an outdoor picture: a sky with clouds above a wavy horizon, grass, sometimes a
//! lake and a road, buildings of brick, trees, vehicles and balls. Every class has its own colour
//! range and texture, with per-image lighting and colour shifts so clustering is not trivial.
//! Pixels are drawn from a per-pixel owner map, so the label map matches the picture exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, GrayImage, ImageEncoder, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::DatasetError;
use crate::fsutil;
use noise::mix;
use scene::Scene;

mod noise;
mod scene;

/// The demo classes; the label value of a pixel is its index here.
pub const DEMO_CLASSES: [&str; 8] = [
    "sky", "grass", "water", "building", "tree", "road", "vehicle", "ball",
];

const SKY: u8 = 0;
const GRASS: u8 = 1;
const WATER: u8 = 2;
const BUILDING: u8 = 3;
const TREE: u8 = 4;
const ROAD: u8 = 5;
const VEHICLE: u8 = 6;
const BALL: u8 = 7;

/// Smallest scene side; smaller requests are raised to it so shapes stay drawable.
const MIN_SIZE: u32 = 16;

/// Largest scene side; larger requests are lowered to it (a demo never needs more).
const MAX_SIZE: u32 = 4096;

/// What [`write_demo_dataset`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Number of images.
    pub images: usize,
    /// Width and height of each image, in pixels (16 to 4096).
    pub size: u32,
    /// Seed: the same seed gives byte-identical files.
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            images: 48,
            size: 160,
            seed: 0,
        }
    }
}

/// Where [`write_demo_dataset`] put the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSummary {
    /// The folder of images (`out_dir/images`).
    pub images_dir: PathBuf,
    /// The folder of label maps (`out_dir/labels`).
    pub labels_dir: PathBuf,
    /// The class list (`out_dir/classes.txt`).
    pub classes_file: PathBuf,
    /// Number of images written.
    pub images: usize,
    /// The class names, in label order.
    pub class_names: Vec<String>,
}

/// Writes `out_dir/images/demo_NNNN.png`, `out_dir/labels/demo_NNNN.png` (8-bit class indices)
/// and `out_dir/classes.txt`, each file atomically. Existing files of the same names are
/// replaced; other files are left alone.
pub fn write_demo_dataset(
    out_dir: &Path,
    options: &DemoOptions,
) -> Result<DemoSummary, DatasetError> {
    let images_dir = out_dir.join("images");
    let labels_dir = out_dir.join("labels");
    for dir in [&images_dir, &labels_dir] {
        std::fs::create_dir_all(dir).map_err(|source| DatasetError::Write {
            path: dir.clone(),
            source,
        })?;
    }

    (0..options.images)
        .into_par_iter()
        .try_for_each(|index| -> Result<(), DatasetError> {
            let (rgb, label) = generate_demo_scene(index, options.size, options.seed);
            let name = format!("demo_{index:04}.png");
            write_png(
                &images_dir.join(&name),
                rgb.as_raw(),
                rgb.dimensions(),
                ExtendedColorType::Rgb8,
            )?;
            write_png(
                &labels_dir.join(&name),
                label.as_raw(),
                label.dimensions(),
                ExtendedColorType::L8,
            )
        })?;

    let classes_file = out_dir.join("classes.txt");
    let mut text = DEMO_CLASSES.join("\n");
    text.push('\n');
    fsutil::write_bytes_atomic(&classes_file, text.as_bytes()).map_err(|source| {
        DatasetError::Write {
            path: classes_file.clone(),
            source,
        }
    })?;

    Ok(DemoSummary {
        images_dir,
        labels_dir,
        classes_file,
        images: options.images,
        class_names: DEMO_CLASSES.iter().map(|name| (*name).to_owned()).collect(),
    })
}

fn write_png(
    path: &Path,
    pixels: &[u8],
    (width, height): (u32, u32),
    color: ExtendedColorType,
) -> Result<(), DatasetError> {
    fsutil::write_atomic(path, |writer| {
        PngEncoder::new(writer.by_ref())
            .write_image(pixels, width, height, color)
            .map_err(std::io::Error::other)
    })
    .map_err(|source| DatasetError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Draws scene `index` of the demo dataset with the given seed: a `size` x `size` picture and
/// its label map (values index [`DEMO_CLASSES`]). Deterministic in `(index, size, seed)`;
/// `size` is clamped to 16..=4096.
pub fn generate_demo_scene(index: usize, size: u32, seed: u64) -> (RgbImage, GrayImage) {
    let size = size.clamp(MIN_SIZE, MAX_SIZE);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ mix(index as u64 ^ 0xD1B5_4A32_D192_ED03)));
    let scene = Scene::random(&mut rng, size);
    scene.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_differ_by_index_and_seed() {
        let (a, la) = generate_demo_scene(3, 64, 9);
        let (b, lb) = generate_demo_scene(3, 64, 9);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        assert_ne!(generate_demo_scene(4, 64, 9).0, a);
        assert_ne!(generate_demo_scene(3, 64, 10).0, a);
    }

    #[test]
    fn labels_use_demo_classes_and_most_classes_appear() {
        let mut seen = [0usize; DEMO_CLASSES.len()];
        for index in 0..24 {
            let (rgb, label) = generate_demo_scene(index, 96, 1);
            assert_eq!(rgb.dimensions(), (96, 96));
            assert_eq!(label.dimensions(), (96, 96));
            for &value in label.as_raw() {
                seen[usize::from(value)] += 1;
            }
        }
        assert!(
            seen.iter().all(|&count| count > 0),
            "class pixel counts: {seen:?}"
        );
    }

    #[test]
    fn classes_differ_in_mean_colour() {
        // Averaged over scenes, the classes must be told apart by colour alone often enough
        // that the demo is learnable; check the class means are pairwise distinct.
        let mut sums = [[0f64; 3]; DEMO_CLASSES.len()];
        let mut counts = [0f64; DEMO_CLASSES.len()];
        for index in 0..16 {
            let (rgb, label) = generate_demo_scene(index, 64, 5);
            for (pixel, &class) in rgb.pixels().zip(label.as_raw()) {
                for (total, value) in sums[usize::from(class)].iter_mut().zip(pixel.0) {
                    *total += f64::from(value);
                }
                counts[usize::from(class)] += 1.0;
            }
        }
        let means: Vec<[f64; 3]> = sums
            .iter()
            .zip(counts)
            .map(|(sum, n)| [sum[0] / n, sum[1] / n, sum[2] / n])
            .collect();
        for i in 0..means.len() {
            for j in i + 1..means.len() {
                let d: f64 = (0..3)
                    .map(|c| (means[i][c] - means[j][c]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    d > 8.0,
                    "{} and {} look alike: {means:?}",
                    DEMO_CLASSES[i],
                    DEMO_CLASSES[j]
                );
            }
        }
    }
}
