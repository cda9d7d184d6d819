//! Contact sheets of neighbours: the patches most like a query, drawn and written with a JSON
//! report (what `picie neighbours` writes).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::RgbImage;
use image::imageops::{self, FilterType};
use serde::{Deserialize, Serialize};

use super::{BankError, FeatureBank, Neighbour, write_error};
use crate::data::{BaseTransform, load_one};
use crate::fsutil;
use crate::run::RunFolder;

/// Side of one picture of a contact sheet, in pixels.
pub const SHEET_TILE: u32 = 160;
/// Width of the coloured frame around each picture (the nearest centroid's colour).
pub const SHEET_BORDER: u32 = 5;
/// Space between framed pictures and around the sheet.
pub const SHEET_GAP: u32 = 6;
/// Pictures per row.
pub const SHEET_COLUMNS: usize = 6;
/// A neighbour picture shows this many patches a side around the hit.
pub const SHEET_WINDOW: usize = 4;
/// Most pictures one contact sheet takes (the query and 1000 hits), so a large `k` cannot
/// ask for a gigapixel image.
pub const SHEET_MAX_PICTURES: usize = 1001;

const SHEET_BACKGROUND: [u8; 3] = [28, 28, 30];
/// Frame colour without centroids.
const SHEET_NO_CLUSTER: [u8; 3] = [110, 110, 110];

/// Width and height of a contact sheet of `pictures` pictures (the query and its hits).
pub fn contact_sheet_size(pictures: usize) -> (u32, u32) {
    let pictures = pictures.max(1);
    let columns = pictures.min(SHEET_COLUMNS) as u32;
    let rows = pictures.div_ceil(SHEET_COLUMNS) as u32;
    let cell = SHEET_TILE + 2 * SHEET_BORDER;
    (
        SHEET_GAP + columns * (cell + SHEET_GAP),
        SHEET_GAP + rows * (cell + SHEET_GAP),
    )
}

/// `floor(index * extent / count)`: the pixel where cell `index` of `count` starts.
fn cell_start(index: usize, count: usize, extent: u32) -> u32 {
    (index as u64 * u64::from(extent) / count.max(1) as u64) as u32
}

fn fill(image: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, colour: [u8; 3]) {
    for y in y0..y1.min(image.height()) {
        for x in x0..x1.min(image.width()) {
            image.put_pixel(x, y, image::Rgb(colour));
        }
    }
}

/// A rectangle outline `thickness` pixels wide inside `[x0, x1) x [y0, y1)`.
fn outline(image: &mut RgbImage, rect: [u32; 4], thickness: u32, colour: [u8; 3]) {
    let [x0, y0, x1, y1] = rect;
    let t = thickness
        .min(x1.saturating_sub(x0).div_ceil(2))
        .min(y1.saturating_sub(y0).div_ceil(2));
    fill(image, x0, y0, x1, y0 + t, colour);
    fill(image, x0, y1.saturating_sub(t), x1, y1, colour);
    fill(image, x0, y0, x0 + t, y1, colour);
    fill(image, x1.saturating_sub(t), y0, x1, y1, colour);
}

/// A patch outline that shows on light and dark pictures: black, then white inside.
fn mark(image: &mut RgbImage, rect: [u32; 4]) {
    let [x0, y0, x1, y1] = rect;
    let grow = |value: u32, limit: u32, by: i64| (i64::from(value) + by).clamp(0, i64::from(limit));
    let outer = [
        grow(x0, image.width(), -1) as u32,
        grow(y0, image.height(), -1) as u32,
        grow(x1, image.width(), 1) as u32,
        grow(y1, image.height(), 1) as u32,
    ];
    outline(image, outer, 1, [0, 0, 0]);
    outline(
        image,
        [x0, y0, x1.max(x0 + 1), y1.max(y0 + 1)],
        2,
        [255, 255, 255],
    );
}

