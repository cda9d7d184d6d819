//! Scanning and decoding image folders, with optional evaluation labels.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageError, RgbImage};

use super::decode::load_entry;
use rayon::prelude::*;

/// File extensions (lower case) that are treated as images; matching ignores case.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

/// The label value that marks a pixel as unlabelled, ignored by evaluation.
pub const IGNORE_LABEL: u8 = 255;

/// The largest width or height accepted for one image, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 20_000;

/// The largest decoded size accepted for one image, in bytes.
pub const MAX_DECODED_BYTES: u64 = 512 * 1024 * 1024;

/// Nested folders deeper than this are not searched; it also stops symbolic-link cycles.
const MAX_FOLDER_DEPTH: usize = 32;

/// Name of the file listing the class names of a label folder.
const CLASSES_FILE: &str = "classes.txt";

/// Everything that can go wrong while finding, reading or writing dataset files.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The folder does not exist.
    #[error("folder {} does not exist; check the path or choose another folder", .path.display())]
    FolderMissing {
        /// The folder that was asked for.
        path: PathBuf,
    },
    /// The path exists but is not a folder.
    #[error("{} is not a folder; choose the folder that contains the images", .path.display())]
    NotAFolder {
        /// The path that was asked for.
        path: PathBuf,
    },
    /// A folder could not be listed.
    #[error("cannot read folder {}: {source}; check that it exists and that you may read it", .path.display())]
    FolderUnreadable {
        /// The folder.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// A folder (searched recursively) holds no image files.
    #[error(
        "no images found in {} or its subfolders; accepted file types: {}",
        .path.display(),
        IMAGE_EXTENSIONS.join(", ")
    )]
    NoImages {
        /// The folder that was searched.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// A file could not be decoded as an image.
    #[error("cannot decode {}: {source}; the file may be corrupt, truncated or not an image", .path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        source: ImageError,
    },
    /// An image is larger than the decoder is allowed to allocate.
    #[error(
        "{} is too large to load ({detail}); images may be at most {MAX_IMAGE_SIDE} pixels \
         per side and {} MiB decoded: downscale it first",
        .path.display(),
        MAX_DECODED_BYTES / (1024 * 1024)
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, as far as it is known.
        detail: String,
    },
    /// A label folder was given but some images have no label file in it.
    #[error(
        "{missing} of {total} images have no label in {} (for example {examples}); scores need \
         a label for every image: add the missing labels, or leave out the label folder to \
         train without scores",
        .labels.display()
    )]
    MissingLabels {
        /// The label folder.
        labels: PathBuf,
        /// Images without a label.
        missing: usize,
        /// Images in the dataset.
        total: usize,
        /// The first few names without a label.
        examples: String,
    },
    /// An image has no pixels.
    #[error("{} has no pixels (width or height is 0)", .path.display())]
    EmptyImage {
        /// The file.
        path: PathBuf,
    },
    /// A label file is not a single-channel 8-bit image.
    #[error(
        "label {} is {found}, but labels must be single-channel 8-bit PNGs holding one class \
         index per pixel ({IGNORE_LABEL} = ignore); convert it to 8-bit greyscale",
        .path.display()
    )]
    LabelFormat {
        /// The label file.
        path: PathBuf,
        /// The pixel format that was found.
        found: String,
    },
    /// A label's size differs from its image's size.
    #[error(
        "label {} is {}x{} but its image {} is {}x{}; a label must have exactly the size of its image",
        .label.display(), .label_size.0, .label_size.1,
        .image.display(), .image_size.0, .image_size.1
    )]
    LabelSizeMismatch {
        /// The label file.
        label: PathBuf,
        /// The label's width and height.
        label_size: (u32, u32),
        /// The image file.
        image: PathBuf,
        /// The image's width and height (after EXIF orientation).
        image_size: (u32, u32),
    },
    /// A label holds a class index that `classes.txt` does not name.
    #[error(
        "label {} contains class index {value}, but the class list has only {classes} classes \
         (0..{}) plus {IGNORE_LABEL} for ignore; fix the label or the class list",
        .path.display(),
        .classes.saturating_sub(1)
    )]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// The offending value.
        value: u8,
        /// How many classes the class list names.
        classes: usize,
    },
    /// The class list could not be read.
    #[error("cannot read class list {}: {source}", .path.display())]
    ClassesUnreadable {
        /// The class-list file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The class list names no classes.
    #[error("class list {} names no classes; write one class name per line", .path.display())]
    ClassesEmpty {
        /// The class-list file.
        path: PathBuf,
    },
    /// Every image of a folder failed to load.
    #[error(
        "none of the {count} images in {} could be loaded; first problem: {first_reason}",
        .path.display()
    )]
    NothingLoaded {
        /// The image folder.
        path: PathBuf,
        /// How many images were tried.
        count: usize,
        /// Why the first one failed.
        first_reason: String,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}; check that the folder is writable and the disk is not full", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

