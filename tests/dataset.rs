//! Image folders, labels, decoding of awkward files, the base transform and the demo dataset.

// Test servers and watchdogs make their own threads and channels.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba};
use picie::data::{
    BaseTransform, DEMO_CLASSES, DatasetError, DecodedStorage, DemoOptions, IGNORE_LABEL,
    ImageFolder, LoadedDataset, TrainingData, generate_demo_scene, load_one, write_demo_dataset,
};

fn no_progress(_: usize, _: usize) {}

fn load(folder: &ImageFolder, size: u32) -> LoadedDataset {
    folder.load(&BaseTransform::new(size), &no_progress)
}

fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = fs::read(&path).unwrap();
                out.push((path.strip_prefix(root).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

fn jpeg_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(image)
        .unwrap();
    bytes
}

fn png_bytes(image: &DynamicImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png).unwrap();
    bytes.into_inner()
}

#[test]
fn demo_dataset_round_trips_and_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let options = DemoOptions {
        images: 16,
        seed: 11,
        ..DemoOptions::default()
    };
    let started = Instant::now();
    let summary = write_demo_dataset(&root.path().join("a"), &options).unwrap();
    eprintln!(
        "wrote {} demo images of {}px in {:?}",
        options.images,
        options.size,
        started.elapsed()
    );
    assert_eq!(summary.images, 16);
    assert_eq!(summary.class_names, DEMO_CLASSES);

    let folder = ImageFolder::scan(&summary.images_dir, Some(&summary.labels_dir)).unwrap();
    assert_eq!(folder.len(), 16);
    assert_eq!(folder.labelled_count(), 16);
    assert!(folder.unlabelled().is_empty());
    let classes = folder.class_names().expect("classes.txt beside labels/");
    assert_eq!(classes, DEMO_CLASSES);

    let calls = AtomicUsize::new(0);
    let loaded = folder.load(&BaseTransform::new(96), &|done, total| {
        assert!(done <= total && total == 16);
        calls.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(calls.into_inner(), 16);
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    assert_eq!(loaded.images.len(), 16);
    assert_eq!(loaded.images[0].name, "demo_0000.png");
    assert_eq!(loaded.images[15].stem, "demo_0015");
    for image in &loaded.images {
        assert_eq!(image.original_size, (options.size, options.size));
        assert_eq!(image.rgb.len(), 96 * 96 * 3);
        let label = image.label.as_ref().expect("every demo image has a label");
        assert_eq!(label.len(), 96 * 96);
        assert!(label.iter().all(|&v| usize::from(v) < classes.len()));
    }

    // The files on disk are exactly the in-memory scenes.
    let (rgb, label) = generate_demo_scene(5, options.size, options.seed);
    assert_eq!(
        load_one(&summary.images_dir.join("demo_0005.png")).unwrap(),
        rgb
    );
    let on_disk = image::open(summary.labels_dir.join("demo_0005.png")).unwrap();
    assert_eq!(on_disk.as_luma8(), Some(&label));

    // Same seed: byte-identical files. Another seed: different pictures.
    write_demo_dataset(&root.path().join("b"), &options).unwrap();
    let other = DemoOptions {
        seed: 12,
        ..options
    };
    write_demo_dataset(&root.path().join("c"), &other).unwrap();
    let a = files_under(&root.path().join("a"));
    assert_eq!(a.len(), 16 * 2 + 1);
    assert_eq!(a, files_under(&root.path().join("b")));
    let c = files_under(&root.path().join("c"));
    let differing = a.iter().zip(&c).filter(|(x, y)| x.1 != y.1).count();
    assert_eq!(
        differing,
        16 * 2,
        "every image and label differs; classes.txt does not"
    );
}

/// The 54-byte header of an uncompressed 24-bit BMP, without pixel data.
fn bmp_header(width: i32, height: i32) -> Vec<u8> {
    let mut bytes = b"BM".to_vec();
    bytes.extend_from_slice(&54u32.to_le_bytes()); // file size (not checked)
    bytes.extend_from_slice(&0u32.to_le_bytes()); // reserved
    bytes.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    bytes.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&height.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes()); // planes
    bytes.extend_from_slice(&24u16.to_le_bytes()); // bits per pixel
    for _ in 0..6 {
        bytes.extend_from_slice(&0u32.to_le_bytes()); // no compression, sizes, palette
    }
    bytes
}

