//! Scoring index masks against a folder's labels: the masks an export writes (or is about to
//! write), matched to the classes as `picie eval` matches clusters, and where export puts
//! them ([`mask_paths`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use image::GrayImage;
use rayon::prelude::*;

use super::{ConfusionMatrix, Evaluation, IGNORE_LABEL};
use crate::data::{DatasetError, ImageEntry, ImageFolder, load_label, load_one};
use crate::labelmap::IGNORE_INDEX;

/// Values an 8-bit mask can hold.
const MASK_VALUES: usize = 256;

/// Errors of scoring masks; each names the file or folder at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// An image folder, image or label problem.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Scoring needs labels, and no image has one.
    #[error(
        "no image in {} has a label file{}; give the label folder (index PNGs named like the \
         images, 255 = unlabelled, with classes.txt)",
        .images.display(),
        .labels.as_ref().map(|labels| format!(" in {}", labels.display())).unwrap_or_default()
    )]
    NoLabels {
        /// The image folder.
        images: PathBuf,
        /// The label folder, if one was given.
        labels: Option<PathBuf>,
    },
    /// Every labelled image was unreadable.
    #[error(
        "none of the labelled images in {} could be read, so nothing was scored",
        .0.display()
    )]
    NothingScored(PathBuf),
    /// An image has a label but no exported mask.
    #[error(
        "there is no mask {} for image {}; export the images again (`picie export`), or give \
         the `index` folder of the export",
        .mask.display(),
        .image.display()
    )]
    MaskMissing {
        /// The mask that was looked for.
        mask: PathBuf,
        /// The image.
        image: PathBuf,
    },
    /// A mask is not the size of its label (the image's original size).
    #[error(
        "mask {} is {}x{} but label {} is {}x{}; masks must have their image's original size \
         (export the images again)",
        .mask.display(), .mask_size.0, .mask_size.1,
        .label.display(), .label_size.0, .label_size.1
    )]
    MaskSize {
        /// The mask.
        mask: PathBuf,
        /// Its width and height.
        mask_size: (u32, u32),
        /// The label.
        label: PathBuf,
        /// Its width and height.
        label_size: (u32, u32),
    },
    /// A mask could not be decoded as an 8-bit index PNG.
    #[error("cannot read mask {}: {reason}", .path.display())]
    MaskUnreadable {
        /// The mask.
        path: PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },
}

/// The path of each image's exported files inside an output sub-folder (`index/`, `colour/`,
/// `overlay/`), in the order of `entries`: the image's name with `.png` for its extension
/// (`a/b.jpg` -> `a/b.png`), so sub-folders are kept and the index folder matches the way
/// label folders are searched. Images that would share a file (`b.jpg` and `b.png`; compared
/// without case, for case-insensitive disks) keep their extension (`b.jpg.png`, `b.png.png`);
/// any remaining clash gets `~2`, `~3`, ... Depends only on the list of names, so an export
/// and a later scoring of the same folder agree.
pub fn mask_paths(entries: &[ImageEntry]) -> Vec<PathBuf> {
    let key = |path: &Path| path.to_string_lossy().to_lowercase();
    let plain: Vec<PathBuf> = entries
        .iter()
        .map(|entry| relative_path(&entry.name).with_extension("png"))
        .collect();
    let mut uses: HashMap<String, usize> = HashMap::new();
    for path in &plain {
        *uses.entry(key(path)).or_default() += 1;
    }
    let mut taken = HashSet::new();
    entries
        .iter()
        .zip(&plain)
        .map(|(entry, plain)| {
            let base = if uses[&key(plain)] > 1 {
                let mut with_extension = relative_path(&entry.name).into_os_string();
                with_extension.push(".png");
                PathBuf::from(with_extension)
            } else {
                plain.clone()
            };
            let mut candidate = base.clone();
            let mut number = 2;
            while !taken.insert(key(&candidate)) {
                let stem = base
                    .file_stem()
                    .map(|stem| stem.to_string_lossy().into_owned())
                    .unwrap_or_default();
                candidate = base.with_file_name(format!("{stem}~{number}.png"));
                number += 1;
            }
            candidate
        })
        .collect()
}

