//! Weight files: torchvision state_dicts (.pth, zip format) and our own checkpoints.
//!
//! Every network walks its parameters with a [`ParamVisitor`] under torchvision's key names, so
//! importing a torchvision file and loading or saving our own checkpoint share one mapping. Our
//! checkpoints are safetensors files in the same (PyTorch) layout, with a `backbone.` and an
//! `fpn.` prefix, which also makes them readable from Python.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::module::RunningState;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear};
use burn::store::pytorch_reader::{DType as TorchDType, PytorchReader};
use burn::tensor::{Device, Tensor, TensorData};

use super::torch_zip::{StorageType, decode_floats};
use crate::fsutil;

/// Errors of reading, matching and writing weights. Each names the file and, where there is
/// one, the tensor key.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file does not exist or cannot be opened.
    #[error(
        "cannot read weights file {path}: {reason}. Check the path, or pass --weights with a torchvision .pth file"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },
    /// The file is not a PyTorch zip state_dict nor one of our safetensors checkpoints, or is
    /// truncated or corrupt.
    #[error(
        "weights file {path} is not a valid state_dict ({reason}); it may be truncated or corrupt: download it again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A network checkpoint of another backbone than the one asked for.
    #[error(
        "weights file {path} is a {found} checkpoint but {asked} was asked for; choose \
         --backbone {found_flag}, or a checkpoint of {asked}"
    )]
    WrongBackbone {
        /// The file.
        path: PathBuf,
        /// The checkpoint's backbone, in words.
        found: String,
        /// Its `--backbone` value.
        found_flag: String,
        /// The backbone asked for, in words.
        asked: String,
    },
    /// A tensor the network needs is not in the file.
    #[error("weights file {path} has no tensor '{key}' needed by {network}; {hint}")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The missing key.
        key: String,
        /// The network being loaded.
        network: String,
        /// What the file does hold, to tell the user which model it belongs to.
        hint: String,
    },
    /// A tensor has the wrong shape for the network.
    #[error(
        "weights file {path}: tensor '{key}' has shape {found:?} but {network} needs {expected:?}; is this file for another backbone?"
    )]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The network being loaded.
        network: String,
        /// The shape the network needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's element type cannot become f32.
    #[error("weights file {path}: tensor '{key}' has element type {dtype}, expected a float type")]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type found.
        dtype: String,
    },
    /// Writing a checkpoint failed; nothing was replaced.
    #[error("cannot write weights to {path}: {source}. Check free disk space and write permission")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One float tensor of a state_dict, in PyTorch layout.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// All float tensors of a weights file by key, plus the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// Where the tensors came from (for error messages).
    pub source: PathBuf,
    /// Tensors by key.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Metadata of a safetensors file (empty for .pth files).
    pub metadata: HashMap<String, String>,
}