#[test]
fn awkward_files_load_or_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let photo = RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
    let photo_jpeg = jpeg_bytes(&photo);
    let photo_png = png_bytes(&DynamicImage::ImageRgb8(photo.clone()));

    fs::write(root.join("good.jpg"), &photo_jpeg).unwrap();
    let grey = GrayImage::from_fn(30, 20, |x, _| Luma([(x * 8) as u8]));
    DynamicImage::ImageLuma8(grey)
        .save(root.join("grey.png"))
        .unwrap();
    let grey_alpha = ImageBuffer::from_fn(20, 20, |x, _| LumaA([(x * 10) as u8, 200u8]));
    DynamicImage::ImageLumaA8(grey_alpha)
        .save(root.join("grey_alpha.png"))
        .unwrap();
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(40, 40, |x, y| {
        Rgb([(x * 1600) as u16, (y * 1600) as u16, 65535])
    });
    DynamicImage::ImageRgb16(deep)
        .save(root.join("deep16.png"))
        .unwrap();
    let rgba = ImageBuffer::from_fn(24, 36, |_, y| Rgba([200u8, 10, (y * 7) as u8, 90]));
    DynamicImage::ImageRgba8(rgba)
        .save(root.join("rgba.png"))
        .unwrap();
    RgbImage::from_pixel(1, 1, Rgb([1, 2, 3]))
        .save(root.join("tiny.png"))
        .unwrap();
    fs::create_dir_all(root.join("nested/deeper")).unwrap();
    fs::write(root.join("nested/deeper/inner.PNG"), &photo_png).unwrap();
    // The content decides the format, not the extension.
    fs::write(root.join("png_named.jpg"), &photo_png).unwrap();

    let mut corrupt = photo_png.clone();
    for byte in corrupt.iter_mut().skip(40) {
        *byte = byte.wrapping_mul(31).wrapping_add(7);
    }
    fs::write(root.join("corrupt.png"), corrupt).unwrap();
    fs::write(
        root.join("truncated.png"),
        &photo_png[..photo_png.len() / 2],
    )
    .unwrap();
    // Cut inside the headers: the JPEG decoder is lenient about missing scan data but not this.
    fs::write(root.join("truncated.jpg"), &photo_jpeg[..120]).unwrap();
    fs::write(root.join("notes.jpg"), "this is not a picture\n").unwrap();
    fs::write(root.join("empty.webp"), b"").unwrap();
    // Headers claiming huge pictures must be refused before any pixel buffer is allocated.
    fs::write(root.join("huge_side.bmp"), bmp_header(30_000, 10)).unwrap();
    fs::write(root.join("huge_bytes.bmp"), bmp_header(15_000, 15_000)).unwrap();
    // Ignored: not an image extension, or hidden.
    fs::write(root.join("readme.txt"), "hello").unwrap();
    fs::write(root.join(".hidden.png"), &photo_png).unwrap();
    fs::create_dir_all(root.join(".cache")).unwrap();
    fs::write(root.join(".cache/thumb.png"), &photo_png).unwrap();

    let folder = ImageFolder::scan(root, None).unwrap();
    let names: Vec<&str> = folder.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "corrupt.png",
            "deep16.png",
            "empty.webp",
            "good.jpg",
            "grey.png",
            "grey_alpha.png",
            "huge_bytes.bmp",
            "huge_side.bmp",
            "nested/deeper/inner.PNG",
            "notes.jpg",
            "png_named.jpg",
            "rgba.png",
            "tiny.png",
            "truncated.jpg",
            "truncated.png",
        ]
    );
    assert!(folder.class_names().is_none());
    assert!(
        folder.unlabelled().is_empty(),
        "no label folder, nothing to report"
    );

    let loaded = load(&folder, 32);
    let loaded_names: Vec<&str> = loaded.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        loaded_names,
        [
            "deep16.png",
            "good.jpg",
            "grey.png",
            "grey_alpha.png",
            "nested/deeper/inner.PNG",
            "png_named.jpg",
            "rgba.png",
            "tiny.png",
        ]
    );
    let skipped: Vec<&str> = loaded.skipped.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "corrupt.png",
            "empty.webp",
            "huge_bytes.bmp",
            "huge_side.bmp",
            "notes.jpg",
            "truncated.jpg",
            "truncated.png"
        ]
    );
    for skip in &loaded.skipped {
        assert!(
            skip.reason
                .contains(skip.path.file_name().unwrap().to_str().unwrap()),
            "the reason names the file: {}",
            skip.reason
        );
    }
    for image in &loaded.images {
        assert_eq!(image.rgb.len(), 32 * 32 * 3, "{}", image.name);
        assert!(image.label.is_none());
    }
    for huge in ["huge_bytes.bmp", "huge_side.bmp"] {
        let skip = loaded.skipped.iter().find(|s| s.name == huge).unwrap();
        assert!(skip.reason.contains("too large"), "{}", skip.reason);
    }
    let by_name = |name: &str| loaded.images.iter().find(|i| i.name == name).unwrap();
    assert_eq!(by_name("grey.png").original_size, (30, 20));
    assert!(
        by_name("grey.png")
            .rgb
            .chunks(3)
            .all(|p| p[0] == p[1] && p[1] == p[2]),
        "greyscale becomes grey RGB"
    );
    // 16-bit values are scaled to 8 bits, not truncated: blue is 65535 -> 255.
    assert!(by_name("deep16.png").rgb.chunks(3).all(|p| p[2] == 255));
    assert!(
        by_name("rgba.png")
            .rgb
            .chunks(3)
            .all(|p| p[0] == 200 && p[1] == 10)
    );
    assert!(by_name("tiny.png").rgb.chunks(3).all(|p| p == [1, 2, 3]));

    assert!(load_one(&root.join("notes.jpg")).is_err());
    // A JPEG cut inside its scan data decodes leniently (the missing part is filled, as
    // browsers do); it must at least never panic and keep its size.
    let cut_scan = root.join("cut_scan.jpg");
    fs::write(&cut_scan, &photo_jpeg[..photo_jpeg.len() / 2]).unwrap();
    match load_one(&cut_scan) {
        Ok(image) => assert_eq!(image.dimensions(), (64, 48)),
        Err(error) => assert!(error.to_string().contains("cut_scan.jpg")),
    }
    assert_eq!(
        load_one(&root.join("rgba.png")).unwrap().dimensions(),
        (24, 36)
    );
}