/// Renders a contact sheet: the query patch's image (its base square) with the patch
/// outlined, then for each hit a window of [`SHEET_WINDOW`]² patches around it from its base
/// image with the hit outlined; every picture framed in the colour of its nearest centroid
/// (`centroids`, `K x dim`; grey without). `base_image(image index)` gives an image's base
/// square (any square size). Returns the sheet, [`contact_sheet_size`] of `1 + hits`.
pub fn render_contact_sheet(
    bank: &FeatureBank,
    query: usize,
    hits: &[Neighbour],
    centroids: Option<&[f32]>,
    base_image: &mut dyn FnMut(usize) -> Result<RgbImage, BankError>,
) -> Result<RgbImage, BankError> {
    if hits.len() >= SHEET_MAX_PICTURES {
        return Err(BankError::Query(format!(
            "{} neighbours do not fit a contact sheet; ask for at most {}",
            hits.len(),
            SHEET_MAX_PICTURES - 1
        )));
    }
    let (width, height) = contact_sheet_size(1 + hits.len());
    let mut sheet = RgbImage::from_pixel(width, height, image::Rgb(SHEET_BACKGROUND));
    let grid = bank.info.grid.max(1);
    let mut images: HashMap<usize, RgbImage> = HashMap::new();
    let patches = std::iter::once(query).chain(hits.iter().map(|hit| hit.patch));
    for (position, patch) in patches.enumerate() {
        let (image_index, px, py) = bank.location(patch);
        if let std::collections::hash_map::Entry::Vacant(entry) = images.entry(image_index) {
            entry.insert(base_image(image_index)?);
        }
        let base = &images[&image_index];
        let side = base.width().min(base.height()).max(1);
        // The query shows its whole image; a hit a window around it.
        let (window, sx, sy) = if position == 0 {
            (grid, 0, 0)
        } else {
            let window = SHEET_WINDOW.min(grid);
            (
                window,
                px.saturating_sub(1).min(grid - window),
                py.saturating_sub(1).min(grid - window),
            )
        };
        let (left, top) = (cell_start(sx, grid, side), cell_start(sy, grid, side));
        let (right, bottom) = (
            cell_start(sx + window, grid, side),
            cell_start(sy + window, grid, side),
        );
        let crop = imageops::crop_imm(
            base,
            left,
            top,
            (right - left).max(1),
            (bottom - top).max(1),
        )
        .to_image();
        let filter = if crop.width() < SHEET_TILE {
            FilterType::Nearest
        } else {
            FilterType::Triangle
        };
        let mut tile = imageops::resize(&crop, SHEET_TILE, SHEET_TILE, filter);
        let cell = |index: usize| cell_start(index, window, SHEET_TILE);
        mark(
            &mut tile,
            [
                cell(px - sx),
                cell(py - sy),
                cell(px - sx + 1),
                cell(py - sy + 1),
            ],
        );
        let colour = centroids
            .map(|centroids| bank.assign(patch, centroids))
            .filter(|(_, similarity)| similarity.is_finite())
            .map_or(SHEET_NO_CLUSTER, |(cluster, _)| {
                crate::palette::cluster_colour(cluster)
            });
        let column = (position % SHEET_COLUMNS) as u32;
        let row = (position / SHEET_COLUMNS) as u32;
        let step = SHEET_TILE + 2 * SHEET_BORDER + SHEET_GAP;
        let (x, y) = (SHEET_GAP + column * step, SHEET_GAP + row * step);
        let frame = SHEET_TILE + 2 * SHEET_BORDER;
        fill(&mut sheet, x, y, x + frame, y + frame, colour);
        imageops::replace(
            &mut sheet,
            &tile,
            i64::from(x + SHEET_BORDER),
            i64::from(y + SHEET_BORDER),
        );
    }
    Ok(sheet)
}