/// A `/`-separated image name as a relative path; `.`, `..` and empty parts are dropped so
/// nothing is ever written outside the output folder.
fn relative_path(name: &str) -> PathBuf {
    name.split('/')
        .filter(|part| !part.is_empty() && *part != "." && *part != "..")
        .collect()
}

/// Pixel counts of (mask value, label) pairs, 256 x 256, before the classes are known.
pub(crate) struct MaskScores {
    counts: Vec<u64>,
    scored_images: usize,
}

impl MaskScores {
    pub(crate) fn new() -> Self {
        Self {
            counts: vec![0; MASK_VALUES * MASK_VALUES],
            scored_images: 0,
        }
    }

    pub(crate) fn add(&mut self, mask: &[u8], label: &[u8]) {
        for (&predicted, &class) in mask.iter().zip(label) {
            // Unlabelled pixels are not scored.
            if class != IGNORE_LABEL {
                self.counts[usize::from(predicted) * MASK_VALUES + usize::from(class)] += 1;
            }
        }
        self.scored_images += 1;
    }

    fn merge(mut self, other: MaskScores) -> Self {
        for (count, more) in self.counts.iter_mut().zip(other.counts) {
            *count += more;
        }
        self.scored_images += other.scored_images;
        self
    }

    /// The scores of the images of `folder` added so, or an error when none was scored.
    /// Hungarian matching of the 256 mask values to the classes; value 255 (ignored) is never
    /// matched, so its labelled pixels count as wrong. Classes are the class list's, else
    /// 0..=the largest label seen.
    pub(crate) fn evaluate(&self, folder: &ImageFolder) -> Result<Evaluation, ScoreError> {
        if self.scored_images == 0 {
            return Err(ScoreError::NothingScored(folder.root().to_owned()));
        }
        let class_names = folder.class_names();
        let classes = class_names.map(<[String]>::len).unwrap_or_else(|| {
            (0..MASK_VALUES)
                .rev()
                .find(|&class| {
                    (0..MASK_VALUES).any(|value| self.counts[value * MASK_VALUES + class] > 0)
                })
                .map_or(0, |class| class + 1)
        });
        let classes = classes.min(MASK_VALUES);
        let mut confusion = ConfusionMatrix::new(MASK_VALUES, classes);
        for value in 0..MASK_VALUES {
            for class in 0..classes {
                confusion.counts[value * classes + class] =
                    self.counts[value * MASK_VALUES + class];
            }
        }
        Ok(Evaluation::from_confusion_unmatchable(
            &confusion,
            &[usize::from(IGNORE_INDEX)],
        ))
    }
}

/// The labelled images of a folder with their label files, or an error when there are none.
pub(crate) fn labelled_entries(
    folder: &ImageFolder,
) -> Result<Vec<(&ImageEntry, usize)>, ScoreError> {
    let labelled: Vec<(&ImageEntry, usize)> = folder
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.label.is_some())
        .map(|(index, entry)| (entry, index))
        .collect();
    if labelled.is_empty() {
        return Err(ScoreError::NoLabels {
            images: folder.root().to_owned(),
            labels: folder.labels_dir().map(Path::to_owned),
        });
    }
    Ok(labelled)
}

/// Checks that a label names only classes of the class list (or 255), when there is one.
pub(crate) fn check_label_values(
    label: &GrayImage,
    label_path: &Path,
    classes: Option<usize>,
) -> Result<(), DatasetError> {
    if let Some(classes) = classes
        && let Some(&value) = label
            .as_raw()
            .iter()
            .find(|&&value| value != IGNORE_LABEL && usize::from(value) >= classes)
    {
        return Err(DatasetError::LabelOutOfRange {
            path: label_path.to_owned(),
            value,
            classes,
        });
    }
    Ok(())
}