#[test]
fn labels_that_do_not_fit_are_reported_with_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let labels = dir.path().join("labels");
    fs::create_dir_all(&images).unwrap();
    fs::create_dir_all(&labels).unwrap();
    fs::write(labels.join("classes.txt"), "a\nb\n").unwrap();
    for stem in ["fits", "small", "colour", "range", "unlabelled"] {
        RgbImage::from_pixel(40, 30, Rgb([9, 9, 9]))
            .save(images.join(format!("{stem}.png")))
            .unwrap();
    }
    GrayImage::from_fn(40, 30, |x, _| Luma([if x < 20 { 1 } else { IGNORE_LABEL }]))
        .save(labels.join("fits.png"))
        .unwrap();
    GrayImage::new(20, 15)
        .save(labels.join("small.png"))
        .unwrap();
    RgbImage::new(40, 30)
        .save(labels.join("colour.png"))
        .unwrap();
    GrayImage::from_pixel(40, 30, Luma([2]))
        .save(labels.join("range.png"))
        .unwrap();

    let folder = ImageFolder::scan(&images, Some(&labels)).unwrap();
    assert_eq!(folder.labelled_count(), 4);
    assert_eq!(folder.unlabelled(), ["unlabelled.png"]);
    assert_eq!(folder.class_names().unwrap(), ["a", "b"]);

    let loaded = load(&folder, 10);
    let names: Vec<&str> = loaded.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["fits.png", "unlabelled.png"]);
    let fits = loaded.images[0].label.as_ref().unwrap();
    assert!(fits.iter().all(|&v| v == 1 || v == IGNORE_LABEL));
    assert!(loaded.images[1].label.is_none());

    let reason = |name: &str| {
        loaded
            .skipped
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.reason.clone())
            .unwrap()
    };
    let small = reason("small.png");
    assert!(
        small.contains("labels") && small.contains("images") && small.contains("20x15"),
        "{small}"
    );
    let colour = reason("colour.png");
    assert!(
        colour.contains("colour.png") && colour.contains("8-bit"),
        "{colour}"
    );
    let range = reason("range.png");
    assert!(
        range.contains("range.png") && range.contains("class index 2"),
        "{range}"
    );
}

