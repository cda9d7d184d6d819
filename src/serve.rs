//! `picie serve`: this machine's device offered to other machines' trainers through burn's
//! remote server (its own protocol over WebSocket). The autodiff graph stays with the client;
//! the server runs tensor operations on its device.

use std::net::{SocketAddr, TcpListener};

use burn::server::{
    AuthorizationRequest, Credential, PeerAuthorizer, RemoteServer, ServeError, TokenAuthorizer,
    WebSocketTransport,
};

use crate::device::{ComputeDevice, DeviceChoice, DeviceError, select_device};

/// Errors of starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServeFailure {
    /// The device to serve could not be opened.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// `--device remote:...` for a server.
    #[error("a server serves a device of its own machine: use --device auto, gpu, cpu or wgpu")]
    RemoteDevice,
    /// The address is not HOST:PORT or cannot be listened on.
    #[error("cannot listen on {address}: {reason}")]
    Listen {
        /// The address asked for.
        address: String,
        /// Why, with what to do.
        reason: String,
    },
    /// An empty token would admit every client.
    #[error("the token is empty; put a non-empty token in the token file")]
    EmptyToken,
    /// burn's server stopped with an error.
    #[error("the server stopped: {0}")]
    Stopped(String),
}

/// A bound server, not yet serving.
pub struct RemoteService {
    listener: TcpListener,
    compute: ComputeDevice,
    authorizer: LoggingAuthorizer,
}

impl RemoteService {
    /// Opens `device` and listens on `address` (HOST:PORT; port 0 takes a free one, see
    /// [`Self::local_address`]). Clients must present `token`.
    pub fn bind(address: &str, device: &DeviceChoice, token: &str) -> Result<Self, ServeFailure> {
        if device.is_remote() {
            return Err(ServeFailure::RemoteDevice);
        }
        let tokens = TokenAuthorizer::new(token).map_err(|_| ServeFailure::EmptyToken)?;
        let listener = TcpListener::bind(address).map_err(|error| ServeFailure::Listen {
            address: address.to_owned(),
            reason: match error.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the port is in use (is another `picie serve` running?); choose another \
                     with --address HOST:PORT"
                        .to_owned()
                }
                _ => format!("{error}; write the address as HOST:PORT, e.g. 0.0.0.0:3000"),
            },
        })?;
        let compute = select_device(device)?;
        Ok(Self {
            listener,
            compute,
            authorizer: LoggingAuthorizer { tokens },
        })
    }

    /// The address clients reach it at (the port actually bound).
    pub fn local_address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The served device, in words.
    pub fn device_description(&self) -> &str {
        &self.compute.description
    }

    /// Serves until the process gets Ctrl-C or SIGTERM (burn installs the handlers once the
    /// socket is served), then ends every session.
    pub fn serve_until_interrupted(self) -> Result<(), ServeFailure> {
        RemoteServer::new([self.compute.device])
            .with_authorizer(self.authorizer)
            .serve(WebSocketTransport::from_listener(self.listener))
            .map_err(|error: ServeError| ServeFailure::Stopped(error.to_string()))
    }
}

/// Checks the token and writes one line per session asked for, so whoever runs the server sees
/// who connected (and who was turned away).
struct LoggingAuthorizer {
    tokens: TokenAuthorizer,
}

impl PeerAuthorizer for LoggingAuthorizer {
    fn authorize(&self, request: AuthorizationRequest<'_>) -> Result<(), String> {
        let client = request.client;
        // A client presents "TOKEN\nN", N numbering its sessions (see
        // `device::forget_remote_sessions`): only the token is checked.
        let presented = request.credential.as_bytes();
        let token_end = presented
            .iter()
            .position(|&byte| byte == crate::device::CREDENTIAL_SEPARATOR as u8)
            .unwrap_or(presented.len());
        let token = Credential::from(&presented[..token_end]);
        let verdict = self.tokens.authorize(AuthorizationRequest {
            client,
            device_index: request.device_index,
            credential: &token,
        });
        match &verdict {
            Ok(()) => println!("{} session opened for {client}", clock()),
            Err(_) => println!("{} refused {client}: wrong or missing token", clock()),
        }
        verdict
    }
}

/// The time of day (UTC) for log lines.
fn clock() -> String {
    chrono::Utc::now().format("%H:%M:%S").to_string()
}
