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
    Ok(())
}