#[test]
fn empty_and_missing_folders_are_errors_that_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("holiday photos");
    fs::create_dir_all(empty.join("sub")).unwrap();
    fs::write(empty.join("notes.txt"), "no pictures here").unwrap();
    fs::write(empty.join(".thumb.jpg"), "hidden").unwrap();

    let error = ImageFolder::scan(&empty, None).unwrap_err();
    assert!(matches!(error, DatasetError::NoImages { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("holiday photos"), "{message}");
    assert!(
        message.contains("jpg") && message.contains("png") && message.contains("tiff"),
        "{message}"
    );

    let missing = dir.path().join("no such folder");
    let message = ImageFolder::scan(&missing, None).unwrap_err().to_string();
    assert!(
        message.contains("no such folder") && message.contains("does not exist"),
        "{message}"
    );

    let file = empty.join("notes.txt");
    let message = ImageFolder::scan(&file, None).unwrap_err().to_string();
    assert!(
        message.contains("notes.txt") && message.contains("not a folder"),
        "{message}"
    );

    // A missing label folder is reported too, rather than silently loading without labels.
    RgbImage::new(4, 4).save(empty.join("one.png")).unwrap();
    let message = ImageFolder::scan(&empty, Some(&missing))
        .unwrap_err()
        .to_string();
    assert!(message.contains("no such folder"), "{message}");

    // A folder whose every image fails gives no images, and `into_non_empty` names it.
    let broken = dir.path().join("broken");
    fs::create_dir_all(&broken).unwrap();
    fs::write(broken.join("a.jpg"), "text").unwrap();
    let loaded = load(&ImageFolder::scan(&broken, None).unwrap(), 16);
    assert!(loaded.images.is_empty());
    let message = loaded.into_non_empty().unwrap_err().to_string();
    assert!(
        message.contains("broken") && message.contains("a.jpg"),
        "{message}"
    );
}

#[test]
fn camvid_dev_scans_and_loads_with_labels() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/camvid-dev");
    let started = Instant::now();
    let folder = ImageFolder::scan(&root.join("images"), Some(&root.join("labels"))).unwrap();
    let scanned = started.elapsed();
    assert_eq!(folder.len(), 468);
    assert_eq!(folder.labelled_count(), 468);
    let classes = folder.class_names().expect("classes.txt beside labels/");
    assert_eq!(classes.len(), 11);
    assert_eq!(classes[0], "sky");
    assert_eq!(classes[10], "bicyclist");

    let started = Instant::now();
    let loaded = load(&folder, 160).into_non_empty().unwrap();
    eprintln!(
        "CamVid dev: scan {scanned:?}, load 468 images + labels at 160 in {:?}",
        started.elapsed()
    );
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    assert_eq!(loaded.images.len(), 468);
    let mut histogram = [0usize; 256];
    for image in &loaded.images {
        assert_eq!(image.original_size, (320, 240));
        assert_eq!(image.rgb.len(), 160 * 160 * 3);
        let label = image.label.as_ref().unwrap();
        assert_eq!(label.len(), 160 * 160);
        for &v in label {
            histogram[usize::from(v)] += 1;
        }
    }
    assert!(histogram[11..255].iter().all(|&n| n == 0));
    assert!(
        histogram[..11].iter().all(|&n| n > 0),
        "every class appears: {histogram:?}"
    );
}

/// A baseline JPEG with an APP1 Exif segment carrying `orientation`, spliced in after SOI.
fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
    let plain = jpeg_bytes(image);
    assert_eq!(&plain[..2], [0xFF, 0xD8]);
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2A\x00\x00\x00\x08"); // big endian, IFD at offset 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = plain[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&plain[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    // Left half red, right half blue, 40 wide and 20 high.
    let image = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    });
    let path = dir.path().join("portrait.jpg");
    fs::write(&path, jpeg_with_orientation(&image, 6)).unwrap();

    let rotated = load_one(&path).unwrap();
    // Orientation 6 means "rotate 90 degrees clockwise to display": the left half goes on top.
    assert_eq!(rotated.dimensions(), (20, 40));
    let top = rotated.get_pixel(10, 5).0;
    let bottom = rotated.get_pixel(10, 35).0;
    assert!(top[0] > 150 && top[2] < 100, "top is red: {top:?}");
    assert!(
        bottom[2] > 150 && bottom[0] < 100,
        "bottom is blue: {bottom:?}"
    );

    let loaded = load(&ImageFolder::scan(dir.path(), None).unwrap(), 8);
    assert_eq!(loaded.images[0].original_size, (20, 40));

    // Orientation 1 leaves the image as stored.
    fs::write(&path, jpeg_with_orientation(&image, 1)).unwrap();
    assert_eq!(load_one(&path).unwrap().dimensions(), (40, 20));
}

