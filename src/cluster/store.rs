//! An append-only store of pixel features, kept as f16 in memory and optionally spilled to a
//! file once it outgrows a memory budget.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Device, Tensor, TensorData};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::ClusterError;

/// Bytes of one stored value (an IEEE half float).
const VALUE_BYTES: usize = 2;

/// Values converted per step when moving rows between memory and the spill file, so the byte
/// buffers stay small (4 MiB of f16) however large a read or a spill is.
const IO_STEP_VALUES: usize = 1 << 21;

/// Distinguishes the spill files of several stores of one process.
static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where and when a [`FeatureStore`] moves its rows to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillConfig {
    /// Folder of the spill file (created if missing). The file is removed when the store is
    /// dropped.
    pub folder: PathBuf,
    /// Once the rows held in memory take more bytes than this, they are appended to the
    /// spill file and the memory is freed.
    pub memory_budget_bytes: usize,
}

impl SpillConfig {
    /// A spill configuration.
    pub fn new(folder: impl Into<PathBuf>, memory_budget_bytes: usize) -> Self {
        Self {
            folder: folder.into(),
            memory_budget_bytes,
        }
    }
}

/// The spill file: rows `0..rows` of the store, row-major little-endian f16.
#[derive(Debug)]
struct SpillFile {
    path: PathBuf,
    // Reads take `&self` (chunks may be read from several threads); the cursor is shared.
    file: Mutex<File>,
    rows: usize,
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        // Best effort: a leftover temporary file is not worth a panic.
        let _ = fs::remove_file(&self.path);
        // Its folder too once empty (this fails while another store's file is in it).
        if let Some(folder) = self.path.parent() {
            let _ = fs::remove_dir(folder);
        }
    }
}

/// An append-only `N x D` matrix of pixel features stored as f16.
///
/// Rows keep the order they were pushed in. With a [`SpillConfig`] the oldest rows live in a
/// file (rows `0..spilled_rows()`) and the newest in memory; reads see one matrix either way.
#[derive(Debug)]
pub struct FeatureStore {
    dim: usize,
    spill: Option<SpillConfig>,
    file: Option<SpillFile>,
    /// The rows after the spilled ones, row-major.
    memory: Vec<f16>,
    len: usize,
}

impl FeatureStore {
    /// An empty store of `dim`-dimensional rows; `spill` lets it move rows to disk.
    pub fn new(dim: usize, spill: Option<SpillConfig>) -> Result<Self, ClusterError> {
        if dim == 0 {
            return Err(ClusterError::ZeroDimension);
        }
        Ok(Self {
            dim,
            spill,
            file: None,
            memory: Vec::new(),
            len: 0,
        })
    }

