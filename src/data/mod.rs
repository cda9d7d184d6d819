//! Image folders, label folders and the procedural demo dataset.
//!
//! [`ImageFolder`] finds the images (and optional evaluation labels) under a folder,
//! [`ImageFolder::load`] decodes them in parallel straight to the [`BaseTransform`] size, and
//! [`write_demo_dataset`] makes a small labelled dataset for users without data of their own.

mod dataset;
mod decode;
mod demo;
mod stack;
mod training;
pub mod views;

pub use dataset::{
    BaseTransform, DatasetError, IGNORE_LABEL, IMAGE_EXTENSIONS, ImageEntry, ImageFolder,
    LoadedDataset, LoadedImage, MAX_DECODED_BYTES, MAX_IMAGE_SIDE, SkippedFile, read_class_names,
};
pub use decode::{load_label, load_one};
pub use demo::{DEMO_CLASSES, DemoOptions, DemoSummary, generate_demo_scene, write_demo_dataset};
pub use stack::{ImageStack, StackReadError, StackTarget, StackWriter};
pub use training::{DEFAULT_DECODED_MEMORY_BUDGET, DecodedStorage, TrainingData};
