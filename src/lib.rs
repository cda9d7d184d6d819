//! PiCIE Explorer engine: unsupervised semantic segmentation by clustering pixel features
//! with invariance and equivariance (PiCIE, CVPR 2021), on burn.
//!
//! The engine has no GUI dependency: the desktop app (feature `gui`) and the headless `picie`
//! CLI are thin layers over these modules.
#![warn(missing_docs)]

pub mod allocator;
#[cfg(feature = "gui")]
pub mod app;
pub mod bank;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod data;
pub mod device;
pub mod download;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod labelmap;
pub mod linalg;
pub mod loss;
pub mod model;
pub mod palette;
pub mod parallel;
pub mod run;
pub mod segment;
#[cfg(feature = "remote")]
pub mod serve;
pub mod session;
pub mod train;