#[test]
fn base_transform_resizes_the_short_side_and_crops_the_centre() {
    let transform = BaseTransform::new(160);
    assert_eq!(transform.crop_box(320, 240), (40, 0, 240));
    assert_eq!(transform.crop_box(240, 320), (0, 40, 240));

    // Red in the 40 columns each side that the crop removes, green in the kept square.
    let image = RgbImage::from_fn(320, 240, |x, _| {
        if (40..280).contains(&x) {
            Rgb([0, 200, 0])
        } else {
            Rgb([255, 0, 0])
        }
    });
    let out = transform.apply_rgb(&DynamicImage::ImageRgb8(image));
    assert_eq!(out.dimensions(), (160, 160));
    assert!(
        out.pixels().all(|p| p.0 == [0, 200, 0]),
        "only the centre square is kept"
    );

    let label = GrayImage::from_fn(320, 240, |x, y| {
        Luma([if !(40..280).contains(&x) {
            9
        } else if y < 120 {
            1
        } else {
            2
        }])
    });
    let out = transform.apply_label(&label);
    assert_eq!(out.dimensions(), (160, 160));
    assert!((0..160).all(|x| out.get_pixel(x, 79).0 == [1] && out.get_pixel(x, 80).0 == [2]));

    // Upscaling works too: a 100x50 image becomes 160x160 from its centre 50x50.
    let small = DynamicImage::ImageRgb8(RgbImage::new(100, 50));
    assert_eq!(transform.crop_box(100, 50), (25, 0, 50));
    assert_eq!(transform.apply_rgb(&small).dimensions(), (160, 160));
}

#[cfg(unix)]
#[test]
fn symbolic_link_loops_end_and_count_each_image_once() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let farm = dir.path().join("farm");
    fs::create_dir_all(farm.join("inner")).unwrap();
    RgbImage::new(4, 4).save(farm.join("a.png")).unwrap();
    RgbImage::new(4, 4).save(farm.join("inner/b.png")).unwrap();
    // Two links back to the folder itself, one to its parent, one to a file.
    symlink(&farm, farm.join("loop1")).unwrap();
    symlink(&farm, farm.join("inner/loop2")).unwrap();
    symlink(dir.path(), farm.join("up")).unwrap();
    symlink(farm.join("a.png"), farm.join("alias.png")).unwrap();

    let (sender, receiver) = std::sync::mpsc::channel();
    let scanned = farm.clone();
    std::thread::spawn(move || {
        let _ = sender.send(ImageFolder::scan(&scanned, None).map(|folder| folder.len()));
    });
    let images = receiver
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the scan of a symbolic-link loop did not end")
        .unwrap();
    assert_eq!(
        images, 2,
        "each image once, through whichever path came first"
    );
}

/// Training scores its network after every epoch and `picie eval` scores a run's network
/// later: both must see the same pixels and labels, whatever the base size training cuts
/// its views from (labels used to be resized twice on the training side).
#[test]
fn training_and_picie_eval_score_the_same_evaluation_images_and_labels() {
    let folder = tempfile::tempdir().unwrap();
    let summary = write_demo_dataset(
        folder.path(),
        &DemoOptions {
            images: 4,
            size: 100,
            seed: 2,
        },
    )
    .unwrap();
    let load = |base: u32| {
        picie::data::TrainingData::load(
            &summary.images_dir,
            Some(&summary.labels_dir),
            base,
            64,
            &no_progress,
        )
        .unwrap()
    };
    // As `picie train` (base 96) and `picie eval` (decoded at the input size) load them.
    let training = load(96);
    let evaluation = load(64);
    let records = |stack: &picie::data::ImageStack| stack.to_records().unwrap();
    assert_eq!(
        records(&training.eval_images),
        records(&evaluation.eval_images)
    );
    assert_eq!(
        training.eval_labels.as_ref().map(records),
        evaluation.eval_labels.as_ref().map(records)
    );
    let first_label = picie::data::load_label(
        &summary
            .labels_dir
            .join(Path::new(&training.names[0]).with_extension("png")),
    )
    .unwrap();
    assert_eq!(
        training
            .eval_labels
            .as_ref()
            .unwrap()
            .get(0)
            .unwrap()
            .as_ref(),
        BaseTransform::new(64).apply_label(&first_label).into_raw(),
        "labels come straight from the file at the evaluation size"
    );
}

