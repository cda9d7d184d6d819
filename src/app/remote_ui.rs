//! The training panel's "Remote server…" device: the address and token of a `picie serve`
//! server, and a Test button that connects and times one small computation there.

use eframe::egui;

use crate::device::{DeviceChoice, DeviceError, RemoteProbe, RemoteServer, probe_remote};
use crate::session::{Job, Wake};

type ProbeJob = Job<(), Result<RemoteProbe, DeviceError>>;

/// The address a fresh "Remote server…" choice starts from (`picie serve`'s default port).
pub const DEFAULT_ADDRESS: &str = "ws://127.0.0.1:3000";

/// What the remote section holds between frames. The token lives only in memory: it is never
/// written to the app's settings or a run's config.
pub struct RemotePanel {
    /// What the user typed as the server's address.
    pub address: String,
    /// The server's token (shown as dots).
    pub token: String,
    test: Option<ProbeJob>,
    outcome: Option<Result<String, String>>,
    /// Whether the address was taken from the restored settings' device yet.
    synced: bool,
}

impl Default for RemotePanel {
    fn default() -> Self {
        Self {
            address: DEFAULT_ADDRESS.to_owned(),
            token: crate::device::default_remote_token().unwrap_or_default(),
            test: None,
            outcome: None,
            synced: false,
        }
    }
}

impl RemotePanel {
    /// The device choice for what is typed, or why it is not an address.
    pub fn choice(&self) -> Result<DeviceChoice, DeviceError> {
        let mut server = RemoteServer::parse(&self.address)?;
        server.token = Some(self.token.trim().to_owned()).filter(|token| !token.is_empty());
        Ok(DeviceChoice::Remote(server))
    }

    /// Draws the address, token and Test button under the device menu, and keeps `device` in
    /// step with what is typed.
    pub fn show(&mut self, ui: &mut egui::Ui, device: &mut DeviceChoice, wake: Wake) {
        if !self.synced {
            // Settings restored from an earlier session name the server but not its token.
            if let DeviceChoice::Remote(server) = device {
                self.address = server.url.clone();
            }
            self.synced = true;
        }
        ui.label("Server").on_hover_text(
            "The address `picie serve` printed on the GPU machine, ws://HOST:PORT. The \
             network's weights stay here; every tensor operation runs there.",
        );
        let edited = ui
            .add(egui::TextEdit::singleline(&mut self.address).desired_width(180.0))
            .changed();
        ui.end_row();
        ui.label("Token").on_hover_text(
            "The token the server was started with (its --token-file or PICIE_REMOTE_TOKEN). \
             Kept in memory only.",
        );
        let edited = ui
            .add(
                egui::TextEdit::singleline(&mut self.token)
                    .password(true)
                    .desired_width(180.0),
            )
            .changed()
            || edited;
        ui.end_row();
        let choice = self.choice();
        if edited {
            self.outcome = None;
            if let Ok(choice) = &choice {
                *device = choice.clone();
            }
        }
        ui.label("");
        ui.horizontal(|ui| {
            let testing = self.test.is_some();
            let button = ui.add_enabled(!testing && choice.is_ok(), egui::Button::new("Test"));
            if button.clicked()
                && let Ok(DeviceChoice::Remote(server)) = &choice
            {
                let server = server.clone();
                match Job::spawn("remote test", wake, move |_| probe_remote(&server)) {
                    Ok(job) => self.test = Some(job),
                    Err(error) => self.outcome = Some(Err(error.to_string())),
                }
            }
            if testing {
                ui.spinner();
                ui.label("connecting (up to 15 s)…");
            }
        });
        ui.end_row();
        self.poll();
        let message = match (&choice, &self.outcome) {
            (Err(error), _) => Some(Err(error.to_string())),
            (Ok(_), outcome) => outcome.clone(),
        };
        if let Some(message) = message {
            ui.label("");
            let (text, colour) = match message {
                Ok(text) => (text, egui::Color32::from_rgb(80, 170, 90)),
                Err(text) => (text, ui.visuals().error_fg_color),
            };
            // Wrapped to the settings column: a refusal explains what to do in a sentence.
            ui.vertical(|ui| {
                ui.set_max_width(180.0);
                ui.add(egui::Label::new(egui::RichText::new(text).color(colour)).wrap());
            });
            ui.end_row();
        }
    }

    fn poll(&mut self) {
        if let Some(job) = &mut self.test
            && let Some(result) = job.try_result()
        {
            self.test = None;
            self.outcome = Some(match result {
                Ok(Ok(probe)) => Ok(format!(
                    "Connected in {:.0} ms; a small product there and back took {:.0} ms.",
                    probe.connect_ms, probe.round_trip_ms
                )),
                // In the window the token is typed, not set in the environment.
                Ok(Err(DeviceError::RemoteRefused { url })) => Err(format!(
                    "The server at {url} refused the token: type the token it was started with \
                     (its --token-file or PICIE_REMOTE_TOKEN)."
                )),
                Ok(Err(error)) => Err(error.to_string()),
                Err(error) => Err(error.to_string()),
            });
        }
    }
}