impl StateDict {
    /// Reads a torchvision `.pth` (zip) state_dict or one of our safetensors checkpoints,
    /// recognised by content, not by extension.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        if path.is_dir() {
            return Err(WeightsError::Unreadable {
                path: path.to_owned(),
                reason: "it is a folder; give the .pth or .safetensors file itself".into(),
            });
        }
        let mut magic = [0u8; 2];
        {
            use std::io::Read;
            let mut file = std::fs::File::open(path).map_err(|error| WeightsError::Unreadable {
                path: path.to_owned(),
                reason: error.to_string(),
            })?;
            file.read_exact(&mut magic)
                .map_err(|_| WeightsError::Corrupt {
                    path: path.to_owned(),
                    reason: "the file is empty".into(),
                })?;
        }
        if &magic == b"PK" || magic[0] == 0x80 {
            Self::read_pytorch(path)
        } else {
            Self::read_safetensors(path)
        }
    }

    /// Reads a PyTorch state_dict: the zip format directly (see [`super::torch_zip`]), other
    /// formats (legacy pickle, tar) through burn's reader.
    pub fn read_pytorch(path: &Path) -> Result<Self, WeightsError> {
        let corrupt = |reason: String| WeightsError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|error| WeightsError::Unreadable {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        let tensors = if bytes.starts_with(b"PK") {
            super::torch_zip::read_zip_state_dict(&bytes).map_err(corrupt)?
        } else {
            drop(bytes);
            read_with_burn(path).map_err(corrupt)?
        };
        if tensors.is_empty() {
            return Err(corrupt("it holds no float tensors".into()));
        }
        Ok(Self {
            source: path.to_owned(),
            tensors,
            metadata: HashMap::new(),
        })
    }

    /// Reads a safetensors file (our checkpoints, or fixtures).
    pub fn read_safetensors(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|error| WeightsError::Unreadable {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        let corrupt = |reason: String| WeightsError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|error| corrupt(error.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|error| corrupt(error.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (key, view) in file.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(WeightsError::UnsupportedType {
                    path: path.to_owned(),
                    key,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect();
            tensors.insert(
                key,
                StoredTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Self {
            source: path.to_owned(),
            tensors,
            metadata,
        })
    }

    /// Writes the tensors and metadata as a safetensors file, atomically.
    pub fn write_safetensors(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(key, tensor)| {
                let data = tensor
                    .values
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect();
                (key.clone(), data, tensor.shape.clone())
            })
            .collect();
        let views = bytes.iter().map(|(key, data, shape)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("the byte length matches the shape by construction");
            (key.clone(), view)
        });
        let metadata = (!self.metadata.is_empty()).then(|| self.metadata.clone());
        let serialized =
            safetensors::serialize(views, metadata).map_err(|error| WeightsError::Write {
                path: path.to_owned(),
                source: std::io::Error::other(error.to_string()),
            })?;
        fsutil::write_bytes_atomic(path, &serialized).map_err(|source| WeightsError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// A tensor as a burn tensor of rank `D` on `device`, checked against `expected` dims.
    pub fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Option<Tensor<D>> {
        let stored = self.tensors.get(key)?;
        (stored.shape.len() == D).then(|| {
            Tensor::from_data(
                TensorData::new(stored.values.clone(), stored.shape.clone()),
                device,
            )
        })
    }
}

/// Walks a network's weights by torchvision key. Implemented by the loader and the writer.
pub trait ParamVisitor {
    /// A convolution: `{key}.weight` `[out, in/groups, k, k]` and, if it has one, `{key}.bias`.
    fn conv2d(&mut self, key: &str, conv: &mut Conv2d) -> Result<(), WeightsError>;
    /// A BatchNorm: `{key}.weight`, `.bias`, `.running_mean`, `.running_var`.
    fn batch_norm(&mut self, key: &str, norm: &mut BatchNorm) -> Result<(), WeightsError>;
    /// A linear layer: `{key}.weight` `[out, in]` (PyTorch layout) and `{key}.bias`.
    fn linear(&mut self, key: &str, linear: &mut Linear) -> Result<(), WeightsError>;
    /// Whether the source holds `key`, so optional parts (classifiers) are created to be
    /// loaded. Visitors that only read the network answer `false`.
    fn provides(&self, key: &str) -> bool;
}

/// Adds a prefix to every key before passing it on (e.g. `backbone.` in our checkpoints).
pub struct Prefixed<'a> {
    prefix: String,
    inner: &'a mut dyn ParamVisitor,
}

impl<'a> Prefixed<'a> {
    /// Wraps `inner`, prefixing keys with `prefix`.
    pub fn new(prefix: &str, inner: &'a mut dyn ParamVisitor) -> Self {
        Self {
            prefix: prefix.to_owned(),
            inner,
        }
    }
}

impl ParamVisitor for Prefixed<'_> {
    fn conv2d(&mut self, key: &str, conv: &mut Conv2d) -> Result<(), WeightsError> {
        self.inner.conv2d(&format!("{}{key}", self.prefix), conv)
    }
    fn batch_norm(&mut self, key: &str, norm: &mut BatchNorm) -> Result<(), WeightsError> {
        self.inner
            .batch_norm(&format!("{}{key}", self.prefix), norm)
    }
    fn linear(&mut self, key: &str, linear: &mut Linear) -> Result<(), WeightsError> {
        self.inner.linear(&format!("{}{key}", self.prefix), linear)
    }
    fn provides(&self, key: &str) -> bool {
        self.inner.provides(&format!("{}{key}", self.prefix))
    }
}

/// Copies tensors from a [`StateDict`] into a network, checking every key and shape.
pub struct StateDictLoader<'a> {
    dict: &'a StateDict,
    device: Device,
    network: String,
    used: BTreeSet<String>,
    param_ids: BTreeMap<String, u64>,
}

impl<'a> StateDictLoader<'a> {
    /// A loader that creates tensors on `device`; `network` names the model in errors.
    pub fn new(dict: &'a StateDict, device: &Device, network: &str) -> Self {
        Self {
            dict,
            device: device.clone(),
            network: network.to_owned(),
            used: BTreeSet::new(),
            param_ids: dict
                .metadata
                .get(PARAM_IDS_KEY)
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or_default(),
        }
    }

    /// Keys of the file that no parameter took (besides integer buffers, which are skipped).
    pub fn unused_keys(&self) -> Vec<String> {
        self.dict
            .tensors
            .keys()
            .filter(|key| !self.used.contains(*key))
            .cloned()
            .collect()
    }

    fn take<const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
    ) -> Result<Tensor<D>, WeightsError> {
        let stored = self.dict.tensors.get(key).ok_or_else(|| {
            let sample: Vec<&str> = self
                .dict
                .tensors
                .keys()
                .take(4)
                .map(String::as_str)
                .collect();
            WeightsError::MissingKey {
                path: self.dict.source.clone(),
                key: key.to_owned(),
                network: self.network.clone(),
                hint: format!(
                    "the file has {} tensors such as {}; is it a state_dict of another model?",
                    self.dict.tensors.len(),
                    sample.join(", ")
                ),
            }
        })?;
        if stored.shape != expected {
            return Err(WeightsError::ShapeMismatch {
                path: self.dict.source.clone(),
                key: key.to_owned(),
                network: self.network.clone(),
                expected: expected.to_vec(),
                found: stored.shape.clone(),
            });
        }
        self.used.insert(key.to_owned());
        Ok(Tensor::from_data(
            TensorData::new(stored.values.clone(), expected),
            &self.device,
        ))
    }
}

/// Metadata key of our checkpoints that maps weight keys to burn parameter ids.
const PARAM_IDS_KEY: &str = "param_ids";

impl StateDictLoader<'_> {
    /// Replaces a parameter's value. Its id becomes the one saved with the checkpoint, if any,
    /// else stays as it was: optimiser state is keyed by parameter id, so a resumed run finds
    /// its Adam moments again.
    fn set_param<const D: usize>(&self, key: &str, param: &mut Param<Tensor<D>>, value: Tensor<D>) {
        let id = self
            .param_ids
            .get(key)
            .map(|&id| burn::module::ParamId::from(id))
            .unwrap_or(param.id);
        let mut replacement = Param::from_tensor(value);
        replacement.id = id;
        *param = replacement;
    }
}

