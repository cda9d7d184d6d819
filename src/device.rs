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
///
/// Written to a run's `config.json` as its command-line spelling ("auto", "cpu",
/// "remote:ws://gpu-box:3000"); a remote server's token is never written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
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
    /// The device of a `picie serve` server, through burn's remote backend.
    Remote(RemoteServer),
}

impl DeviceChoice {
    /// The local choices, in the order a menu lists them.
    pub const LOCAL: [DeviceChoice; 4] = [Self::Auto, Self::Gpu, Self::Cpu, Self::Wgpu];

    /// Whether this names a remote server.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Remote(_))
    }
}

/// Where a `picie serve` server listens, and the token it asks for.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteServer {
    /// `ws://HOST:PORT`.
    pub url: String,
    /// The server's token; `None` takes [`default_remote_token`].
    pub token: Option<String>,
}

impl RemoteServer {
    /// The server at `address`: `ws://HOST:PORT`, or `HOST:PORT` (WebSocket is the only
    /// transport offered, so the scheme may be left out).
    pub fn parse(address: &str) -> Result<Self, DeviceError> {
        let address = address.trim();
        let rest = address.strip_prefix("ws://").unwrap_or(address);
        let rest = rest.trim_end_matches('/');
        let port_ok = rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if address.contains("://") && !address.starts_with("ws://") || !port_ok {
            return Err(DeviceError::BadRemoteAddress(address.to_owned()));
        }
        Ok(Self {
            url: format!("ws://{rest}"),
            token: None,
        })
    }
}

impl fmt::Debug for RemoteServer {
    // The token is a secret: it stays out of logs and panic messages.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RemoteServer")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// The environment variable a remote server's token is read from.
pub const REMOTE_TOKEN_VARIABLE: &str = "PICIE_REMOTE_TOKEN";

static DEFAULT_REMOTE_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the token used for remote servers whose choice carries none (the CLI's
/// `--token-file`). Only the first call counts.
pub fn set_default_remote_token(token: String) {
    let _ = DEFAULT_REMOTE_TOKEN.set(token);
}

/// The token for a remote server named without one: the one set by
/// [`set_default_remote_token`], else `PICIE_REMOTE_TOKEN`.
pub fn default_remote_token() -> Option<String> {
    DEFAULT_REMOTE_TOKEN
        .get()
        .cloned()
        .or_else(|| std::env::var(REMOTE_TOKEN_VARIABLE).ok())
        .filter(|token| !token.trim().is_empty())
}

/// Reads a token file: its first line, without surrounding white space.
pub fn read_token_file(path: &std::path::Path) -> Result<String, DeviceError> {
    let text = std::fs::read_to_string(path).map_err(|error| DeviceError::TokenFile {
        path: path.to_owned(),
        reason: error.to_string(),
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(DeviceError::TokenFile {
            path: path.to_owned(),
            reason: "the file is empty; put the token on its first line".to_owned(),
        });
    }
    Ok(token)
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(address) = text.strip_prefix("remote:") {
            return RemoteServer::parse(address).map(Self::Remote);
        }
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(DeviceError::UnknownChoice(other.to_owned())),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = DeviceError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(choice: DeviceChoice) -> Self {
        choice.to_string()
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => formatter.write_str("auto"),
            Self::Gpu => formatter.write_str("gpu"),
            Self::Cpu => formatter.write_str("cpu"),
            Self::Wgpu => formatter.write_str("wgpu"),
            Self::Remote(server) => write!(formatter, "remote:{}", server.url),
        }
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
    /// burn's remote backend: the tensors live on a `picie serve` server.
    Remote,
}

/// Errors of device selection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `--device` got a value it does not know.
    #[error("unknown device '{0}': use auto, gpu, cpu, wgpu or remote:ws://HOST:PORT")]
    UnknownChoice(String),
    /// `remote:` followed by something that is not `ws://HOST:PORT`.
    #[error(
        "'{0}' is not a server address: write remote:ws://HOST:PORT, e.g. remote:ws://gpu-box:3000"
    )]
    BadRemoteAddress(String),
    /// A `--token-file` that cannot be used.
    #[error("cannot read the token file {}: {reason}", path.display())]
    TokenFile {
        /// The file named.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The remote server did not accept a session.
    #[error("cannot use the server at {url}: {reason}")]
    Remote {
        /// The server's address.
        url: String,
        /// Why, in words, with what to do.
        reason: String,
    },
    /// The remote server's authorizer turned the token down.
    #[error(
        "the server at {url} refused the token; set {REMOTE_TOKEN_VARIABLE} (or --token-file) to \
         the token it was started with"
    )]
    RemoteRefused {
        /// The server's address.
        url: String,
    },
    /// This build has no remote backend.
    #[error("this build of picie has no remote backend (built without the `remote` feature)")]
    RemoteNotBuilt,
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
pub fn select_device(choice: &DeviceChoice) -> Result<ComputeDevice, DeviceError> {
    let choice = match choice {
        DeviceChoice::Cpu => return Ok(ComputeDevice::cpu()),
        DeviceChoice::Remote(server) => return connect_remote(server),
        local => local.clone(),
    };
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
        (DeviceChoice::Remote(server), _) => connect_remote(&server),
    }
}