/// [`render_contact_sheet`] written as a PNG at `path` (atomically). Returns its size.
pub fn write_contact_sheet(
    bank: &FeatureBank,
    query: usize,
    hits: &[Neighbour],
    centroids: Option<&[f32]>,
    base_image: &mut dyn FnMut(usize) -> Result<RgbImage, BankError>,
    path: &Path,
) -> Result<(u32, u32), BankError> {
    let sheet = render_contact_sheet(bank, query, hits, centroids, base_image)?;
    let size = sheet.dimensions();
    fsutil::write_atomic(path, |writer| {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(writer)
            .write_image(
                sheet.as_raw(),
                size.0,
                size.1,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(std::io::Error::other)
    })
    .map_err(write_error(path))?;
    Ok(size)
}

/// What to look up with [`write_neighbours`].
#[derive(Debug, Clone)]
pub struct NeighboursRequest {
    /// The run folder (its bank and `segmentation.json`).
    pub run_dir: PathBuf,
    /// The image folder the bank was built from.
    pub images_dir: PathBuf,
    /// The query image: its name in the bank (or a unique file name or stem).
    pub image: String,
    /// Query x in the original image's pixels.
    pub x: u32,
    /// Query y in the original image's pixels.
    pub y: u32,
    /// Neighbours to find, at most 1000 (the query patch itself is left out).
    pub k: usize,
    /// Folder for `neighbours.png` and `neighbours.json`.
    pub out_dir: PathBuf,
    /// Search on this device through a [`DeviceBank`]; `None`: on the CPU.
    pub device: Option<Device>,
}

/// A patch as `neighbours.json` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchReport {
    /// Rank (0: the query).
    pub rank: usize,
    /// Image name.
    pub image: String,
    /// Patch index in the bank.
    pub patch: usize,
    /// Centre x in original-image pixels.
    pub x: f32,
    /// Centre y in original-image pixels.
    pub y: f32,
    /// `[left, top, width, height]` in original-image pixels.
    #[serde(rename = "box")]
    pub bounds: [f32; 4],
    /// Cosine similarity to the query patch (1 for the query).
    pub similarity: f32,
    /// Nearest centroid of `segmentation.json`, when the run has one.
    pub cluster: Option<usize>,
}

/// The result of [`write_neighbours`], as written to `neighbours.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighboursReport {
    /// Epoch of the bank's network.
    pub bank_epoch: usize,
    /// Epoch of the centroids used for the clusters, when there are any.
    pub segmentation_epoch: Option<usize>,
    /// The query patch.
    pub query: PatchReport,
    /// The neighbours, best first.
    pub neighbours: Vec<PatchReport>,
    /// `neighbours.png`.
    pub sheet: PathBuf,
    /// Its width and height.
    pub sheet_size: (u32, u32),
}

