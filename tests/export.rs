//! The export pipeline on the CPU backend: what is written scores exactly what the app shows,
//! merges and ignores reach every file, a corrupt image does not stop the others, and a
//! cancelled export leaves nothing partial behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use picie::config::TrainConfig;
use picie::data::{DemoOptions, ImageFolder, write_demo_dataset};
use picie::device::{ComputeDevice, DeviceChoice};
use picie::eval::score_mask_folder;
use picie::export::{
    ExportOptions, ExportReport, export_segmentations, mask_paths, score_segmentation,
    segmenter_for_run,
};
use picie::labelmap::{IGNORE_INDEX, LabelEdit, LabelMap, LegendEntry};
use picie::model::BackboneKind;
use picie::segment::Segmenter;
use picie::train::{ExistingRun, NullObserver, RunFolder, TrainControl, Trainer, TrainingData};

const CLUSTERS: usize = 5;

/// A demo dataset (with one image in a sub-folder) and an untrained run on it.
struct Fixture {
    _folder: tempfile::TempDir,
    root: PathBuf,
    images: PathBuf,
    labels: PathBuf,
    run: PathBuf,
}

impl Fixture {
    fn new(images: usize) -> Self {
        let folder = tempfile::tempdir().unwrap();
        let root = folder.path().to_owned();
        let summary = write_demo_dataset(
            &root.join("demo"),
            &DemoOptions {
                images,
                size: 96,
                seed: 5,
            },
        )
        .unwrap();
        let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/weights/mobilenet_v2-imagenet.pth");
        let config = TrainConfig {
            backbone: BackboneKind::MobilenetV2,
            weights: Some(weights),
            device: DeviceChoice::Cpu,
            clusters: Some(CLUSTERS),
            base_size: 96,
            input_size: 64,
            batch_size: 8,
            epochs: 0,
            kmeans_iterations: 10,
            preview_images: 1,
            seed: 11,
            ..TrainConfig::default()
        };
        let data = TrainingData::load(
            &summary.images_dir,
            Some(&summary.labels_dir),
            96,
            64,
            &|_, _| {},
        )
        .unwrap();
        let run = root.join("run");
        let folder_run = RunFolder::create(&run, &config, ExistingRun::Refuse)
            .unwrap()
            .0;
        Trainer::new(
            config,
            folder_run,
            Arc::new(data),
            TrainControl::new(),
            false,
        )
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut NullObserver)
        .unwrap();
        // One image (and its label) in a sub-folder, so names keep their folders.
        let first = summary.images_dir.join("demo_0000.png");
        std::fs::create_dir_all(summary.images_dir.join("sub")).unwrap();
        std::fs::create_dir_all(summary.labels_dir.join("sub")).unwrap();
        std::fs::copy(&first, summary.images_dir.join("sub/nested.png")).unwrap();
        std::fs::copy(
            summary.labels_dir.join("demo_0000.png"),
            summary.labels_dir.join("sub/nested.png"),
        )
        .unwrap();
        Self {
            _folder: folder,
            root,
            images: summary.images_dir,
            labels: summary.labels_dir,
            run,
        }
    }

    fn segmenter(&self) -> Segmenter {
        segmenter_for_run(&self.run, &ComputeDevice::cpu())
            .unwrap()
            .0
    }

    fn labelled(&self) -> ImageFolder {
        ImageFolder::scan(&self.images, Some(&self.labels)).unwrap()
    }

    fn export(
        &self,
        segmenter: &Segmenter,
        labelmap: &LabelMap,
        out: &Path,
        options: &ExportOptions,
    ) -> ExportReport {
        let folder = ImageFolder::scan(&self.images, None).unwrap();
        export_segmentations(
            segmenter,
            &folder,
            labelmap,
            out,
            options,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .unwrap()
    }
}