impl ParamVisitor for StateDictLoader<'_> {
    fn conv2d(&mut self, key: &str, conv: &mut Conv2d) -> Result<(), WeightsError> {
        let weight = self.take(&format!("{key}.weight"), conv.weight.dims())?;
        self.set_param(&format!("{key}.weight"), &mut conv.weight, weight);
        if let Some(bias) = &mut conv.bias {
            let value = self.take(&format!("{key}.bias"), bias.dims())?;
            self.set_param(&format!("{key}.bias"), bias, value);
        }
        Ok(())
    }

    fn batch_norm(&mut self, key: &str, norm: &mut BatchNorm) -> Result<(), WeightsError> {
        let dims = norm.gamma.dims();
        let gamma = self.take(&format!("{key}.weight"), dims)?;
        let beta = self.take(&format!("{key}.bias"), dims)?;
        let mean = self.take(&format!("{key}.running_mean"), dims)?;
        let var = self.take(&format!("{key}.running_var"), dims)?;
        self.set_param(&format!("{key}.weight"), &mut norm.gamma, gamma);
        self.set_param(&format!("{key}.bias"), &mut norm.beta, beta);
        norm.running_mean = RunningState::new(mean);
        norm.running_var = RunningState::new(var);
        Ok(())
    }

    fn linear(&mut self, key: &str, linear: &mut Linear) -> Result<(), WeightsError> {
        let [inputs, outputs] = linear.weight.dims();
        // PyTorch stores [out, in]; burn computes x W with W [in, out].
        let weight: Tensor<2> = self.take(&format!("{key}.weight"), [outputs, inputs])?;
        self.set_param(
            &format!("{key}.weight"),
            &mut linear.weight,
            weight.transpose(),
        );
        if let Some(bias) = &mut linear.bias {
            let value = self.take(&format!("{key}.bias"), bias.dims())?;
            self.set_param(&format!("{key}.bias"), bias, value);
        }
        Ok(())
    }

    fn provides(&self, key: &str) -> bool {
        self.dict.tensors.contains_key(key)
    }
}

/// Reads a network's weights into a [`StateDict`] in PyTorch layout.
#[derive(Default)]
pub struct StateDictWriter {
    /// The tensors collected so far.
    pub dict: StateDict,
    param_ids: BTreeMap<String, u64>,
}

impl StateDictWriter {
    /// The collected tensors, with the parameter ids in the metadata.
    pub fn finish(mut self) -> StateDict {
        if let Ok(ids) = serde_json::to_string(&self.param_ids) {
            self.dict.metadata.insert(PARAM_IDS_KEY.into(), ids);
        }
        self.dict
    }

    fn put_param<const D: usize>(&mut self, key: String, param: &Param<Tensor<D>>) {
        self.param_ids.insert(key.clone(), param.id.val());
        self.put(key, param.val());
    }

