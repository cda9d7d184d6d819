//! The bank's files: the header ([`BankInfo`] with the format and the number of patches) and
//! the f16 feature file, read with every check a damaged or foreign file fails, and written
//! into a folder that is renamed into place.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::search::{Rows, Values, unit_vector};
use super::{BankError, FEATURES_FILE, FeatureBank, INFO_FILE, bank_dir, write_error};
use crate::fsutil;

/// Written into the header; a bank of another format is refused with "rebuild it".
const FORMAT: &str = "picie-feature-bank/1";
/// Element type of the feature file, as named in the header.
const DTYPE: &str = "f16-le";

/// What a bank holds, saved as its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankInfo {
    /// Feature dimension.
    pub dim: usize,
    /// Patch side in input pixels (a multiple of 4).
    pub patch: usize,
    /// Network input side the images were fed at.
    pub input_size: u32,
    /// Base square side (shorter side resized to this, then centre crop).
    pub base_size: u32,
    /// Patches per image side: `input_size / patch`.
    pub grid: usize,
    /// Epoch of the network (0: untrained).
    pub epoch: usize,
    /// Image names (relative paths), in dataset order.
    pub names: Vec<String>,
}

impl BankInfo {
    /// Patches of one image: `grid²`.
    pub fn patches_per_image(&self) -> usize {
        self.grid * self.grid
    }

    /// Patches of all images.
    pub fn patches(&self) -> usize {
        self.names.len() * self.patches_per_image()
    }

    /// Checks that the fields agree with each other.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.dim == 0 {
            return Err("the feature dimension is 0".into());
        }
        if self.grid == 0 || self.patch == 0 || self.grid * self.patch != self.input_size as usize {
            return Err(format!(
                "grid {} x patch {} does not make the input size {}",
                self.grid, self.patch, self.input_size
            ));
        }
        if self.base_size == 0 {
            return Err("the base size is 0".into());
        }
        Ok(())
    }
}

/// The header file: the info and what is needed to check the feature file against it.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    dtype: String,
    patches: usize,
    #[serde(flatten)]
    info: BankInfo,
}

/// Writes the header of a bank of `patches` rows into `folder` (beside its features file).
pub(super) fn write_header(
    folder: &Path,
    info: &BankInfo,
    patches: usize,
) -> Result<(), BankError> {
    let header = Header {
        format: FORMAT.to_owned(),
        dtype: DTYPE.to_owned(),
        patches,
        info: info.clone(),
    };
    let info_path = folder.join(INFO_FILE);
    let text = serde_json::to_string_pretty(&header)
        .map_err(|error| write_error(&info_path)(std::io::Error::other(error)))?;
    fsutil::write_bytes_atomic(&info_path, text.as_bytes()).map_err(write_error(&info_path))
}

/// Renames the complete bank folder `partial` to `RUN_DIR/bank/`, the previous bank moved
/// aside first and removed after (put back if the rename fails).
pub(super) fn publish_folder(run_dir: &Path, partial: &Path) -> Result<(), BankError> {
    let final_dir = bank_dir(run_dir);
    let old = crate::run::paths::bank_old(run_dir);
    if old.exists() {
        fs::remove_dir_all(&old).map_err(write_error(&old))?;
    }
    let had_old = final_dir.exists();
    if had_old {
        fs::rename(&final_dir, &old).map_err(write_error(&final_dir))?;
    }
    if let Err(source) = fs::rename(partial, &final_dir) {
        if had_old {
            let _ = fs::rename(&old, &final_dir);
        }
        return Err(BankError::Write {
            path: final_dir.clone(),
            source,
        });
    }
    if had_old {
        // Only disk space is at stake now.
        let _ = fs::remove_dir_all(&old);
    }
    Ok(())
}

impl FeatureBank {
    /// A bank of f32 features (`info.patches() x info.dim`, row-major); each row is scaled
    /// to unit length and stored as f16.
    pub fn from_features(info: BankInfo, features: &[f32]) -> Result<Self, BankError> {
        info.check().map_err(BankError::Invalid)?;
        let dim = info.dim;
        if features.len() != info.patches() * dim {
            return Err(BankError::Invalid(format!(
                "{} values for {} patches of {dim}",
                features.len(),
                info.patches()
            )));
        }
        if features.par_iter().any(|value| !value.is_finite()) {
            return Err(BankError::Invalid(
                "a feature is not a finite number".into(),
            ));
        }
        let mut values = vec![f16::ZERO; features.len()];
        values
            .par_chunks_mut(dim)
            .zip(features.par_chunks(dim))
            .for_each(|(out, row)| {
                let unit = unit_vector(row, dim).unwrap_or_else(|| vec![0.0; dim]);
                out.convert_from_f32_slice(&unit);
            });
        Self::from_f16(info, values)
    }

    /// A bank of f16 features as they will be stored (rows should have unit length; scores
    /// are cosines either way).
    pub fn from_f16(info: BankInfo, features: Vec<f16>) -> Result<Self, BankError> {
        info.check().map_err(BankError::Invalid)?;
        if features.len() != info.patches() * info.dim {
            return Err(BankError::Invalid(format!(
                "{} values for {} patches of {}",
                features.len(),
                info.patches(),
                info.dim
            )));
        }
        let rows = Rows::new(Values::Owned(features), info.dim).map_err(BankError::Invalid)?;
        Ok(Self {
            info,
            rows: Arc::new(rows),
            assignments: Mutex::new(None),
        })
    }

