//! What several subcommands share: the inference flags, progress bars, the device of a run.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use picie::config::TrainConfig;
use picie::device::DeviceChoice;
use picie::model::BackboneKind;
use picie::train::RunFolder;

/// How a trained network turns images into cluster maps (evaluation, segment, export).
#[derive(clap::Args, Clone, Default)]
pub(crate) struct InferenceArgs {
    /// Average each image's features with its mirror image's, true or false (default: the
    /// run's setting, off unless set).
    #[arg(long)]
    pub(crate) test_time_flip: Option<bool>,
    /// bilinear, or bilateral (cluster borders follow the image's edges) (default: the run's).
    #[arg(long)]
    pub(crate) upsampling: Option<String>,
}

impl InferenceArgs {
    /// Overrides the config's inference settings with the flags given.
    pub(crate) fn apply(&self, config: &mut TrainConfig) -> Result<()> {
        if let Some(flip) = self.test_time_flip {
            config.test_time_flip = flip;
        }
        if let Some(value) = &self.upsampling {
            config.upsampling = parse_choice("upsampling", value, "bilinear or bilateral")?;
        }
        Ok(())
    }
}

/// A config enum from its snake_case name, or an error listing the choices.
pub(crate) fn parse_choice<T: serde::de::DeserializeOwned>(
    flag: &str,
    value: &str,
    choices: &str,
) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown --{flag} '{value}': use {choices}"))
}

pub(crate) fn progress_bar(length: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// `device` if given, else the device the run was trained with.
pub(crate) fn device_for_run(
    run_dir: &std::path::Path,
    device: Option<DeviceChoice>,
) -> Result<DeviceChoice> {
    Ok(match device {
        Some(device) => device,
        None => RunFolder::open(run_dir)?.config()?.device,
    })
}

pub(crate) fn parse_backbones(text: &str) -> Result<Vec<BackboneKind>> {
    if text == "all" {
        return Ok(BackboneKind::ALL.to_vec());
    }
    Ok(vec![text.parse().map_err(anyhow::Error::msg)?])
}