/// The fixed geometry every image is reduced to before anything else sees it: resize so the
/// shorter side is `size` (triangle filter for images, nearest neighbour for labels), then crop
/// the centre `size` x `size` square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseTransform {
    /// Side of the square output, in pixels. 0 is treated as 1.
    pub size: u32,
}

impl BaseTransform {
    /// The transform producing `size` x `size` squares.
    pub fn new(size: u32) -> Self {
        Self { size }
    }

    fn side(&self) -> u32 {
        self.size.max(1)
    }

    /// The centred square `(x, y, side)` of an `orig_w` x `orig_h` image that ends up in the
    /// output, in original pixels: `side` is the shorter side and the crop is centred (rounding
    /// down). Maps output pixel `(u, v)` back to `(x + (u + 0.5) * side / size, ...)`.
    pub fn crop_box(&self, orig_w: u32, orig_h: u32) -> (u32, u32, u32) {
        let side = orig_w.min(orig_h);
        ((orig_w - side) / 2, (orig_h - side) / 2, side)
    }

    /// Applies the transform to an image (any pixel format; the result is RGB8).
    pub fn apply_rgb(&self, image: &DynamicImage) -> RgbImage {
        let (x, y, side) = self.crop_box(image.width(), image.height());
        // Cropping first keeps the resize work and the RGB copy to the part that is kept.
        let square = image.crop_imm(x, y, side, side).to_rgb8();
        let size = self.side();
        if square.width() == size {
            return square;
        }
        imageops::resize(&square, size, size, FilterType::Triangle)
    }

    /// Applies the transform to a label map with nearest-neighbour sampling, so class indices
    /// are never blended.
    pub fn apply_label(&self, label: &GrayImage) -> GrayImage {
        let (x0, y0, side) = self.crop_box(label.width(), label.height());
        let size = self.side();
        let source = |i: u32| -> u32 {
            // Sample at output pixel centres.
            let s = ((2 * u64::from(i) + 1) * u64::from(side)) / (2 * u64::from(size));
            s.min(u64::from(side.saturating_sub(1))) as u32
        };
        let columns: Vec<u32> = (0..size).map(|u| x0 + source(u)).collect();
        let mut out = GrayImage::new(size, size);
        if side == 0 {
            return out;
        }
        for v in 0..size {
            let row = y0 + source(v);
            for (u, &column) in columns.iter().enumerate() {
                out.put_pixel(u as u32, v, *label.get_pixel(column, row));
            }
        }
        out
    }
}

/// One image found by [`ImageFolder::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Full path of the image file.
    pub path: PathBuf,
    /// Path relative to the scanned folder, with `/` separators: the name shown to users.
    pub name: String,
    /// File name without its extension, used to match the label file.
    pub stem: String,
    /// The matching label file, when a label folder was given and holds one.
    pub label: Option<PathBuf>,
}