/// Reads an exported index mask: it must be an 8-bit single-channel PNG.
fn read_mask(path: &Path) -> Result<GrayImage, ScoreError> {
    let unreadable = |reason: String| ScoreError::MaskUnreadable {
        path: path.to_owned(),
        reason,
    };
    let decoded = image::ImageReader::open(path)
        .map_err(|error| unreadable(error.to_string()))?
        .with_guessed_format()
        .map_err(|error| unreadable(error.to_string()))?
        .decode()
        .map_err(|error| unreadable(format!("{error}; the file may be corrupt")))?;
    match decoded {
        image::DynamicImage::ImageLuma8(mask) => Ok(mask),
        other => Err(unreadable(format!(
            "it is {:?}, but index masks are 8-bit greyscale: give the export's `index` \
             folder, not `colour` or `overlay`",
            other.color()
        ))),
    }
}

/// Scores a folder of index masks (the `index` folder of an export, or anything in that
/// layout: `masks/<name>.png` as [`mask_paths`] names them) against the labels of `folder`,
/// exactly as export's own scoring (`export::score_segmentation`) scores what it writes, so
/// an export scores the same either way. A missing mask, or one not the size of its label, is an error naming the file;
/// an image without a mask is skipped only when the image itself cannot be read (export
/// writes nothing for it).
pub fn score_mask_folder(masks: &Path, folder: &ImageFolder) -> Result<Evaluation, ScoreError> {
    if !masks.is_dir() {
        let path = masks.to_owned();
        return Err(if masks.exists() {
            DatasetError::NotAFolder { path }
        } else {
            DatasetError::FolderMissing { path }
        }
        .into());
    }
    let classes = folder.class_names().map(<[String]>::len);
    let paths = mask_paths(folder.entries());
    let labelled = labelled_entries(folder)?;
    let pairs = labelled
        .par_iter()
        .try_fold(MaskScores::new, |mut pairs, &(entry, index)| {
            let Some(label_path) = &entry.label else {
                return Ok(pairs);
            };
            let mask_path = masks.join(&paths[index]);
            if !mask_path.is_file() {
                if load_one(&entry.path).is_err() {
                    return Ok(pairs);
                }
                return Err(ScoreError::MaskMissing {
                    mask: mask_path,
                    image: entry.path.clone(),
                });
            }
            let mask = read_mask(&mask_path)?;
            let label = load_label(label_path)?;
            if label.dimensions() != mask.dimensions() {
                return Err(ScoreError::MaskSize {
                    mask: mask_path,
                    mask_size: mask.dimensions(),
                    label: label_path.clone(),
                    label_size: label.dimensions(),
                });
            }
            check_label_values(&label, label_path, classes)?;
            pairs.add(mask.as_raw(), label.as_raw());
            Ok(pairs)
        })
        .try_reduce(MaskScores::new, |a, b| Ok(a.merge(b)))?;
    pairs.evaluate(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> ImageEntry {
        ImageEntry {
            path: PathBuf::from("/images").join(name),
            name: name.to_owned(),
            stem: Path::new(name)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            label: None,
        }
    }

    #[test]
    fn mask_paths_keep_folders_and_never_collide() {
        let entries: Vec<ImageEntry> = ["a/b.jpg", "a/b.png", "a/c.JPG", "a/C.png", "d.tif", "e"]
            .into_iter()
            .map(entry)
            .collect();
        let paths: Vec<String> = mask_paths(&entries)
            .iter()
            .map(|path| path.to_string_lossy().replace('\\', "/"))
            .collect();
        assert_eq!(
            paths,
            [
                "a/b.jpg.png",
                "a/b.png.png",
                "a/c.JPG.png",
                "a/C.png.png",
                "d.png",
                "e.png"
            ]
        );
        // A clash left after keeping extensions is numbered.
        let entries: Vec<ImageEntry> = ["x.jpg", "x.jpg.png", "x.png"]
            .into_iter()
            .map(entry)
            .collect();
        let paths = mask_paths(&entries);
        let unique: HashSet<_> = paths.iter().collect();
        assert_eq!(unique.len(), 3, "{paths:?}");
        assert!(relative_path("../../etc/x.png").starts_with("etc"));
    }
}