#[test]
fn a_held_out_prefix_splits_the_images_and_a_wrong_one_is_explained() {
    let folder = tempfile::tempdir().unwrap();
    let summary = write_demo_dataset(
        folder.path(),
        &DemoOptions {
            images: 6,
            size: 64,
            seed: 2,
        },
    )
    .unwrap();
    let data = picie::data::TrainingData::load(
        &summary.images_dir,
        Some(&summary.labels_dir),
        64,
        64,
        &no_progress,
    )
    .unwrap();
    let (kept, held) = data.split_held_out("demo_0004").unwrap();
    assert_eq!(held.names, ["demo_0004.png"]);
    assert_eq!(kept.len(), 5);
    assert!(!kept.names.iter().any(|name| name.starts_with("demo_0004")));
    assert_eq!(
        held.eval_images.get(0).unwrap(),
        data.eval_images.get(4).unwrap()
    );
    assert_eq!(
        held.eval_labels.as_ref().unwrap().get(0).unwrap(),
        data.eval_labels.as_ref().unwrap().get(4).unwrap()
    );
    assert_eq!(held.classes(), data.classes());

    let none = data.split_held_out("0006R0_").unwrap_err();
    assert!(
        none.contains("0006R0_") && none.contains("demo_0000.png"),
        "{none}"
    );
    let all = data.split_held_out("demo_").unwrap_err();
    assert!(all.contains("none would be left to train on"), "{all}");
}

#[test]
fn a_dataset_decoded_to_cache_files_holds_what_memory_holds_and_says_which_file_broke() {
    let folder = tempfile::tempdir().unwrap();
    let summary = write_demo_dataset(
        folder.path(),
        &DemoOptions {
            images: 6,
            size: 80,
            seed: 3,
        },
    )
    .unwrap();
    // A file that cannot be decoded: skipped in both, the others keep their order.
    std::fs::write(summary.images_dir.join("demo_0002.png"), b"not a png").unwrap();
    let cache = folder.path().join("run").join("decoded");
    let load = |storage: &DecodedStorage| {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let data = TrainingData::load_into(
            &summary.images_dir,
            Some(&summary.labels_dir),
            64,
            32,
            storage,
            &|_, total| {
                assert_eq!(total, 6);
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(calls.into_inner(), 6, "progress for every file");
        data
    };
    let in_memory = load(&DecodedStorage::Memory);
    let on_disk = load(&DecodedStorage::Disk(cache.clone()));
    // Under the budget, Auto keeps them in memory, and removes a killed run's cache files.
    let stale = folder.path().join("unused");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("bases.bin"), [0; 64]).unwrap();
    let auto = load(&DecodedStorage::auto(&stale));
    assert!(in_memory.cache_file().is_none() && auto.cache_file().is_none());
    assert!(!folder.path().join("unused").exists());
    assert_eq!(
        on_disk.cache_file(),
        Some(cache.join("bases.bin").as_path())
    );
    assert_eq!(on_disk.names, in_memory.names);
    assert_eq!(on_disk.len(), 5);
    assert_eq!(on_disk.skipped.len(), 1);
    assert_eq!(on_disk.classes(), in_memory.classes());
    let records = |stack: &picie::data::ImageStack| stack.to_records().unwrap();
    assert_eq!(records(&on_disk.bases), records(&in_memory.bases));
    assert_eq!(
        records(&on_disk.eval_images),
        records(&in_memory.eval_images)
    );
    assert_eq!(
        on_disk.eval_labels.as_ref().map(records),
        in_memory.eval_labels.as_ref().map(records)
    );
    let (kept, held) = on_disk.split_held_out("demo_0004").unwrap();
    assert_eq!(held.bases.get(0).unwrap(), in_memory.bases.get(3).unwrap());
    assert_eq!(kept.len(), 4);

    // The cache deleted under a running training: an error naming the file, not a panic.
    std::fs::File::create(cache.join("bases.bin")).unwrap();
    let error = on_disk.bases.get(4).unwrap_err().to_string();
    assert!(
        error.contains("bases.bin") && error.contains("start the run again"),
        "{error}"
    );
}