    fn put<const D: usize>(&mut self, key: String, tensor: Tensor<D>) {
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        self.dict
            .tensors
            .insert(key, StoredTensor { shape, values });
    }
}

impl ParamVisitor for StateDictWriter {
    fn conv2d(&mut self, key: &str, conv: &mut Conv2d) -> Result<(), WeightsError> {
        self.put_param(format!("{key}.weight"), &conv.weight);
        if let Some(bias) = &conv.bias {
            self.put_param(format!("{key}.bias"), bias);
        }
        Ok(())
    }

    fn batch_norm(&mut self, key: &str, norm: &mut BatchNorm) -> Result<(), WeightsError> {
        self.put_param(format!("{key}.weight"), &norm.gamma);
        self.put_param(format!("{key}.bias"), &norm.beta);
        self.put(format!("{key}.running_mean"), norm.running_mean.value());
        self.put(format!("{key}.running_var"), norm.running_var.value());
        Ok(())
    }

    fn linear(&mut self, key: &str, linear: &mut Linear) -> Result<(), WeightsError> {
        // Saved in PyTorch layout; the id still names the (transposed) parameter.
        self.param_ids
            .insert(format!("{key}.weight"), linear.weight.id.val());
        self.put(format!("{key}.weight"), linear.weight.val().transpose());
        if let Some(bias) = &linear.bias {
            self.put_param(format!("{key}.bias"), bias);
        }
        Ok(())
    }

    fn provides(&self, _key: &str) -> bool {
        false
    }
}

/// Reads a legacy-format PyTorch file with burn's reader.
fn read_with_burn(path: &Path) -> Result<BTreeMap<String, StoredTensor>, String> {
    let reader = PytorchReader::new(path).map_err(|error| error.to_string())?;
    let mut tensors = BTreeMap::new();
    for (key, tensor) in reader.into_tensors() {
        let dtype = tensor.dtype();
        // Integer buffers such as BatchNorm's num_batches_tracked carry no weights.
        if !matches!(
            dtype,
            TorchDType::F32 | TorchDType::F16 | TorchDType::BF16 | TorchDType::F64
        ) {
            continue;
        }
        let shape = tensor.shape().to_vec();
        let bytes = tensor
            .read()
            .map_err(|error| format!("tensor '{key}': {error}"))?;
        let kind = match dtype {
            TorchDType::F32 => StorageType::F32,
            TorchDType::F64 => StorageType::F64,
            TorchDType::F16 => StorageType::F16,
            _ => StorageType::BF16,
        };
        let values = decode_floats(kind, &bytes);
        tensors.insert(key, StoredTensor { shape, values });
    }
    Ok(tensors)
}

/// Overwrites every weight with values from a seeded generator: PyTorch's default layer init
/// (uniform in +-1/sqrt(fan_in) for weights and biases; BatchNorm scale 1, shift 0). burn's
/// own initialisers draw from a process-wide generator, which other threads share; this keeps
/// a run's start identical for a given seed whatever else runs.
pub struct SeededInit {
    rng: rand_chacha::ChaCha8Rng,
    device: Device,
}

impl SeededInit {
    /// An initialiser for tensors on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        use rand::SeedableRng;
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f32) -> Tensor<D> {
        use rand::Rng;
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    fn replace<const D: usize>(param: &mut Param<Tensor<D>>, value: Tensor<D>) {
        let id = param.id;
        let mut replacement = Param::from_tensor(value);
        replacement.id = id;
        *param = replacement;
    }
}

impl ParamVisitor for SeededInit {
    fn conv2d(&mut self, _key: &str, conv: &mut Conv2d) -> Result<(), WeightsError> {
        let dims = conv.weight.dims();
        let fan_in = (dims[1] * dims[2] * dims[3]).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weight = self.uniform(dims, bound);
        Self::replace(&mut conv.weight, weight);
        if let Some(bias) = &mut conv.bias {
            let value = self.uniform(bias.dims(), bound);
            Self::replace(bias, value);
        }
        Ok(())
    }

    fn batch_norm(&mut self, _key: &str, _norm: &mut BatchNorm) -> Result<(), WeightsError> {
        // Already ones and zeros, with running statistics zero and one.
        Ok(())
    }

    fn linear(&mut self, _key: &str, linear: &mut Linear) -> Result<(), WeightsError> {
        let dims = linear.weight.dims();
        let bound = 1.0 / (dims[0].max(1) as f32).sqrt();
        let weight = self.uniform(dims, bound);
        Self::replace(&mut linear.weight, weight);
        if let Some(bias) = &mut linear.bias {
            let value = self.uniform(bias.dims(), bound);
            Self::replace(bias, value);
        }
        Ok(())
    }

    fn provides(&self, _key: &str) -> bool {
        false
    }
}
