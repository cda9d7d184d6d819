//! Decoded images (or labels) of one size, one record after another: in memory for datasets
//! that fit, in a cache file for those that do not, so memory stays bounded whatever the
//! number of images.
//!
//! The cache file is read with positioned reads, not a memory map: every page of a map that
//! is touched counts in the process's resident memory until it is released, and releasing it
//! (`madvise`) while slices of it are borrowed is not sound in Rust. Positioned reads keep
//! only the records in use in the process and leave caching to the operating system's page
//! cache, which gives the memory back under pressure.

use std::borrow::Cow;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A record could not be read back from a cache file.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read image {index} back from the decoded-image cache {}: {source}; the file may \
     have been deleted or the disk may be failing: start the run again to decode afresh",
    .path.display()
)]
pub struct StackReadError {
    /// The cache file.
    pub path: PathBuf,
    /// The record that failed.
    pub index: usize,
    /// What the operating system said.
    pub source: io::Error,
}

#[derive(Debug)]
enum Storage {
    Memory(Vec<u8>),
    File { file: File, path: PathBuf },
}

impl Drop for Storage {
    /// A cache file lives as long as the data read from it: the next run decodes afresh, so
    /// a run folder does not keep gigabytes of pixels it can make again.
    fn drop(&mut self) {
        if let Storage::File { path, .. } = self {
            let _ = fs::remove_file(&*path);
            // The cache folder too, once its last file is gone (fails while others remain).
            if let Some(folder) = path.parent() {
                let _ = fs::remove_dir(folder);
            }
        }
    }
}

/// Fixed-size records (RGB images or label maps of one size), in dataset order. Cloning and
/// [`ImageStack::subset`] share the storage.
#[derive(Debug, Clone)]
pub struct ImageStack {
    record_bytes: usize,
    storage: Arc<Storage>,
    /// The stored record of each index, when they are not stored in order (a subset, or a
    /// cache file with the slots of skipped files left empty).
    slots: Option<Arc<[usize]>>,
    len: usize,
}

impl ImageStack {
    /// A stack in memory holding `records`, each `record_bytes` long.
    ///
    /// # Panics
    /// When a record is not `record_bytes` long.
    pub fn from_records(record_bytes: usize, records: Vec<Vec<u8>>) -> Self {
        let len = records.len();
        let mut bytes = Vec::with_capacity(len * record_bytes);
        for record in records {
            assert_eq!(record.len(), record_bytes, "every record has the same size");
            bytes.extend_from_slice(&record);
        }
        Self {
            record_bytes,
            storage: Arc::new(Storage::Memory(bytes)),
            slots: None,
            len,
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of one record.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    /// The cache file, when the records are on disk.
    pub fn cache_file(&self) -> Option<&Path> {
        match self.storage.as_ref() {
            Storage::Memory(_) => None,
            Storage::File { path, .. } => Some(path),
        }
    }

    /// Record `index`: borrowed from memory, or read from the cache file.
    ///
    /// # Panics
    /// When `index` is not below [`ImageStack::len`].
    pub fn get(&self, index: usize) -> Result<Cow<'_, [u8]>, StackReadError> {
        assert!(index < self.len, "record {index} of {}", self.len);
        let slot = self.slots.as_ref().map_or(index, |slots| slots[index]);
        let start = slot * self.record_bytes;
        match self.storage.as_ref() {
            Storage::Memory(bytes) => Ok(Cow::Borrowed(&bytes[start..start + self.record_bytes])),
            Storage::File { file, path } => {
                let mut record = vec![0; self.record_bytes];
                read_exact_at(file, &mut record, start as u64).map_err(|source| {
                    StackReadError {
                        path: path.clone(),
                        index,
                        source,
                    }
                })?;
                Ok(Cow::Owned(record))
            }
        }
    }

    /// Records `indices`, in that order.
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<Cow<'_, [u8]>>, StackReadError> {
        indices.iter().map(|&index| self.get(index)).collect()
    }

    /// Every record, copied out (for tests and small stacks).
    pub fn to_records(&self) -> Result<Vec<Vec<u8>>, StackReadError> {
        (0..self.len)
            .map(|index| self.get(index).map(Cow::into_owned))
            .collect()
    }

    /// The records at `indices`, in that order, sharing this stack's storage.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let slots: Arc<[usize]> = indices
            .iter()
            .map(|&index| {
                assert!(index < self.len, "record {index} of {}", self.len);
                self.slots.as_ref().map_or(index, |slots| slots[index])
            })
            .collect();
        Self {
            record_bytes: self.record_bytes,
            storage: Arc::clone(&self.storage),
            len: slots.len(),
            slots: Some(slots),
        }
    }
}

/// Where [`StackWriter`] puts the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackTarget {
    /// In memory.
    Memory,
    /// In a cache file at this path (written next to it, then renamed into place).
    File(PathBuf),
}

/// Collects `slots` records written in any order from several threads, then becomes an
/// [`ImageStack`] of the slots that were kept.
pub struct StackWriter {
    record_bytes: usize,
    slots: usize,
    sink: Sink,
}

enum Sink {
    Memory(Mutex<Vec<u8>>),
    File {
        file: File,
        partial: PathBuf,
        path: PathBuf,
    },
}

