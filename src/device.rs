//! Choosing where tensors live: burn's wgpu backend on a real GPU, or the Flex CPU backend.
//!
//! `auto` takes a real GPU adapter when there is one and otherwise the CPU backend. A software
//! Vulkan adapter (lavapipe, SwiftShader) is not a GPU: on such machines burn's Flex backend is
//! many times faster, so `auto` does not pick it. `wgpu` forces the wgpu backend on whatever
//! adapter exists, which is how the wgpu code path is tested on machines without a GPU.

use std::fmt;
use std::str::FromStr;

use burn::cubecl::config::autotune::AutotuneLevel;
use burn::cubecl::config::cache::CacheConfig;
use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use burn::tensor::{Device, DeviceKind};
use serde::{Deserialize, Serialize};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A real GPU through wgpu if one exists, else the CPU backend.
    #[default]
    Auto,
    /// A real GPU through wgpu; an error if there is none.
    Gpu,
    /// burn's Flex CPU backend.
    Cpu,
    /// The wgpu backend on any adapter, software ones included.
    Wgpu,
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(DeviceError::UnknownChoice(other.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Auto => "auto",
            Self::Gpu => "gpu",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
        })
    }
}

/// Which burn backend a [`ComputeDevice`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's wgpu backend (CubeCL kernels on Vulkan/Metal/DX12).
    Wgpu,
    /// burn's Flex backend: pure Rust on the CPU.
    Flex,
}

/// Errors of device selection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `--device` got a value it does not know.
    #[error("unknown device '{0}': use auto, gpu, cpu or wgpu")]
    UnknownChoice(String),
    /// `--device gpu` on a machine without a GPU adapter.
    #[error(
        "no GPU adapter was found (adapters seen: {seen}); use --device cpu, or install your GPU's Vulkan/Metal/DX12 driver"
    )]
    NoGpu {
        /// The adapters wgpu did report, for the user to see why none qualified.
        seen: String,
    },
    /// `--device wgpu` on a machine without any wgpu adapter.
    #[error(
        "no wgpu adapter at all was found; install a Vulkan driver (e.g. Debian's mesa-vulkan-drivers) or use --device cpu"
    )]
    NoAdapter,
}

/// One adapter wgpu reports, in words.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. "NVIDIA H100" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Discrete, integrated, virtual, CPU or other.
    pub device_type: wgpu::DeviceType,
    /// Vulkan, Metal, DX12 or GL.
    pub backend: wgpu::Backend,
}

impl AdapterSummary {
    /// Whether this is a real GPU (not a software rasteriser on the CPU).
    pub fn is_real_gpu(&self) -> bool {
        matches!(
            self.device_type,
            wgpu::DeviceType::DiscreteGpu
                | wgpu::DeviceType::IntegratedGpu
                | wgpu::DeviceType::VirtualGpu
        )
    }
}

/// Lists the adapters wgpu can see on the compute-capable APIs (no GL: burn does not run on it).
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .map(|adapter| {
            let info = adapter.get_info();
            AdapterSummary {
                name: info.name,
                device_type: info.device_type,
                backend: info.backend,
            }
        })
        .collect()
}

/// A device ready for tensors, with a sentence that says what it is.
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    /// The burn device (without autodiff; call `.autodiff()` for training).
    pub device: Device,
    /// Which backend runs it.
    pub backend: BackendKind,
    /// One line for the user, e.g. "GPU: NVIDIA H100 (Vulkan, burn wgpu backend)".
    pub description: String,
}

impl ComputeDevice {
    /// burn's Flex CPU backend.
    pub fn cpu() -> Self {
        let threads = rayon::current_num_threads();
        Self {
            device: Device::flex(),
            backend: BackendKind::Flex,
            description: format!(
                "CPU: burn Flex backend, {threads} threads, {} kernels",
                cpu_simd_level()
            ),
        }
    }

    fn wgpu(adapter: &AdapterSummary, kind: DeviceKind) -> Self {
        configure_gpu_runtime(adapter.is_real_gpu());
        let what = if adapter.is_real_gpu() {
            "GPU"
        } else {
            "software adapter"
        };
        Self {
            device: Device::wgpu(kind),
            backend: BackendKind::Wgpu,
            description: format!(
                "{what}: {} ({:?}, burn wgpu backend)",
                adapter.name, adapter.backend
            ),
        }
    }
}