fn gray(path: &Path) -> image::GrayImage {
    match image::open(path).unwrap() {
        image::DynamicImage::ImageLuma8(mask) => mask,
        other => panic!("{} is {:?}, not 8-bit grey", path.display(), other.color()),
    }
}

fn assert_same_scores(a: &picie::eval::Evaluation, b: &picie::eval::Evaluation) {
    assert!((a.accuracy - b.accuracy).abs() < 1e-9, "{a:?} vs {b:?}");
    assert!((a.mean_iou - b.mean_iou).abs() < 1e-9, "{a:?} vs {b:?}");
    assert_eq!(a.per_class_iou.len(), b.per_class_iou.len());
    for (x, y) in a.per_class_iou.iter().zip(&b.per_class_iou) {
        match (x, y) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9),
            (None, None) => {}
            _ => panic!("class presence differs: {x:?} vs {y:?}"),
        }
    }
}

/// Every file under `folder`, recursively.
fn files_under(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![folder.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn exported_masks_score_exactly_what_the_app_shows() {
    let fixture = Fixture::new(6);
    let segmenter = fixture.segmenter();
    let labelmap = LabelMap::load_or_new(&fixture.run, segmenter.clusters()).unwrap();
    let out = fixture.root.join("export");
    let report = fixture.export(&segmenter, &labelmap, &out, &ExportOptions::default());
    assert_eq!(report.written, 7, "{report:?}");
    assert!(report.failed.is_empty() && !report.cancelled);

    // Every image has its three files at its original resolution, folders kept.
    let folder = fixture.labelled();
    for (entry, path) in folder.entries().iter().zip(mask_paths(folder.entries())) {
        let size = image::image_dimensions(&entry.path).unwrap();
        for sub in ["index", "colour", "overlay"] {
            let file = out.join(sub).join(&path);
            assert_eq!(image::image_dimensions(&file).unwrap(), size, "{file:?}");
        }
    }
    assert!(out.join("index/sub/nested.png").is_file());
    assert!(out.join("legend.json").is_file() && out.join("labelmap.txt").is_file());

    let shown = score_segmentation(&segmenter, &folder, &labelmap).unwrap();
    let written = score_mask_folder(&out.join("index"), &folder).unwrap();
    println!(
        "export scores Acc {:.2} mIoU {:.2}",
        shown.accuracy, shown.mean_iou
    );
    assert!(shown.accuracy > 0.0);
    assert_same_scores(&shown, &written);

    // A colour folder or a missing mask is an error that names the file.
    let error = score_mask_folder(&out.join("colour"), &folder)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("8-bit greyscale") && error.contains("colour"),
        "{error}"
    );
    std::fs::remove_file(out.join("index/sub/nested.png")).unwrap();
    let error = score_mask_folder(&out.join("index"), &folder)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("nested.png") && error.contains("no mask"),
        "{error}"
    );

    // An output path that is a file cannot be a folder: the error names it.
    let blocked = fixture.root.join("blocked");
    std::fs::write(&blocked, b"a file").unwrap();
    let error = export_segmentations(
        &segmenter,
        &ImageFolder::scan(&fixture.images, None).unwrap(),
        &labelmap,
        &blocked,
        &ExportOptions::default(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("blocked") && error.contains("output folder"),
        "{error}"
    );
}

#[test]
fn merges_and_ignores_reach_masks_legend_and_cvat_labelmap() {
    let fixture = Fixture::new(4);
    let segmenter = fixture.segmenter();
    // Ignore the cluster most common in the first image, so some pixels surely are ignored,
    // and merge two of the others into a third.
    let first = picie::data::load_one(&fixture.images.join("demo_0000.png")).unwrap();
    let mut sizes = [0usize; CLUSTERS];
    for &cluster in &segmenter.segment(&first).labels {
        sizes[usize::from(cluster)] += 1;
    }
    let ignored = (0..CLUSTERS).max_by_key(|&k| sizes[k]).unwrap();
    let others: Vec<usize> = (0..CLUSTERS).filter(|&k| k != ignored).collect();
    let (root, merged) = (others[0], vec![others[1], others[2]]);
    let mut labelmap = LabelMap::new(CLUSTERS);
    for edit in [
        LabelEdit::SetIgnored {
            cluster: ignored,
            ignored: true,
        },
        LabelEdit::Merge {
            sources: merged.clone(),
            into: root,
        },
        LabelEdit::Rename {
            cluster: root,
            name: "road".into(),
        },
    ] {
        labelmap.apply(&edit).unwrap();
    }
    // The CLI reads the label map from the run folder.
    labelmap.save(&fixture.run).unwrap();
    let labelmap = LabelMap::load_or_new(&fixture.run, CLUSTERS).unwrap();
    let ids = labelmap.output_ids(CLUSTERS);

    let out = fixture.root.join("export");
    let report = fixture.export(&segmenter, &labelmap, &out, &ExportOptions::default());
    assert_eq!(report.written, 5);

    let folder = ImageFolder::scan(&fixture.images, None).unwrap();
    let mut ignored_pixels = 0;
    for (entry, path) in folder.entries().iter().zip(mask_paths(folder.entries())) {
        let image = picie::data::load_one(&entry.path).unwrap();
        let index = gray(&out.join("index").join(&path));
        // Exactly the clusters mapped through the label map.
        let expected: Vec<u8> = segmenter
            .segment(&image)
            .labels
            .iter()
            .map(|&cluster| ids[usize::from(cluster)])
            .collect();
        assert_eq!(index.as_raw(), &expected, "{}", entry.name);
        for &id in index.as_raw() {
            assert!(
                id == IGNORE_INDEX
                    || (usize::from(id) != ignored && !merged.contains(&(id as usize))),
                "id {id} in {}",
                entry.name
            );
        }
        let colour = image::open(out.join("colour").join(&path))
            .unwrap()
            .to_rgb8();
        let overlay = image::open(out.join("overlay").join(&path))
            .unwrap()
            .to_rgb8();
        for (pixel, &id) in index.as_raw().iter().enumerate() {
            let (x, y) = (
                (pixel as u32) % index.width(),
                (pixel as u32) / index.width(),
            );
            if id == IGNORE_INDEX {
                ignored_pixels += 1;
                assert_eq!(colour.get_pixel(x, y).0, [0, 0, 0]);
                assert_eq!(overlay.get_pixel(x, y), image.get_pixel(x, y));
            } else {
                assert_eq!(colour.get_pixel(x, y).0, labelmap.colour(usize::from(id)));
            }
        }
    }
    assert!(ignored_pixels > 0);

    let legend: Vec<LegendEntry> =
        serde_json::from_str(&std::fs::read_to_string(out.join("legend.json")).unwrap()).unwrap();
    assert_eq!(legend, report.legend);
    let legend_ids: Vec<usize> = legend.iter().map(|entry| entry.id).collect();
    let mut expected_ids: Vec<usize> = others
        .iter()
        .copied()
        .filter(|k| !merged.contains(k))
        .collect();
    expected_ids.sort();
    assert_eq!(legend_ids, expected_ids);
    let road = legend.iter().find(|entry| entry.id == root).unwrap();
    assert_eq!(road.name, "road");
    let mut members = vec![root, merged[0], merged[1]];
    members.sort();
    assert_eq!(road.clusters, members);
    let shares: f64 = legend.iter().map(|entry| entry.pixel_share).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");

    let cvat = std::fs::read_to_string(out.join("labelmap.txt")).unwrap();
    let lines: Vec<&str> = cvat.lines().collect();
    assert_eq!(lines[0], "# label:color_rgb:parts:actions");
    assert_eq!(lines[1], "background:0,0,0::");
    assert_eq!(lines.len(), 2 + legend.len());
    let [r, g, b] = labelmap.colour(root);
    assert!(
        lines.contains(&format!("road:{r},{g},{b}::").as_str()),
        "{cvat}"
    );

    // Ignored pixels count as wrong in both scorings, which agree.
    let labelled = fixture.labelled();
    assert_same_scores(
        &score_segmentation(&segmenter, &labelled, &labelmap).unwrap(),
        &score_mask_folder(&out.join("index"), &labelled).unwrap(),
    );
}

#[test]
fn a_corrupt_image_is_reported_and_every_other_image_is_written() {
    let fixture = Fixture::new(4);
    std::fs::write(
        fixture.images.join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::copy(
        fixture.labels.join("demo_0000.png"),
        fixture.labels.join("broken.png"),
    )
    .unwrap();
    let segmenter = fixture.segmenter();
    let labelmap = LabelMap::new(CLUSTERS);
    let out = fixture.root.join("export");
    let report = fixture.export(&segmenter, &labelmap, &out, &ExportOptions::default());
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, "broken.png");
    assert!(report.failed[0].1.contains("broken.png"), "{report:?}");
    assert_eq!(report.written, 5);
    let folder = ImageFolder::scan(&fixture.images, None).unwrap();
    for (entry, path) in folder.entries().iter().zip(mask_paths(folder.entries())) {
        let exists = out.join("index").join(&path).is_file();
        assert_eq!(exists, entry.name != "broken.png", "{}", entry.name);
    }
    // Export skips the unreadable image, so both scorings skip it and still agree.
    let labelled = fixture.labelled();
    assert_same_scores(
        &score_segmentation(&segmenter, &labelled, &labelmap).unwrap(),
        &score_mask_folder(&out.join("index"), &labelled).unwrap(),
    );

    // A selection exports only the named images; unknown names are failures.
    let only = fixture.root.join("only");
    let report = fixture.export(
        &segmenter,
        &labelmap,
        &only,
        &ExportOptions {
            overlay: false,
            cvat: false,
            only: Some(vec!["sub/nested.png".into(), "missing.png".into()]),
            ..ExportOptions::default()
        },
    );
    assert_eq!(report.written, 1);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "missing.png");
    let written: Vec<PathBuf> = files_under(&only)
        .into_iter()
        .map(|path| path.strip_prefix(&only).unwrap().to_owned())
        .collect();
    assert_eq!(
        written,
        [
            PathBuf::from("colour/sub/nested.png"),
            PathBuf::from("index/sub/nested.png"),
            PathBuf::from("legend.json"),
        ]
    );
}