impl StackWriter {
    /// Room for `slots` records of `record_bytes` at `target`. A cache file is created (any
    /// old one replaced) at its full size at once, so a full disk is found before decoding.
    pub fn new(target: &StackTarget, record_bytes: usize, slots: usize) -> io::Result<Self> {
        let sink = match target {
            StackTarget::Memory => Sink::Memory(Mutex::new(vec![0; record_bytes * slots])),
            StackTarget::File(path) => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                let partial = path.with_extension("partial");
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&partial)?;
                file.set_len((record_bytes * slots) as u64)?;
                Sink::File {
                    file,
                    partial,
                    path: path.clone(),
                }
            }
        };
        Ok(Self {
            record_bytes,
            slots,
            sink,
        })
    }

    /// Writes `record` into `slot`; safe to call from several threads for different slots.
    ///
    /// # Panics
    /// When `slot` is out of range or `record` is not `record_bytes` long.
    pub fn write(&self, slot: usize, record: &[u8]) -> io::Result<()> {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        assert_eq!(record.len(), self.record_bytes, "record size");
        let start = slot * self.record_bytes;
        match &self.sink {
            Sink::Memory(bytes) => {
                let mut bytes = bytes.lock().unwrap_or_else(|poison| poison.into_inner());
                bytes[start..start + self.record_bytes].copy_from_slice(record);
                Ok(())
            }
            Sink::File { file, .. } => write_all_at(file, record, start as u64),
        }
    }

    /// The stack of the records in `kept` slots, in that order. A cache file is renamed into
    /// place first.
    pub fn finish(self, kept: &[usize]) -> io::Result<ImageStack> {
        let identity = kept.len() == self.slots && kept.iter().enumerate().all(|(i, &s)| i == s);
        let (storage, slots) = match self.sink {
            Sink::Memory(bytes) => {
                let bytes = bytes
                    .into_inner()
                    .unwrap_or_else(|poison| poison.into_inner());
                if identity {
                    (Storage::Memory(bytes), None)
                } else {
                    // Compacted, so skipped files cost no memory.
                    let mut compact = Vec::with_capacity(kept.len() * self.record_bytes);
                    for &slot in kept {
                        let start = slot * self.record_bytes;
                        compact.extend_from_slice(&bytes[start..start + self.record_bytes]);
                    }
                    (Storage::Memory(compact), None)
                }
            }
            Sink::File {
                file,
                partial,
                path,
            } => {
                drop(file);
                fs::rename(&partial, &path)?;
                let file = File::open(&path)?;
                let slots = (!identity).then(|| kept.iter().copied().collect::<Arc<[usize]>>());
                (Storage::File { file, path }, slots)
            }
        };
        Ok(ImageStack {
            record_bytes: self.record_bytes,
            storage: Arc::new(storage),
            slots,
            len: kept.len(),
        })
    }

    /// Drops the writer and its partial cache file.
    pub fn discard(self) {
        if let Sink::File { file, partial, .. } = self.sink {
            drop(file);
            let _ = fs::remove_file(partial);
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(unix)]
fn write_all_at(file: &File, buffer: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buffer, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buffer: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buffer.is_empty() {
        match file.seek_read(buffer, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            read => {
                buffer = &mut buffer[read..];
                offset += read as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buffer: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buffer.is_empty() {
        match file.seek_write(buffer, offset)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            written => {
                buffer = &buffer[written..];
                offset += written as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Vec<u8>> {
        (0..5u8).map(|i| vec![i; 6]).collect()
    }

    #[test]
    fn memory_and_file_stacks_hold_the_same_records_in_any_write_order() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("cache").join("bases.bin");
        for target in [StackTarget::Memory, StackTarget::File(path.clone())] {
            let writer = StackWriter::new(&target, 6, 5).unwrap();
            for slot in [3, 0, 4, 1, 2] {
                writer.write(slot, &records()[slot]).unwrap();
            }
            let stack = writer.finish(&[0, 1, 2, 3, 4]).unwrap();
            assert_eq!(stack.to_records().unwrap(), records());
            assert_eq!(stack.cache_file().is_some(), target != StackTarget::Memory);
        }
        assert!(!path.with_extension("partial").exists());
        // The cache file goes with the last stack that reads it.
        let stack = StackWriter::new(&StackTarget::File(path.clone()), 6, 1)
            .unwrap()
            .finish(&[0])
            .unwrap();
        let subset = stack.subset(&[0]);
        drop(stack);
        assert!(path.is_file());
        drop(subset);
        assert!(!path.exists() && !path.parent().unwrap().exists());
    }

    #[test]
    fn skipped_slots_and_subsets_keep_dataset_order() {
        let folder = tempfile::tempdir().unwrap();
        for target in [
            StackTarget::Memory,
            StackTarget::File(folder.path().join("labels.bin")),
        ] {
            let writer = StackWriter::new(&target, 6, 5).unwrap();
            for (slot, record) in records().iter().enumerate() {
                writer.write(slot, record).unwrap();
            }
            // Slot 1 was a file that failed to decode.
            let stack = writer.finish(&[0, 2, 3, 4]).unwrap();
            assert_eq!(stack.len(), 4);
            assert_eq!(stack.get(1).unwrap().as_ref(), &[2; 6]);
            let subset = stack.subset(&[3, 0]);
            assert_eq!(subset.to_records().unwrap(), vec![vec![4; 6], vec![0; 6]]);
            assert_eq!(subset.subset(&[1]).get(0).unwrap().as_ref(), &[0; 6]);
        }
    }

    #[test]
    fn a_deleted_cache_file_is_an_error_naming_it() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("bases.bin");
        let writer = StackWriter::new(&StackTarget::File(path.clone()), 6, 2).unwrap();
        writer.write(0, &[1; 6]).unwrap();
        writer.write(1, &[2; 6]).unwrap();
        let stack = writer.finish(&[0, 1]).unwrap();
        // Truncated under the reader, as a user deleting and recreating it would.
        File::create(&path).unwrap();
        let error = stack.get(1).unwrap_err().to_string();
        assert!(error.contains("bases.bin"), "{error}");
        assert!(error.contains("image 1"), "{error}");
    }
}