/// Sessions of this process that broke off: part of every credential sent, so that a new
/// connection gets a new session. burn's remote client keeps one session per server address
/// and credential for the life of the process and cannot reopen it, so without this a run
/// continued after the server came back would reuse the dead session.
static LOST_SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Separates the token from the session number in the credential a client presents; tokens
/// are one line, so it never occurs in one.
pub const CREDENTIAL_SEPARATOR: char = '\n';

/// Marks the remote sessions opened so far as dead (their connection broke off): the next
/// [`select_device`] of a remote server opens a new session.
pub fn forget_remote_sessions() {
    LOST_SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Opens a session on the server's first device. burn retries an unreachable server for about
/// 15 s before giving up.
#[cfg(feature = "remote")]
fn connect_remote(server: &RemoteServer) -> Result<ComputeDevice, DeviceError> {
    use burn::remote::{ConnectError, RemoteHost};

    let token = server
        .token
        .clone()
        .or_else(default_remote_token)
        .unwrap_or_default();
    let generation = LOST_SESSIONS.load(std::sync::atomic::Ordering::Relaxed);
    let host = RemoteHost::websocket(&server.url).with_credential(format!(
        "{}{CREDENTIAL_SEPARATOR}{generation}",
        token.trim()
    ));
    let device = Device::remote_options(&host).init().map_err(|error| {
        let reason = match error {
            ConnectError::Unauthorized => {
                return DeviceError::RemoteRefused {
                    url: server.url.clone(),
                };
            }
            ConnectError::Unreachable { reason } => format!(
                "nothing answered ({reason}); is `picie serve` running there, and can this \
                     machine reach the port?"
            ),
            ConnectError::IncompatibleProtocol { .. } => format!(
                "{error}: the server runs another release of picie; use the same on both \
                     machines"
            ),
            other => other.to_string(),
        };
        DeviceError::Remote {
            url: server.url.clone(),
            reason,
        }
    })?;
    Ok(ComputeDevice {
        device,
        backend: BackendKind::Remote,
        description: format!("remote server {} (burn remote backend)", server.url),
    })
}

/// What a test of a remote server found.
#[derive(Debug, Clone)]
pub struct RemoteProbe {
    /// The device as this machine sees it.
    pub description: String,
    /// Opening the session, in milliseconds.
    pub connect_ms: f64,
    /// A 256 x 256 matrix product computed there and read back, in milliseconds: about the
    /// round trip every read of a value costs.
    pub round_trip_ms: f64,
}

/// Connects to `server` and times one small computation there, to tell the user whether
/// training through it can work and how far away it is.
pub fn probe_remote(server: &RemoteServer) -> Result<RemoteProbe, DeviceError> {
    let started = std::time::Instant::now();
    let compute = connect_remote(server)?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = std::time::Instant::now();
    // burn's remote client panics when the connection drops mid-operation.
    let product = std::panic::catch_unwind(|| {
        let ones = burn::tensor::Tensor::<2>::ones([256, 256], &compute.device);
        ones.clone().matmul(ones).sum().into_scalar::<f32>()
    })
    .map_err(|_| {
        forget_remote_sessions();
        DeviceError::Remote {
            url: server.url.clone(),
            reason: "the connection dropped during a test computation".to_owned(),
        }
    })?;
    let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
    if (product - 256f32.powi(3)).abs() > 1.0 {
        return Err(DeviceError::Remote {
            url: server.url.clone(),
            reason: format!("a test product came back wrong ({product} instead of 16777216)"),
        });
    }
    Ok(RemoteProbe {
        description: compute.description,
        connect_ms,
        round_trip_ms,
    })
}

#[cfg(not(feature = "remote"))]
fn connect_remote(_server: &RemoteServer) -> Result<ComputeDevice, DeviceError> {
    Err(DeviceError::RemoteNotBuilt)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_server_is_named_by_its_websocket_address() {
        let choice: DeviceChoice = "remote:ws://gpu-box:3000".parse().unwrap();
        assert_eq!(
            choice,
            DeviceChoice::Remote(RemoteServer {
                url: "ws://gpu-box:3000".into(),
                token: None
            })
        );
        // The scheme may be left out; it is the only one.
        let bare: DeviceChoice = "remote:10.0.0.2:3000".parse().unwrap();
        assert_eq!(bare.to_string(), "remote:ws://10.0.0.2:3000");
        for wrong in [
            "remote:gpu-box",
            "remote:http://gpu-box:3000",
            "remote::3000",
            "remote",
        ] {
            let error = wrong.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(error.contains("HOST:PORT"), "{wrong}: {error}");
        }
    }

    #[test]
    fn a_config_keeps_the_choice_as_text_and_never_the_token() {
        let choice = DeviceChoice::Remote(RemoteServer {
            url: "ws://gpu-box:3000".into(),
            token: Some("secret".into()),
        });
        let json = serde_json::to_string(&choice).unwrap();
        assert_eq!(json, "\"remote:ws://gpu-box:3000\"");
        assert!(!format!("{choice:?}").contains("secret"));
        let read: DeviceChoice = serde_json::from_str(&json).unwrap();
        assert!(read.is_remote());
        // Configs written before remote devices existed read as they did.
        let old: DeviceChoice = serde_json::from_str("\"cpu\"").unwrap();
        assert_eq!(old, DeviceChoice::Cpu);
        assert!(serde_json::from_str::<DeviceChoice>("\"tpu\"").is_err());
    }
}
