//! Images for the window, decoded off the UI thread: thumbnails for the dataset grid and the
//! base-size squares the cluster maps lie on. The UI asks for a texture each frame; until the
//! loader thread has it, the caller draws a placeholder, so nothing ever waits on the disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crossbeam::channel::{Receiver, Sender, unbounded};
use eframe::egui;

use crate::data::BaseTransform;

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
    requests: Sender<ImageRequest>,
    results: Receiver<Decoded>,
    textures: HashMap<ImageRequest, egui::TextureHandle>,
    failed: HashMap<ImageRequest, String>,
    pending: HashSet<ImageRequest>,
}

/// Uploads per frame at most, so a folder of thousands of thumbnails never stalls a frame.
const UPLOADS_PER_FRAME: usize = 24;

impl ImageCache {
    /// Starts the decoder thread; `wake` asks the UI to repaint when an image is ready.
    pub fn new(wake: impl Fn() + Send + 'static) -> Self {
        let (requests, request_receiver) = unbounded::<ImageRequest>();
        let (result_sender, results) = unbounded::<Decoded>();
        let spawned = std::thread::Builder::new()
            .name("picie-images".into())
            .spawn(move || {
                for request in request_receiver {
                    let decoded = decode(&request);
                    if result_sender.send((request, decoded)).is_err() {
                        break;
                    }
                    wake();
                }
            });
        if let Err(error) = spawned {
            eprintln!("could not start the image loader: {error}");
        }
        Self {
            requests,
            results,
            textures: HashMap::new(),
            failed: HashMap::new(),
            pending: HashSet::new(),
        }
    }

    /// Moves decoded images into textures (a bounded number per frame).
    pub fn poll(&mut self, ctx: &egui::Context) {
        for (request, decoded) in self.results.try_iter().take(UPLOADS_PER_FRAME) {
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
        if !self.results.is_empty() {
            ctx.request_repaint();
        }
    }

    /// The texture, or `None` while it loads (the first call queues it).
    pub fn get(&mut self, request: &ImageRequest) -> Option<&egui::TextureHandle> {
        if !self.textures.contains_key(request)
            && !self.failed.contains_key(request)
            && self.pending.insert(request.clone())
        {
            let _ = self.requests.send(request.clone());
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
