//! `picie serve`: this machine's device for other machines' trainers.

use anyhow::Result;
#[cfg(feature = "remote")]
use anyhow::bail;

use picie::device::DeviceChoice;

/// Options of `picie serve`.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, HOST:PORT (0.0.0.0 listens on every interface).
    #[arg(long, default_value = "0.0.0.0:3000")]
    address: String,
    /// auto, gpu, cpu or wgpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

/// `picie serve` in a build without the remote backend.
#[cfg(not(feature = "remote"))]
pub(crate) fn run(_args: ServeArgs) -> Result<()> {
    Err(picie::device::DeviceError::RemoteNotBuilt.into())
}

/// `picie serve`: burn's remote server on this machine's device, until Ctrl-C.
#[cfg(feature = "remote")]
pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let (address, device) = (&args.address, &args.device);
    let Some(token) = picie::device::default_remote_token() else {
        bail!(
            "a server needs a token that clients must present: put one in a file and pass \
             --token-file FILE, or set {}",
            picie::device::REMOTE_TOKEN_VARIABLE
        );
    };
    let served = picie::serve::RemoteService::bind(address, device, &token)?;
    println!(
        "serving {} on ws://{} to clients with the token; Ctrl-C stops",
        served.device_description(),
        served.local_address()
    );
    served.serve_until_interrupted()?;
    println!("server stopped");
    leave_without_teardown()
}

/// Ends the process at once, with status 0. burn's server leaves its runtime threads and the
/// device (a process-wide static) alive; a normal exit then runs the graphics driver's
/// library destructors under them, and NVIDIA's Vulkan driver crashed there (a segmentation
/// fault after "server stopped"). Every session has ended and nothing is left to write.
#[cfg(feature = "remote")]
fn leave_without_teardown() -> Result<()> {
    use std::io::Write;
    // `_exit` does not flush Rust's buffers.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[cfg(unix)]
    // SAFETY: `_exit` takes a plain status and does not return; no destructor or handler of
    // this process runs after it, which is the point.
    unsafe {
        libc::_exit(0)
    }
    #[cfg(not(unix))]
    Ok(())
}