/// The images under a folder, sorted by relative path, with their optional label files.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    labels_dir: Option<PathBuf>,
    entries: Vec<ImageEntry>,
    class_names: Option<Vec<String>>,
}

impl ImageFolder {
    /// Lists the images under `images` (recursively, skipping hidden files and folders) and,
    /// when `labels` is given, matches each to `labels/<relative path>.png` or
    /// `labels/<stem>.png`. Class names come from `classes.txt` in the label folder or its
    /// parent. Images without a label file are recorded, not rejected (see
    /// [`ImageFolder::unlabelled`]).
    pub fn scan(images: &Path, labels: Option<&Path>) -> Result<ImageFolder, DatasetError> {
        check_folder(images)?;
        let labels_dir = match labels {
            Some(labels) => {
                check_folder(labels)?;
                Some(labels.to_path_buf())
            }
            None => None,
        };
        // A label folder inside the image folder (dataset root chosen as the image folder)
        // must not have its PNGs taken for images.
        let skip_dir = labels_dir
            .as_deref()
            .and_then(|dir| fs::canonicalize(dir).ok());

        let mut files = Vec::new();
        walk(
            images,
            images,
            skip_dir.as_deref(),
            0,
            &mut Visited::default(),
            &mut files,
        )?;
        if files.is_empty() {
            return Err(DatasetError::NoImages {
                path: images.to_path_buf(),
            });
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));

        let entries = files
            .into_iter()
            .map(|(name, path)| {
                let stem = path
                    .file_stem()
                    .map(|stem| stem.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let label = labels_dir
                    .as_deref()
                    .and_then(|dir| find_label(dir, &name, &stem));
                ImageEntry {
                    path,
                    name,
                    stem,
                    label,
                }
            })
            .collect();

        let class_names = match labels_dir.as_deref() {
            Some(dir) => find_class_names(dir)?,
            None => None,
        };

        Ok(ImageFolder {
            root: images.to_path_buf(),
            labels_dir,
            entries,
            class_names,
        })
    }

    /// The scanned image folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The label folder, if one was given.
    pub fn labels_dir(&self) -> Option<&Path> {
        self.labels_dir.as_deref()
    }