    /// Reads `RUN_DIR/bank/`. A missing bank is [`BankError::Missing`], which says how to
    /// build one.
    pub fn load(run_dir: &Path) -> Result<Self, BankError> {
        let folder = bank_dir(run_dir);
        let info_path = folder.join(INFO_FILE);
        if !info_path.is_file() {
            return Err(BankError::Missing {
                run: run_dir.to_owned(),
            });
        }
        let corrupt = |path: &Path, reason: String| BankError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let text = fs::read_to_string(&info_path).map_err(|error| BankError::Read {
            path: info_path.clone(),
            reason: error.to_string(),
        })?;
        let header: Header =
            serde_json::from_str(&text).map_err(|error| corrupt(&info_path, error.to_string()))?;
        if header.format != FORMAT || header.dtype != DTYPE {
            return Err(corrupt(
                &info_path,
                format!(
                    "format '{}' ({}) is not '{FORMAT}' ({DTYPE})",
                    header.format, header.dtype
                ),
            ));
        }
        header
            .info
            .check()
            .map_err(|reason| corrupt(&info_path, reason))?;
        if header.patches != header.info.patches() {
            return Err(corrupt(
                &info_path,
                format!(
                    "{} patches listed, but {} images of {}x{} patches make {}",
                    header.patches,
                    header.info.names.len(),
                    header.info.grid,
                    header.info.grid,
                    header.info.patches()
                ),
            ));
        }
        let features_path = folder.join(FEATURES_FILE);
        let mut file = File::open(&features_path).map_err(|error| BankError::Read {
            path: features_path.clone(),
            reason: error.to_string(),
        })?;
        let expected = header
            .patches
            .checked_mul(header.info.dim)
            .and_then(|values| values.checked_mul(2))
            .ok_or_else(|| corrupt(&info_path, "the bank size overflows".into()))?;
        let length = file
            .metadata()
            .map_err(|error| BankError::Read {
                path: features_path.clone(),
                reason: error.to_string(),
            })?
            .len();
        if length != expected as u64 {
            return Err(corrupt(
                &features_path,
                format!(
                    "{length} bytes, but {} patches of {} half floats need {expected}",
                    header.patches, header.info.dim
                ),
            ));
        }
        let values = if expected == 0 {
            Values::Owned(Vec::new())
        } else if cfg!(all(unix, target_endian = "little")) {
            // SAFETY: the map is read-only and nothing writes a published features file in
            // place: banks are written into a new folder that is renamed over the old one,
            // and a removed file stays readable through an existing map (on Unix; Windows
            // could not rename a folder holding a mapped file, so it reads the file).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|error| BankError::Read {
                path: features_path.clone(),
                reason: error.to_string(),
            })?;
            Values::Mapped(map)
        } else {
            let mut values = vec![f16::ZERO; expected / 2];
            file.read_exact(bytemuck::cast_slice_mut(values.reinterpret_cast_mut()))
                .map_err(|error| BankError::Read {
                    path: features_path.clone(),
                    reason: error.to_string(),
                })?;
            for bits in values.reinterpret_cast_mut() {
                *bits = u16::from_le(*bits);
            }
            Values::Owned(values)
        };
        let rows =
            Rows::new(values, header.info.dim).map_err(|reason| corrupt(&features_path, reason))?;
        Ok(Self {
            info: header.info,
            rows: Arc::new(rows),
            assignments: Mutex::new(None),
        })
    }

    /// Writes `RUN_DIR/bank/` atomically: into a temporary folder, then renamed into place
    /// (an existing bank is moved aside first and removed after).
    pub fn save(&self, run_dir: &Path) -> Result<(), BankError> {
        fs::create_dir_all(run_dir).map_err(write_error(run_dir))?;
        let partial = crate::run::paths::bank_partial(run_dir);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(write_error(&partial))?;
        }
        let result = self
            .write_files(&partial)
            .and_then(|()| publish_folder(run_dir, &partial));
        if result.is_err() {
            let _ = fs::remove_dir_all(&partial);
        }
        result
    }

    fn write_files(&self, folder: &Path) -> Result<(), BankError> {
        fs::create_dir_all(folder).map_err(write_error(folder))?;
        let features_path = folder.join(FEATURES_FILE);
        let write_features = || -> std::io::Result<()> {
            let mut writer = BufWriter::new(File::create(&features_path)?);
            let mut bytes = Vec::with_capacity(2 << 20);
            for piece in self.rows.values.chunks(1 << 20) {
                bytes.clear();
                bytes.extend(piece.iter().flat_map(|value| value.to_bits().to_le_bytes()));
                writer.write_all(&bytes)?;
            }
            writer.flush()?;
            writer
                .into_inner()
                .map_err(|error| error.into_error())?
                .sync_all()
        };
        write_features().map_err(write_error(&features_path))?;
        write_header(folder, &self.info, self.len())
    }
}