/// The image folder a run was trained on, as the app recorded it (`explorer/session.json`).
pub fn recorded_images_dir(run_dir: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(crate::run::paths::session(run_dir)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let images = value.get("dataset")?.get("images")?.as_str()?;
    Some(PathBuf::from(images))
}

/// An image of the bank decoded from the image folder: its original size and base square.
struct DecodedImage {
    original: (u32, u32),
    base: RgbImage,
}

/// The `picie neighbours` command as a function: finds the patch at `(x, y)` of an image
/// (original pixels, mapped through the base transform), its `k` nearest patches in the run's
/// bank, and writes `neighbours.png` (see [`write_contact_sheet`]) and `neighbours.json`.
pub fn write_neighbours(request: &NeighboursRequest) -> Result<NeighboursReport, BankError> {
    if request.k >= SHEET_MAX_PICTURES {
        return Err(BankError::Query(format!(
            "k = {} is more than a contact sheet shows; use at most {}",
            request.k,
            SHEET_MAX_PICTURES - 1
        )));
    }
    let bank = FeatureBank::load(&request.run_dir)?;
    let run = RunFolder::open(&request.run_dir)?;
    let segmentation = run.segmentation().ok();
    let centroids = segmentation
        .as_ref()
        .filter(|segmentation| segmentation.dim == bank.info.dim)
        .map(|segmentation| segmentation.centroids.as_slice());
    let image = bank
        .image_index(&request.image)
        .ok_or_else(|| BankError::UnknownImage {
            name: request.image.clone(),
            count: bank.info.names.len(),
            example: bank.info.names.first().cloned().unwrap_or_default(),
        })?;
    let transform = BaseTransform::new(bank.info.base_size);
    let mut decoded: HashMap<usize, DecodedImage> = HashMap::new();
    let decode =
        |decoded: &mut HashMap<usize, DecodedImage>, index: usize| -> Result<(), BankError> {
            if decoded.contains_key(&index) {
                return Ok(());
            }
            let name = bank.info.names.get(index).cloned().unwrap_or_default();
            let path = request.images_dir.join(&name);
            let original = load_one(&path).map_err(|error| BankError::Image {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            let size = original.dimensions();
            let base = transform.apply_rgb(&image::DynamicImage::ImageRgb8(original));
            decoded.insert(
                index,
                DecodedImage {
                    original: size,
                    base,
                },
            );
            Ok(())
        };

    decode(&mut decoded, image)?;
    let (width, height) = decoded[&image].original;
    let (crop_x, crop_y, crop_side) = transform.crop_box(width, height);
    let inside = |value: u32, start: u32| value >= start && value - start < crop_side;
    if !inside(request.x, crop_x) || !inside(request.y, crop_y) {
        return Err(BankError::OutsideCrop {
            image: bank.info.names[image].clone(),
            x: request.x,
            y: request.y,
            crop_x,
            crop_y,
            crop_side,
            width,
            height,
        });
    }
    let u = ((request.x - crop_x) as f32 + 0.5) / crop_side as f32;
    let v = ((request.y - crop_y) as f32 + 0.5) / crop_side as f32;
    let query = bank
        .patch_at(image, u, v)
        .ok_or_else(|| BankError::Query(format!("no patch at ({u:.3}, {v:.3})")))?;
    let feature = bank.feature(query);
    // One more than asked, since the query patch finds itself.
    let wanted = request.k.saturating_add(1);
    let found = match &request.device {
        Some(device) => bank.to_device(device).try_nearest(&feature, wanted)?,
        None => bank.nearest(&feature, wanted),
    };
    let hits: Vec<Neighbour> = found
        .into_iter()
        .filter(|hit| hit.patch != query)
        .take(request.k)
        .collect();
    for hit in &hits {
        decode(&mut decoded, bank.location(hit.patch).0)?;
    }

    let report = |rank: usize, patch: usize, similarity: f32| -> PatchReport {
        let (index, px, py) = bank.location(patch);
        let (width, height) = decoded[&index].original;
        let (crop_x, crop_y, side) = transform.crop_box(width, height);
        let cell = side as f32 / bank.info.grid as f32;
        let (left, top) = (
            crop_x as f32 + px as f32 * cell,
            crop_y as f32 + py as f32 * cell,
        );
        PatchReport {
            rank,
            image: bank.info.names[index].clone(),
            patch,
            x: left + cell / 2.0,
            y: top + cell / 2.0,
            bounds: [left, top, cell, cell],
            similarity,
            cluster: centroids.map(|centroids| bank.assign(patch, centroids).0),
        }
    };
    let query_report = report(0, query, 1.0);
    let neighbours: Vec<PatchReport> = hits
        .iter()
        .enumerate()
        .map(|(rank, hit)| report(rank + 1, hit.patch, hit.similarity))
        .collect();

    fs::create_dir_all(&request.out_dir).map_err(write_error(&request.out_dir))?;
    let sheet = request.out_dir.join("neighbours.png");
    let sheet_size = write_contact_sheet(
        &bank,
        query,
        &hits,
        centroids,
        &mut |index| {
            decoded
                .get(&index)
                .map(|image| image.base.clone())
                .ok_or_else(|| BankError::Query(format!("image {index} was not decoded")))
        },
        &sheet,
    )?;
    let result = NeighboursReport {
        bank_epoch: bank.info.epoch,
        segmentation_epoch: segmentation.as_ref().map(|segmentation| segmentation.epoch),
        query: query_report,
        neighbours,
        sheet,
        sheet_size,
    };
    let json_path = request.out_dir.join("neighbours.json");
    let text = serde_json::to_string_pretty(&result)
        .map_err(|error| write_error(&json_path)(std::io::Error::other(error)))?;
    fsutil::write_bytes_atomic(&json_path, text.as_bytes()).map_err(write_error(&json_path))?;
    Ok(result)
}