/// Settings of burn's GPU runtime (cubecl), fixed before its first device opens: autotune
/// results are kept in the application's cache folder (`gpu-tuning/`), so a second run does
/// not tune again, and on a software adapter autotune does the least work (it would time
/// candidate kernels on the CPU, for minutes, to choose for a device no one trains on). A
/// `cubecl.toml` or `CUBECL_*` variables of the user still win. [`select_device`] calls it;
/// code that makes a wgpu `Device` itself should call it first.
pub fn configure_gpu_runtime(real_gpu: bool) {
    let mut config = CubeClRuntimeConfig::from_current_dir();
    if matches!(config.environment.path, CacheConfig::Target)
        && let Ok(root) = crate::download::cache_root()
    {
        config.environment.path = CacheConfig::Directory(root.join("gpu-tuning"));
    }
    if !real_gpu {
        config.autotune.level = AutotuneLevel::Minimal;
    }
    // Only the first configuration of the process counts; later calls change nothing.
    let _ = CubeClRuntimeConfig::try_set(config.override_from_env());
}

/// The widest vector instructions the CPU kernels (the GEMMs of Flex and of the convolution
/// gradients) use on this processor: they choose at run time, so one binary runs everywhere.
pub fn cpu_simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "AVX2"
        } else {
            "SSE2"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// Gives the Vulkan drivers a private runtime folder when the session has none, so that
/// listing adapters on a headless machine does not print Mesa's `XDG_RUNTIME_DIR is invalid`
/// on every run. Call at the start of `main`, before any thread starts.
pub fn prepare_runtime_folder() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        let usable = std::env::var_os("XDG_RUNTIME_DIR")
            .map(std::path::PathBuf::from)
            .and_then(|path| std::fs::metadata(path).ok())
            .is_some_and(|meta| meta.is_dir());
        if usable {
            return;
        }
        let folder = std::env::temp_dir().join(format!(
            "picie-runtime-{}",
            std::env::var("USER").unwrap_or_default()
        ));
        let created = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&folder);
        if created.is_ok() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &folder) };
        }
    }
}

/// Picks the device for `choice`. For `auto` without a GPU, the returned description says that
/// the CPU backend is used and why, so callers can print it as the one line the user sees.
pub fn select_device(choice: DeviceChoice) -> Result<ComputeDevice, DeviceError> {
    if choice == DeviceChoice::Cpu {
        return Ok(ComputeDevice::cpu());
    }
    let adapters = list_adapters();
    let gpu = first_real_gpu(&adapters);
    match (choice, gpu) {
        (DeviceChoice::Auto | DeviceChoice::Gpu | DeviceChoice::Wgpu, Some((adapter, kind))) => {
            Ok(ComputeDevice::wgpu(adapter, kind))
        }
        (DeviceChoice::Auto, None) => {
            let mut device = ComputeDevice::cpu();
            let reason = if adapters.is_empty() {
                "no GPU adapter found".to_owned()
            } else {
                format!("no GPU adapter found, only {}", describe(&adapters))
            };
            device.description = format!("{} ({reason})", device.description);
            Ok(device)
        }
        (DeviceChoice::Gpu, None) => Err(DeviceError::NoGpu {
            seen: if adapters.is_empty() {
                "none".to_owned()
            } else {
                describe(&adapters)
            },
        }),
        (DeviceChoice::Wgpu, None) => {
            let adapter = adapters.first().ok_or(DeviceError::NoAdapter)?;
            Ok(ComputeDevice::wgpu(adapter, DeviceKind::Cpu))
        }
        (DeviceChoice::Cpu, _) => Ok(ComputeDevice::cpu()),
    }
}

/// The first real GPU and the burn selector that names it (burn counts each type separately).
fn first_real_gpu(adapters: &[AdapterSummary]) -> Option<(&AdapterSummary, DeviceKind)> {
    [
        wgpu::DeviceType::DiscreteGpu,
        wgpu::DeviceType::IntegratedGpu,
        wgpu::DeviceType::VirtualGpu,
    ]
    .into_iter()
    .find_map(|wanted| {
        let adapter = adapters
            .iter()
            .find(|adapter| adapter.device_type == wanted)?;
        let kind = match wanted {
            wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(0),
            wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
            _ => DeviceKind::VirtualGpu(0),
        };
        Some((adapter, kind))
    })
}

fn describe(adapters: &[AdapterSummary]) -> String {
    adapters
        .iter()
        .map(|adapter| format!("{} [{:?}]", adapter.name, adapter.device_type))
        .collect::<Vec<_>>()
        .join(", ")
}
