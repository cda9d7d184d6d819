//! Images for the window, decoded off the UI thread: thumbnails for the dataset grid and the
//! base-size squares the cluster maps lie on. The UI asks for a texture each frame; until the
//! loader thread has it, the caller draws a placeholder, so nothing ever waits on the disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use eframe::egui;

use crate::data::BaseTransform;
use crate::session::{Service, Wake};

/// What to decode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRequest {
    /// A thumbnail whose longer side is at most this many pixels.
    Thumbnail(PathBuf, u32),
    /// The image as training sees it: shorter side resized to the size, centre square.
    Base(PathBuf, u32),
}

impl ImageRequest {
    fn path(&self) -> &Path {
        match self {
            Self::Thumbnail(path, _) | Self::Base(path, _) => path,
        }
    }
}

type Decoded = (ImageRequest, Result<egui::ColorImage, String>);

/// Textures by request, filled in the background.
pub struct ImageCache {
    /// The decoder; `None` if its thread could not start (then images show their error).
    decoder: Option<Service<ImageRequest, Decoded>>,
    start_error: Option<String>,
    textures: HashMap<ImageRequest, egui::TextureHandle>,
    failed: HashMap<ImageRequest, String>,
    pending: HashSet<ImageRequest>,
}

/// Uploads per frame at most, so a folder of thousands of thumbnails never stalls a frame.
const UPLOADS_PER_FRAME: usize = 24;
/// Images waiting to be decoded at most (and decoded images waiting for upload); a request
/// beyond it is asked again by a later frame.
const DECODE_QUEUE: usize = 512;

impl ImageCache {
    /// Starts the decoder thread; `wake` asks the UI to repaint when an image is ready.
    pub fn new(wake: Wake) -> Self {
        let decoder = Service::spawn("images", DECODE_QUEUE, wake, |context| {
            while let Some(request) = context.next_request() {
                let decoded = decode(&request);
                if !context.reply((request, decoded)) {
                    break;
                }
            }
        });
        let (decoder, start_error) = match decoder {
            Ok(decoder) => (Some(decoder), None),
            Err(error) => (None, Some(error.to_string())),
        };
        Self {
            decoder,
            start_error,
            textures: HashMap::new(),
            failed: HashMap::new(),
            pending: HashSet::new(),
        }
    }

    /// Moves decoded images into textures (a bounded number per frame).
    pub fn poll(&mut self, ctx: &egui::Context) {
        let decoded_images = self
            .decoder
            .as_ref()
            .map(|decoder| decoder.replies(UPLOADS_PER_FRAME))
            .unwrap_or_default();
        for (request, decoded) in decoded_images {
            self.pending.remove(&request);
            match decoded {
                Ok(image) => {
                    let name = request.path().display().to_string();
                    let texture = ctx.load_texture(name, image, egui::TextureOptions::LINEAR);
                    self.textures.insert(request, texture);
                }
                Err(error) => {
                    self.failed.insert(request, error);
                }
            }
        }
        if self
            .decoder
            .as_ref()
            .is_some_and(|decoder| decoder.has_replies())
        {
            ctx.request_repaint();
        }
    }

    /// The texture, or `None` while it loads (the first call queues it).
    pub fn get(&mut self, request: &ImageRequest) -> Option<&egui::TextureHandle> {
        if !self.textures.contains_key(request)
            && !self.failed.contains_key(request)
            && !self.pending.contains(request)
        {
            match &self.decoder {
                // A full queue: the next frame asks again.
                Some(decoder) => {
                    if decoder.ask(request.clone()).is_ok() {
                        self.pending.insert(request.clone());
                    }
                }
                None => {
                    let error = self.start_error.clone().unwrap_or_default();
                    self.failed.insert(request.clone(), error);
                }
            }
        }
        self.textures.get(request)
    }

    /// Why an image could not be decoded.
    pub fn error(&self, request: &ImageRequest) -> Option<&str> {
        self.failed.get(request).map(String::as_str)
    }

    /// Forgets every texture (another dataset was opened).
    pub fn clear(&mut self) {
        self.textures.clear();
        self.failed.clear();
    }
}

fn decode(request: &ImageRequest) -> Result<egui::ColorImage, String> {
    let image = image::ImageReader::open(request.path())
        .and_then(|reader| reader.with_guessed_format())
        .map_err(|error| error.to_string())?
        .decode()
        .map_err(|error| error.to_string())?;
    let rgb = match request {
        ImageRequest::Thumbnail(_, side) => image.thumbnail(*side, *side).to_rgb8(),
        ImageRequest::Base(_, size) => BaseTransform::new(*size).apply_rgb(&image),
    };
    let size = [rgb.width() as usize, rgb.height() as usize];
    Ok(egui::ColorImage::from_rgb(size, rgb.as_raw()))
}