    /// The images, sorted by relative path.
    pub fn entries(&self) -> &[ImageEntry] {
        &self.entries
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no images (never true for a folder returned by [`ImageFolder::scan`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Class names from `classes.txt` (line i = class i), when a label folder with one was given.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Number of images that have a label file.
    pub fn labelled_count(&self) -> usize {
        self.entries.iter().filter(|e| e.label.is_some()).count()
    }

    /// Names of the images without a label file (empty when no label folder was given).
    pub fn unlabelled(&self) -> Vec<&str> {
        if self.labels_dir.is_none() {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|e| e.label.is_none())
            .map(|e| e.name.as_str())
            .collect()
    }

    /// Decodes every image (and label) in parallel, each reduced to the base size as soon as it
    /// is decoded so only base-size pixels are kept. Files that fail are listed in
    /// [`LoadedDataset::skipped`] with the reason; the rest keep the sorted order.
    /// `on_progress(done, total)` is called from worker threads after each file.
    pub fn load(
        &self,
        transform: &BaseTransform,
        on_progress: &(dyn Fn(usize, usize) + Sync),
    ) -> LoadedDataset {
        self.load_with_eval(transform, None, on_progress)
    }

    /// [`ImageFolder::load`], also keeping a second copy of every image and label reduced by
    /// `eval` straight from the decoded original ([`LoadedImage::eval_rgb`],
    /// [`LoadedImage::eval_label`]): evaluation inputs that do not depend on the base size.
    pub fn load_with_eval(
        &self,
        transform: &BaseTransform,
        eval: Option<&BaseTransform>,
        on_progress: &(dyn Fn(usize, usize) + Sync),
    ) -> LoadedDataset {
        let total = self.entries.len();
        let done = AtomicUsize::new(0);
        let class_count = self.class_names.as_ref().map(Vec::len);
        let results: Vec<Result<LoadedImage, SkippedFile>> = self
            .entries
            .par_iter()
            .map(|entry| {
                let result =
                    load_entry(entry, transform, eval, class_count).map_err(|error| SkippedFile {
                        path: entry.path.clone(),
                        name: entry.name.clone(),
                        reason: error.to_string(),
                    });
                on_progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                result
            })
            .collect();

        let mut images = Vec::with_capacity(results.len());
        let mut skipped = Vec::new();
        for result in results {
            match result {
                Ok(image) => images.push(image),
                Err(skip) => skipped.push(skip),
            }
        }
        LoadedDataset {
            root: self.root.clone(),
            size: transform.side(),
            images,
            skipped,
        }
    }
}

/// A file that [`ImageFolder::load`] could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    /// Full path of the image.
    pub path: PathBuf,
    /// Path relative to the image folder.
    pub name: String,
    /// Why it was skipped (names the file at fault, which may be the label).
    pub reason: String,
}

/// One image reduced to the base size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    /// Path relative to the image folder.
    pub name: String,
    /// File name without extension.
    pub stem: String,
    /// Width and height of the decoded image, after EXIF orientation.
    pub original_size: (u32, u32),
    /// `size * size * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
    /// `size * size` class indices ([`IGNORE_LABEL`] = ignore), when the image has a label.
    pub label: Option<Vec<u8>>,
    /// The image reduced by the evaluation transform, when one was asked for.
    pub eval_rgb: Option<Vec<u8>>,
    /// The label reduced by the evaluation transform, when one was asked for and the image
    /// has a label.
    pub eval_label: Option<Vec<u8>>,
}

/// The result of [`ImageFolder::load`].
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    /// The image folder that was loaded.
    pub root: PathBuf,
    /// Side of every image, in pixels.
    pub size: u32,
    /// The images that loaded, in sorted order.
    pub images: Vec<LoadedImage>,
    /// The files that did not load, with the reason.
    pub skipped: Vec<SkippedFile>,
}

impl LoadedDataset {
    /// Returns the dataset, or an error naming the folder when no image loaded at all.
    pub fn into_non_empty(self) -> Result<LoadedDataset, DatasetError> {
        if self.images.is_empty() {
            return Err(DatasetError::NothingLoaded {
                path: self.root,
                count: self.skipped.len(),
                first_reason: self
                    .skipped
                    .first()
                    .map(|skip| skip.reason.clone())
                    .unwrap_or_else(|| "the folder lists no images".to_owned()),
            });
        }
        Ok(self)
    }
}

