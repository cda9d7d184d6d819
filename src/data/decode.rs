//! Decoding one image or label file: memory limits checked before any pixel buffer exists,
//! EXIF orientation applied, labels required to be 8-bit single-channel, and errors that
//! name the file; and one dataset entry decoded with its label.

use std::path::Path;

use image::metadata::Orientation;
use image::{
    ColorType, DynamicImage, GrayImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage,
};

use super::dataset::{
    BaseTransform, DatasetError, IGNORE_LABEL, ImageEntry, LoadedImage, MAX_DECODED_BYTES,
    MAX_IMAGE_SIDE,
};

/// Decodes one image at its original resolution (EXIF orientation applied) as RGB8.
pub fn load_one(path: &Path) -> Result<RgbImage, DatasetError> {
    Ok(decode_oriented(path)?.to_rgb8())
}

/// Decodes a label file, which must be a single-channel 8-bit image.
pub fn load_label(path: &Path) -> Result<GrayImage, DatasetError> {
    let decoder = open_decoder(path)?;
    let color = decoder.color_type();
    if color != ColorType::L8 {
        return Err(DatasetError::LabelFormat {
            path: path.to_path_buf(),
            found: describe_color(color),
        });
    }
    match DynamicImage::from_decoder(decoder) {
        Ok(DynamicImage::ImageLuma8(label)) => Ok(label),
        Ok(other) => Err(DatasetError::LabelFormat {
            path: path.to_path_buf(),
            found: describe_color(other.color()),
        }),
        Err(source) => Err(decode_error(path, source)),
    }
}

/// The error for a file the decoder refused: too large, unreadable, or not an image.
pub(super) fn decode_error(path: &Path, source: ImageError) -> DatasetError {
    match source {
        ImageError::Limits(limit) => DatasetError::TooLarge {
            path: path.to_path_buf(),
            detail: limit.to_string(),
        },
        ImageError::IoError(source) => DatasetError::Read {
            path: path.to_path_buf(),
            source,
        },
        source => DatasetError::Decode {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Opens a decoder with memory limits, and rejects empty or oversized images before any pixel
/// buffer is allocated.
pub(super) fn open_decoder(path: &Path) -> Result<impl ImageDecoder, DatasetError> {
    let read_error = |source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    };
    // The content decides the format, so a PNG named .jpg still loads and a text file named
    // .jpg fails with a decode error rather than a confusing one.
    let mut reader = ImageReader::open(path)
        .map_err(read_error)?
        .with_guessed_format()
        .map_err(read_error)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|error| decode_error(path, error))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DatasetError::EmptyImage {
            path: path.to_path_buf(),
        });
    }
    let bytes = decoder.total_bytes();
    // `into_decoder` does not check the output buffer against `max_alloc`, so check it here.
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE || bytes > MAX_DECODED_BYTES {
        return Err(DatasetError::TooLarge {
            path: path.to_path_buf(),
            detail: format!(
                "{width}x{height}, {} MiB decoded",
                bytes.div_ceil(1024 * 1024)
            ),
        });
    }
    Ok(decoder)
}

pub(super) fn decode_oriented(path: &Path) -> Result<DynamicImage, DatasetError> {
    let mut decoder = open_decoder(path)?;
    // A malformed EXIF block should not make otherwise good pixels unusable.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|error| decode_error(path, error))?;
    image.apply_orientation(orientation);
    Ok(image)
}

pub(super) fn describe_color(color: ColorType) -> String {
    let name = match color {
        ColorType::L8 => "8-bit greyscale",
        ColorType::La8 => "8-bit greyscale with alpha",
        ColorType::Rgb8 => "8-bit RGB (a palette PNG also decodes as RGB)",
        ColorType::Rgba8 => "8-bit RGBA (a palette PNG also decodes as RGBA)",
        ColorType::L16 => "16-bit greyscale",
        ColorType::La16 => "16-bit greyscale with alpha",
        ColorType::Rgb16 => "16-bit RGB",
        ColorType::Rgba16 => "16-bit RGBA",
        ColorType::Rgb32F => "32-bit float RGB",
        ColorType::Rgba32F => "32-bit float RGBA",
        _ => "an unsupported pixel format",
    };
    name.to_owned()
}

/// Decodes a dataset entry: its image through `transform` (and `eval` for the evaluation
/// copy) and its label, checked against `class_count`.
pub(super) fn load_entry(
    entry: &ImageEntry,
    transform: &BaseTransform,
    eval: Option<&BaseTransform>,
    class_count: Option<usize>,
) -> Result<LoadedImage, DatasetError> {
    let image = decode_oriented(&entry.path)?;
    let original_size = (image.width(), image.height());
    // Reduce right away and drop the full-size pixels before touching the label.
    let rgb = transform.apply_rgb(&image).into_raw();
    let eval_rgb = eval.map(|eval| eval.apply_rgb(&image).into_raw());
    drop(image);
    let mut eval_label = None;

    let label = match &entry.label {
        Some(label_path) => {
            let label = load_label(label_path)?;
            if label.dimensions() != original_size {
                return Err(DatasetError::LabelSizeMismatch {
                    label: label_path.clone(),
                    label_size: label.dimensions(),
                    image: entry.path.clone(),
                    image_size: original_size,
                });
            }
            if let Some(classes) = class_count
                && let Some(&value) = label
                    .as_raw()
                    .iter()
                    .find(|&&v| v != IGNORE_LABEL && usize::from(v) >= classes)
            {
                return Err(DatasetError::LabelOutOfRange {
                    path: label_path.clone(),
                    value,
                    classes,
                });
            }
            eval_label = eval.map(|eval| eval.apply_label(&label).into_raw());
            Some(transform.apply_label(&label).into_raw())
        }
        None => None,
    };

    Ok(LoadedImage {
        name: entry.name.clone(),
        stem: entry.stem.clone(),
        original_size,
        rgb,
        label,
        eval_rgb,
        eval_label,
    })
}