    /// An empty in-memory store of `dim`-dimensional rows.
    pub fn in_memory(dim: usize) -> Result<Self, ClusterError> {
        Self::new(dim, None)
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the store holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of rows held in the spill file.
    pub fn spilled_rows(&self) -> usize {
        self.file.as_ref().map_or(0, |file| file.rows)
    }

    /// The spill file, once one was written.
    pub fn spill_path(&self) -> Option<&Path> {
        self.file.as_ref().map(|file| file.path.as_path())
    }

    /// Bytes the rows held in memory take.
    pub fn memory_bytes(&self) -> usize {
        self.memory.len() * VALUE_BYTES
    }

    /// Appends rows given as row-major f32 values (a multiple of `dim` of them).
    pub fn push_slice(&mut self, values: &[f32]) -> Result<(), ClusterError> {
        if !values.len().is_multiple_of(self.dim) {
            return Err(ClusterError::RowLength {
                dim: self.dim,
                values: values.len(),
            });
        }
        if let Some(budget_values) = self.budget_values() {
            // Spilled before the rows would outgrow the budget, into room reserved once: a
            // growing vector would copy itself into one twice the size, holding up to three
            // budgets at once.
            if self.memory.len() + values.len() > budget_values {
                self.spill()?;
            }
            if self.memory.capacity() < budget_values {
                self.memory.reserve_exact(
                    budget_values
                        .max(values.len())
                        .saturating_sub(self.memory.len()),
                );
            }
        }
        let start = self.memory.len();
        self.memory.resize(start + values.len(), f16::ZERO);
        self.memory[start..].convert_from_f32_slice(values);
        self.len += values.len() / self.dim;
        self.spill_if_over_budget()
    }

    /// The most values kept in memory, with a spill configuration.
    fn budget_values(&self) -> Option<usize> {
        self.spill
            .as_ref()
            .map(|config| config.memory_budget_bytes / VALUE_BYTES)
    }

    /// Appends the rows of a `[n, dim]` tensor (read back from its device).
    pub fn push(&mut self, features: Tensor<2>) -> Result<(), ClusterError> {
        let [_, dim] = features.dims();
        if dim != self.dim {
            return Err(ClusterError::DimensionMismatch {
                expected: self.dim,
                got: dim,
            });
        }
        let values = read_f32(features)?;
        self.push_slice(&values)
    }

    /// Appends the pixels of `[B, dim, h, w]` feature maps, image by image in row-major pixel
    /// order (the order in which [`crate::cluster::PixelLabels`] later index them).
    pub fn push_feature_maps(&mut self, maps: Tensor<4>) -> Result<(), ClusterError> {
        let [batch, dim, height, width] = maps.dims();
        if dim != self.dim {
            return Err(ClusterError::DimensionMismatch {
                expected: self.dim,
                got: dim,
            });
        }
        // [B, D, h, w] -> [B, h, w, D] -> [B*h*w, D]
        let rows =
            crate::model::permute_axes(maps, [0, 2, 3, 1]).reshape([batch * height * width, dim]);
        self.push(rows)
    }

    /// Removes every row (and empties the spill file) but keeps the configuration, so the
    /// store can be refilled for the next epoch.
    pub fn clear(&mut self) -> Result<(), ClusterError> {
        self.memory.clear();
        self.memory.shrink_to_fit();
        self.len = 0;
        if let Some(spill) = &mut self.file {
            spill.rows = 0;
            let file = spill
                .file
                .get_mut()
                .unwrap_or_else(|poison| poison.into_inner());
            file.set_len(0)
                .map_err(|source| ClusterError::io("truncate", &spill.path, source))?;
        }
        Ok(())
    }

    /// Reads rows `range` as row-major f32 into `out` (replacing its contents).
    pub fn read_into(&self, range: Range<usize>, out: &mut Vec<f32>) -> Result<(), ClusterError> {
        self.check_range(&range)?;
        out.clear();
        out.resize(range.len() * self.dim, 0.0);
        let spilled = self.spilled_rows();
        let file_rows = range.start.min(spilled)..range.end.min(spilled);
        let (from_file, from_memory) = out.split_at_mut(file_rows.len() * self.dim);
        if !file_rows.is_empty() {
            self.read_file_rows(file_rows, from_file)?;
        }
        let memory_rows = range.start.max(spilled) - spilled..range.end.max(spilled) - spilled;
        let values = &self.memory[memory_rows.start * self.dim..memory_rows.end * self.dim];
        convert_parallel(values, from_memory);
        Ok(())
    }

    /// Rows `range` as a `[range.len(), dim]` f32 tensor on `device`.
    pub fn chunk(&self, range: Range<usize>, device: &Device) -> Result<Tensor<2>, ClusterError> {
        let mut values = Vec::new();
        self.read_into(range.clone(), &mut values)?;
        Ok(Tensor::from_data(
            TensorData::new(values, [range.len(), self.dim]),
            device,
        ))
    }

    /// The rows at `indices` (any order, repeats allowed) as row-major f32, in that order.
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<f32>, ClusterError> {
        if let Some(&index) = indices.iter().find(|&&index| index >= self.len) {
            return Err(ClusterError::OutOfRange {
                start: index,
                end: index + 1,
                len: self.len,
            });
        }
        let mut order: Vec<usize> = (0..indices.len()).collect();
        order.sort_by_key(|&position| indices[position]);
        let dim = self.dim;
        let spilled = self.spilled_rows();
        let mut out = vec![0.0; indices.len() * dim];
        // Sorted, so the spill file is read front to back.
        for &position in &order {
            let index = indices[position];
            let row = &mut out[position * dim..(position + 1) * dim];
            if index < spilled {
                self.read_file_rows(index..index + 1, row)?;
            } else {
                let start = (index - spilled) * dim;
                self.memory[start..start + dim].convert_to_f32_slice(row);
            }
        }
        Ok(out)
    }

    fn check_range(&self, range: &Range<usize>) -> Result<(), ClusterError> {
        if range.start > range.end || range.end > self.len {
            return Err(ClusterError::OutOfRange {
                start: range.start,
                end: range.end,
                len: self.len,
            });
        }
        Ok(())
    }

    fn read_file_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<(), ClusterError> {
        let Some(spill) = &self.file else {
            return Ok(());
        };
        let mut file = spill
            .file
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let offset = (rows.start * self.dim * VALUE_BYTES) as u64;
        file.seek(SeekFrom::Start(offset))
            .map_err(|source| ClusterError::io("seek in", &spill.path, source))?;
        let mut bytes = vec![0u8; out.len().min(IO_STEP_VALUES) * VALUE_BYTES];
        for piece in out.chunks_mut(IO_STEP_VALUES) {
            let bytes = &mut bytes[..piece.len() * VALUE_BYTES];
            file.read_exact(bytes)
                .map_err(|source| ClusterError::io("read", &spill.path, source))?;
            piece
                .par_chunks_mut(1 << 14)
                .zip(bytes.par_chunks(VALUE_BYTES << 14))
                .for_each(|(values, bytes)| {
                    for (value, pair) in values.iter_mut().zip(bytes.chunks_exact(VALUE_BYTES)) {
                        *value = f16::from_bits(u16::from_le_bytes([pair[0], pair[1]])).to_f32();
                    }
                });
        }
        Ok(())
    }

    fn spill_if_over_budget(&mut self) -> Result<(), ClusterError> {
        let Some(config) = &self.spill else {
            return Ok(());
        };
        if self.memory_bytes() <= config.memory_budget_bytes {
            return Ok(());
        }
        self.spill()
    }

    /// Moves the rows held in memory to the spill file (created on first use).
    fn spill(&mut self) -> Result<(), ClusterError> {
        let Some(config) = &self.spill else {
            return Ok(());
        };
        if self.memory.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(create_spill_file(&config.folder)?);
        }
        let Some(spill) = &mut self.file else {
            return Ok(());
        };
        let path = spill.path.clone();
        let file = spill
            .file
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        let offset = (spill.rows * self.dim * VALUE_BYTES) as u64;
        file.seek(SeekFrom::Start(offset))
            .map_err(|source| ClusterError::io("seek in", &path, source))?;
        let mut bytes = Vec::with_capacity(self.memory.len().min(IO_STEP_VALUES) * VALUE_BYTES);
        for piece in self.memory.chunks(IO_STEP_VALUES) {
            bytes.clear();
            bytes.extend(piece.iter().flat_map(|value| value.to_bits().to_le_bytes()));
            file.write_all(&bytes)
                .map_err(|source| ClusterError::io("write", &path, source))?;
        }
        file.flush()
            .map_err(|source| ClusterError::io("write", &path, source))?;
        spill.rows += self.memory.len() / self.dim;
        self.memory.clear();
        Ok(())
    }
}

/// Creates a fresh spill file in `folder`, unique to this process and store.
fn create_spill_file(folder: &Path) -> Result<SpillFile, ClusterError> {
    fs::create_dir_all(folder)
        .map_err(|source| ClusterError::io("create the folder of", folder, source))?;
    loop {
        let serial = SPILL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = folder.join(format!(
            "picie-features-{}-{serial}.f16",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                return Ok(SpillFile {
                    path,
                    file: Mutex::new(file),
                    rows: 0,
                });
            }
            // A stale file of an earlier process with our id: try the next name.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(ClusterError::io("create", &path, source)),
        }
    }
}

/// f16 -> f32 over rayon, in pieces large enough to amortise the task overhead.
fn convert_parallel(values: &[f16], out: &mut [f32]) {
    out.par_chunks_mut(1 << 16)
        .zip(values.par_chunks(1 << 16))
        .for_each(|(out, values)| values.convert_to_f32_slice(out));
}

/// Reads a float tensor back to the host as f32.
pub(crate) fn read_f32<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, ClusterError> {
    tensor
        .try_into_data()
        .map_err(|error| ClusterError::Device(format!("{error:?}")))?
        .try_into_vec_as::<f32>()
        .map_err(|error| ClusterError::Device(error.to_string()))
}