/// Reads a class list: one name per line, line i naming class i. Trailing blank lines are
/// dropped; a blank line in the middle becomes `class <i>` so later indices stay right.
pub fn read_class_names(path: &Path) -> Result<Vec<String>, DatasetError> {
    let text = fs::read_to_string(path).map_err(|source| DatasetError::ClassesUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = text.lines().map(|line| line.trim().to_owned()).collect();
    while names.last().is_some_and(|name| name.is_empty()) {
        names.pop();
    }
    if names.is_empty() {
        return Err(DatasetError::ClassesEmpty {
            path: path.to_path_buf(),
        });
    }
    for (index, name) in names.iter_mut().enumerate() {
        if name.is_empty() {
            *name = format!("class {index}");
        }
    }
    Ok(names)
}

fn check_folder(path: &Path) -> Result<(), DatasetError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DatasetError::NotAFolder {
            path: path.to_path_buf(),
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(DatasetError::FolderMissing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(DatasetError::FolderUnreadable {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| {
            IMAGE_EXTENSIONS
                .iter()
                .any(|known| known.eq_ignore_ascii_case(ext))
        })
}

/// Folders and files already collected, by canonical path: a symbolic link to a folder is
/// followed once, so link loops end and each file is read once.
#[derive(Default)]
struct Visited {
    folders: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
}

/// Collects `(relative name, path)` of every image file under `dir`.
fn walk(
    root: &Path,
    dir: &Path,
    skip_dir: Option<&Path>,
    depth: usize,
    visited: &mut Visited,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), DatasetError> {
    let unreadable = |source| DatasetError::FolderUnreadable {
        path: dir.to_path_buf(),
        source,
    };
    let canonical = fs::canonicalize(dir).map_err(unreadable)?;
    if !visited.folders.insert(canonical) {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let file_name = entry.file_name();
        if file_name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links; a dangling link is neither file nor folder and is ignored.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth >= MAX_FOLDER_DEPTH {
                continue;
            }
            if let Some(skip) = skip_dir
                && fs::canonicalize(&path).is_ok_and(|canonical| canonical == skip)
            {
                continue;
            }
            walk(root, &path, skip_dir, depth + 1, visited, out)?;
        } else if meta.is_file() && is_image_file(&path) {
            if fs::canonicalize(&path).is_ok_and(|canonical| !visited.files.insert(canonical)) {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let name = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((name, path));
        }
    }
    Ok(())
}

/// `labels/<relative path without extension>.png` (for nested folders), else `labels/<stem>.png`.
fn find_label(labels_dir: &Path, name: &str, stem: &str) -> Option<PathBuf> {
    let nested = Path::new(name).with_extension("png");
    let candidates = [
        labels_dir.join(nested),
        labels_dir.join(format!("{stem}.png")),
    ];
    candidates.into_iter().find(|path| path.is_file())
}

fn find_class_names(labels_dir: &Path) -> Result<Option<Vec<String>>, DatasetError> {
    let beside = labels_dir.join(CLASSES_FILE);
    if beside.is_file() {
        return read_class_names(&beside).map(Some);
    }
    if let Some(parent) = labels_dir.parent() {
        let above = parent.join(CLASSES_FILE);
        if above.is_file() {
            return read_class_names(&above).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_box_centres_the_shorter_side() {
        let transform = BaseTransform::new(160);
        assert_eq!(transform.crop_box(320, 240), (40, 0, 240));
        assert_eq!(transform.crop_box(240, 320), (0, 40, 240));
        assert_eq!(transform.crop_box(7, 7), (0, 0, 7));
        assert_eq!(transform.crop_box(1, 5), (0, 2, 1));
    }

    #[test]
    fn label_transform_never_invents_values() {
        let label = GrayImage::from_fn(30, 20, |x, y| {
            image::Luma([((x / 10) + 3 * (y / 10)) as u8])
        });
        let out = BaseTransform::new(8).apply_label(&label);
        assert_eq!(out.dimensions(), (8, 8));
        let allowed: Vec<u8> = label.as_raw().clone();
        assert!(out.as_raw().iter().all(|v| allowed.contains(v)));
        // The crop is x in 5..25: the left output column comes from the first label column block.
        assert_eq!(out.get_pixel(0, 0).0[0], 0);
        assert_eq!(out.get_pixel(7, 7).0[0], 3 + 2);
    }

    #[test]
    fn class_list_keeps_indices_and_drops_trailing_blanks() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("classes.txt");
        fs::write(&path, "sky\r\n\nroad\n\n\n").unwrap();
        assert_eq!(read_class_names(&path).unwrap(), ["sky", "class 1", "road"]);
        fs::write(&path, "\n\n").unwrap();
        assert!(matches!(
            read_class_names(&path),
            Err(DatasetError::ClassesEmpty { .. })
        ));
    }

    #[test]
    fn extension_matching_ignores_case() {
        assert!(is_image_file(Path::new("a/B.JPG")));
        assert!(is_image_file(Path::new("x.TiFf")));
        assert!(!is_image_file(Path::new("notes.txt")));
        assert!(!is_image_file(Path::new("jpg")));
    }
}