#[test]
fn a_cancelled_export_stops_and_leaves_nothing_partial() {
    let fixture = Fixture::new(5);
    let segmenter = fixture.segmenter();
    let folder = ImageFolder::scan(&fixture.images, None).unwrap();
    let out = fixture.root.join("export");
    let cancel = AtomicBool::new(false);
    let mut reports = Vec::new();
    let report = export_segmentations(
        &segmenter,
        &folder,
        &LabelMap::new(CLUSTERS),
        &out,
        &ExportOptions::default(),
        &mut |progress| {
            reports.push(progress.clone());
            // Set while the second image is about to start.
            if progress.done == 1 {
                cancel.store(true, Ordering::SeqCst);
            }
        },
        &cancel,
    )
    .unwrap();
    assert!(report.cancelled);
    assert_eq!(report.written, 1);
    assert_eq!(reports[0].done, 0);
    assert_eq!(reports[0].total, folder.len());
    assert_eq!(reports[0].current, folder.entries()[0].name);

    let files = files_under(&out);
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        let temporary = picie::fsutil::temporary_path_for(&file.with_file_name("x.png"));
        let temporary_suffix = temporary
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches(".x.png")
            .to_owned();
        assert!(
            !name.starts_with('.') && !name.ends_with(&temporary_suffix) && !name.ends_with(".tmp"),
            "temporary file left: {file:?}"
        );
        if name.ends_with(".png") {
            // Complete files: they decode.
            image::open(file).unwrap();
        }
    }
    let pngs = files
        .iter()
        .filter(|file| file.extension().is_some_and(|e| e == "png"));
    assert_eq!(
        pngs.count(),
        3,
        "one image's index, colour and overlay: {files:?}"
    );
}

