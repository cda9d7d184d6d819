//! PiCIE Explorer, the desktop app: see [`picie::app`].
//!
//! `picie-explorer [FOLDER]` opens a folder of images, or a run folder made by the app.

use eframe::egui;

/// See `mimalloc` in Cargo.toml: faster training on the CPU backend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> eframe::Result {
    picie::allocator::configure();
    picie::device::prepare_runtime_folder();
    let open_path = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("PiCIE Explorer")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "PiCIE Explorer",
        options,
        Box::new(move |creation| {
            let mut app = picie::app::ExplorerApp::new(creation);
            if let Some(path) = open_path {
                app.open_path(&path);
            }
            Ok(Box::new(app))
        }),
    )
}