/// Fraction of the pixels on a border of `mask` (differing from the pixel right or below)
/// that lie within one pixel of a border of `label`: how well mask edges follow object edges.
fn border_precision(mask: &[u16], label: &image::GrayImage) -> (usize, usize) {
    let (width, height) = (label.width() as usize, label.height() as usize);
    let label_border = |x: usize, y: usize| -> bool {
        let here = label.get_pixel(x as u32, y as u32)[0];
        (x + 1 < width && label.get_pixel(x as u32 + 1, y as u32)[0] != here)
            || (y + 1 < height && label.get_pixel(x as u32, y as u32 + 1)[0] != here)
    };
    let (mut on_edge, mut borders) = (0, 0);
    for y in 0..height {
        for x in 0..width {
            let here = mask[y * width + x];
            let border = (x + 1 < width && mask[y * width + x + 1] != here)
                || (y + 1 < height && mask[(y + 1) * width + x] != here);
            if !border {
                continue;
            }
            borders += 1;
            let near = (y.saturating_sub(1)..(y + 2).min(height))
                .any(|ny| (x.saturating_sub(1)..(x + 2).min(width)).any(|nx| label_border(nx, ny)));
            on_edge += usize::from(near);
        }
    }
    (on_edge, borders)
}

#[test]
fn bilateral_upsampling_puts_mask_borders_on_object_edges_and_flip_makes_masks_mirror() {
    let fixture = Fixture::new(6);
    let folder = fixture.labelled();
    let bilinear = fixture
        .segmenter()
        .with_inference(false, picie::config::Upsampling::Bilinear);
    let bilateral = fixture
        .segmenter()
        .with_inference(false, picie::config::Upsampling::Bilateral);
    let (mut plain, mut guided) = ((0, 0), (0, 0));
    for entry in folder.entries() {
        let image = picie::data::load_one(&entry.path).unwrap();
        let label = picie::data::load_label(entry.label.as_ref().unwrap()).unwrap();
        for (segmenter, total) in [(&bilinear, &mut plain), (&bilateral, &mut guided)] {
            let (on_edge, borders) = border_precision(&segmenter.segment(&image).labels, &label);
            total.0 += on_edge;
            total.1 += borders;
        }
    }
    let precision = |(on_edge, borders): (usize, usize)| on_edge as f64 / borders.max(1) as f64;
    eprintln!(
        "mask border pixels within 1 px of an object edge: bilinear {:.3}, bilateral {:.3}",
        precision(plain),
        precision(guided)
    );
    assert!(
        precision(guided) > precision(plain) + 0.05,
        "mask borders on object edges: bilateral {:.3} ({guided:?}), bilinear {:.3} ({plain:?})",
        precision(guided),
        precision(plain)
    );

    // Test-time flip: the mirror image's mask is the mirrored mask.
    let flipped = fixture
        .segmenter()
        .with_inference(true, picie::config::Upsampling::Bilinear);
    let image = picie::data::load_one(&folder.entries()[0].path).unwrap();
    let mirror = image::imageops::flip_horizontal(&image);
    let (a, b) = (flipped.segment(&image), flipped.segment(&mirror));
    let width = a.width as usize;
    let agreeing = (0..a.labels.len())
        .filter(|&i| a.labels[i] == b.labels[(i / width) * width + width - 1 - i % width])
        .count();
    assert!(
        agreeing as f64 >= 0.995 * a.labels.len() as f64,
        "{agreeing} of {} pixels mirror",
        a.labels.len()
    );
}
