//! The two PiCIE views: geometry agrees between the image and the feature side, parameters are
//! in range and reproducible, and the photometric operations do what torchvision does.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use picie::data::views::{
    BLUR_SIGMAS, GeometricParams, HUE_SHIFTS, JITTER_FACTORS, PhotometricParams, RgbPlanes,
    ViewParams, apply_photometric, build_views, draw_epoch_view_params, draw_view_params,
    geometric_on_features,
};
use picie::model::{IMAGENET_MEAN, IMAGENET_STD, images_to_tensor};

fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// An RGB image whose red channel is 4x and green channel 4y (exact in u8 for sides <= 64).
fn coordinate_image(side: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            rgb.extend_from_slice(&[(4 * x) as u8, (4 * y) as u8, 0]);
        }
    }
    rgb
}

/// A textured RGB image for the photometric and reproducibility tests.
fn pattern_image(side: usize, salt: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            let value =
                |k: usize| ((x * (7 + k) + y * (13 + 2 * k) + salt * 31 + x * y) % 256) as u8;
            rgb.extend_from_slice(&[value(0), value(1), value(2)]);
        }
    }
    rgb
}

#[test]
fn image_side_and_feature_side_geometry_agree() {
    let device = Device::flex();
    let (base, input) = (64usize, 32usize);
    let grid = input / 4; // 8 cells
    let cell = (base / grid) as f32; // 8 base pixels
    let image = coordinate_image(base);

    let mut geometries: Vec<GeometricParams> = (0..12)
        .map(|index| draw_view_params(3, 1, index, grid).geometric)
        .collect();
    geometries.extend([
        GeometricParams::identity(grid),
        GeometricParams {
            x0: 0,
            y0: 4,
            side: 4,
            flip: true,
        },
        GeometricParams {
            x0: 3,
            y0: 1,
            side: 5,
            flip: false,
        },
    ]);
    let params: Vec<ViewParams> = geometries
        .iter()
        .map(|&geometric| ViewParams {
            geometric,
            ..ViewParams::identity(grid)
        })
        .collect();
    let bases: Vec<&[u8]> = params.iter().map(|_| image.as_slice()).collect();
    let (view1, _) = build_views(&bases, base, input, &params, &device);
    let view1 = to_vec(view1);

    // The "feature map": the coordinate map sampled at the cell centres, in base pixels, with a
    // constant third channel so that the coordinates survive the L2 normalisation as ratios.
    let constant = 64.0f32;
    let batch = params.len();
    let mut map = vec![0f32; batch * 3 * grid * grid];
    for b in 0..batch {
        for j in 0..grid {
            for i in 0..grid {
                let at = |channel: usize| ((b * 3 + channel) * grid + j) * grid + i;
                map[at(0)] = (i as f32 + 0.5) * cell - 0.5;
                map[at(1)] = (j as f32 + 0.5) * cell - 0.5;
                map[at(2)] = constant;
            }
        }
    }
    let features = Tensor::<4>::from_data(TensorData::new(map, [batch, 3, grid, grid]), &device);
    let moved = to_vec(geometric_on_features(features, &geometries));

    let plane = input * input;
    let cells = grid * grid;
    let mut worst = 0f32;
    for b in 0..batch {
        for j in 0..grid {
            for i in 0..grid {
                // View 1 coordinates averaged over the 4x4 input pixels of feature cell (i, j).
                let mut image_side = [0f32; 2];
                for dy in 0..4 {
                    for dx in 0..4 {
                        let pixel = (4 * j + dy) * input + 4 * i + dx;
                        for (channel, sum) in image_side.iter_mut().enumerate() {
                            let normalised = view1[(b * 3 + channel) * plane + pixel];
                            let value = normalised * IMAGENET_STD[channel] + IMAGENET_MEAN[channel];
                            *sum += value * 255.0 / 4.0 / 16.0;
                        }
                    }
                }
                let at = |channel: usize| moved[(b * 3 + channel) * cells + j * grid + i];
                let feature_side = [at(0) / at(2) * constant, at(1) / at(2) * constant];
                for axis in 0..2 {
                    let error = (image_side[axis] - feature_side[axis]).abs();
                    worst = worst.max(error);
                    assert!(
                        error < cell,
                        "image {b} {:?} cell ({i}, {j}) axis {axis}: image side {image_side:?}, feature side {feature_side:?}",
                        geometries[b]
                    );
                }
            }
        }
    }
    eprintln!("worst disagreement {worst:.3} base pixels (one cell = {cell})");
}

#[test]
fn parameters_stay_in_range_with_the_right_probabilities() {
    let grid = 40;
    let draws = 4000;
    let mut counts = [0usize; 7];
    let mut sides = (usize::MAX, 0usize);
    for index in 0..draws {
        let params = draw_view_params(11, 2, index, grid);
        for photometric in [params.first, params.second] {
            for factor in [
                photometric.brightness,
                photometric.contrast,
                photometric.saturation,
            ]
            .into_iter()
            .flatten()
            {
                assert!(JITTER_FACTORS.contains(&factor), "{factor}");
            }
            if let Some(hue) = photometric.hue {
                assert!(HUE_SHIFTS.contains(&hue), "{hue}");
            }
            if let Some(sigma) = photometric.blur_sigma {
                assert!(BLUR_SIGMAS.contains(&sigma), "{sigma}");
            }
        }
        let p = params.first;
        counts[0] += usize::from(p.brightness.is_some());
        counts[1] += usize::from(p.contrast.is_some());
        counts[2] += usize::from(p.saturation.is_some());
        counts[3] += usize::from(p.hue.is_some());
        counts[4] += usize::from(p.grayscale);
        counts[5] += usize::from(p.blur_sigma.is_some());
        let g = params.geometric;
        counts[6] += usize::from(g.flip);
        assert!(g.side >= grid / 2 && g.side <= grid, "{g:?}");
        assert!(g.x0 + g.side <= grid && g.y0 + g.side <= grid, "{g:?}");
        sides = (sides.0.min(g.side), sides.1.max(g.side));
    }
    let expected = [0.8, 0.8, 0.8, 0.8, 0.2, 0.5, 0.5];
    for (count, want) in counts.iter().zip(expected) {
        let rate = *count as f64 / draws as f64;
        assert!((rate - want).abs() < 0.04, "rate {rate}, want {want}");
    }
    // The whole range of sides is used.
    assert_eq!(sides, (grid / 2, grid));
    // Tiny grids still give valid boxes.
    for grid in [0, 1, 2, 3] {
        for index in 0..50 {
            let g = draw_view_params(0, 0, index, grid).geometric;
            assert!(g.side >= 1 && g.x0 + g.side <= grid.max(1), "{g:?}");
        }
    }
}

#[test]
fn same_seed_same_views_other_epoch_other_views() {
    let device = Device::flex();
    let (base, input, grid) = (48usize, 24usize, 6usize);
    let images: Vec<Vec<u8>> = (0..3).map(|salt| pattern_image(base, salt)).collect();
    let bases: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();

    let params = draw_epoch_view_params(5, 3, 3, grid);
    assert_eq!(params, draw_epoch_view_params(5, 3, 3, grid));
    // Independent of order: image 2 alone gets the same draw.
    assert_eq!(params[2], draw_view_params(5, 3, 2, grid));
    let other_epoch = draw_epoch_view_params(5, 4, 3, grid);
    let other_seed = draw_epoch_view_params(6, 3, 3, grid);
    assert_ne!(params, other_epoch);
    assert_ne!(params, other_seed);
    assert_ne!(params[0], params[1]);

    let (a1, a2) = build_views(&bases, base, input, &params, &device);
    let (b1, b2) = build_views(&bases, base, input, &params, &device);
    assert_eq!(a1.dims(), [3, 3, input, input]);
    assert_eq!(a2.dims(), [3, 3, input, input]);
    let (a1, a2) = (to_vec(a1), to_vec(a2));
    assert_eq!(a1, to_vec(b1));
    assert_eq!(a2, to_vec(b2));
    let (c1, c2) = build_views(&bases, base, input, &other_epoch, &device);
    assert_ne!(a1, to_vec(c1));
    assert_ne!(a2, to_vec(c2));
}

#[test]
fn identity_photometric_leaves_the_image_unchanged() {
    let rgb = pattern_image(20, 1);
    let original = RgbPlanes::from_rgb8(&rgb, 20, 20).expect("valid image");
    let mut image = original.clone();
    apply_photometric(&mut image, &PhotometricParams::IDENTITY);
    assert_eq!(image, original);
    assert!(PhotometricParams::default().is_identity());

    // Factors of one and a zero hue shift change (almost) nothing either.
    let neutral = PhotometricParams {
        brightness: Some(1.0),
        contrast: Some(1.0),
        saturation: Some(1.0),
        hue: Some(0.0),
        ..PhotometricParams::IDENTITY
    };
    apply_photometric(&mut image, &neutral);
    for (a, b) in image.data().iter().zip(original.data()) {
        assert!((a - b).abs() < 1e-5);
    }

    // With identity parameters and base = input, both views are the normalised image.
    let device = Device::flex();
    let (view1, view2) = build_views(&[&rgb], 20, 20, &[ViewParams::identity(5)], &device);
    let plain = to_vec(images_to_tensor(&[&rgb], 20, &device));
    for view in [to_vec(view1), to_vec(view2)] {
        for (a, b) in view.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

#[test]
fn wrong_sized_images_are_refused() {
    assert!(RgbPlanes::from_rgb8(&[0u8; 11], 2, 2).is_none());
    assert!(RgbPlanes::from_rgb8(&[0u8; 12], 2, 2).is_some());
}

#[test]
fn greyscale_makes_channels_equal() {
    let rgb = pattern_image(16, 2);
    let mut image = RgbPlanes::from_rgb8(&rgb, 16, 16).expect("valid image");
    apply_photometric(
        &mut image,
        &PhotometricParams {
            grayscale: true,
            ..PhotometricParams::IDENTITY
        },
    );
    for y in 0..16 {
        for x in 0..16 {
            let [r, g, b] = image.pixel(x, y).expect("inside");
            assert_eq!(r, g);
            assert_eq!(g, b);
            let source = &rgb[(y * 16 + x) * 3..][..3];
            let luma = (0.2989 * f32::from(source[0])
                + 0.587 * f32::from(source[1])
                + 0.114 * f32::from(source[2]))
                / 255.0;
            assert!((r - luma).abs() < 1e-5);
        }
    }
}

/// A one-pixel image with the given colour.
fn pixel(rgb: [f32; 3]) -> RgbPlanes {
    let bytes: Vec<u8> = rgb.iter().map(|v| (v * 255.0).round() as u8).collect();
    RgbPlanes::from_rgb8(&bytes, 1, 1).expect("valid image")
}

fn photometric_of(image: &RgbPlanes, params: PhotometricParams) -> RgbPlanes {
    let mut image = image.clone();
    apply_photometric(&mut image, &params);
    image
}

#[test]
fn colour_operations_follow_torchvision() {
    let close = |got: [f32; 3], want: [f32; 3]| {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    };
    let red = pixel([1.0, 0.0, 0.0]);
    // A third of a turn takes red to green, minus a third to blue.
    let shifted = photometric_of(
        &red,
        PhotometricParams {
            hue: Some(1.0 / 3.0),
            ..Default::default()
        },
    );
    close(shifted.pixel(0, 0).unwrap(), [0.0, 1.0, 0.0]);
    let shifted = photometric_of(
        &red,
        PhotometricParams {
            hue: Some(-1.0 / 3.0),
            ..Default::default()
        },
    );
    close(shifted.pixel(0, 0).unwrap(), [0.0, 0.0, 1.0]);
    // Brightness scales and clamps.
    let grey = pixel([0.4, 0.6, 0.8]);
    let bright = photometric_of(
        &grey,
        PhotometricParams {
            brightness: Some(1.3),
            ..Default::default()
        },
    );
    let [r, g, b] = grey.pixel(0, 0).unwrap();
    close(
        bright.pixel(0, 0).unwrap(),
        [r * 1.3, g * 1.3, (b * 1.3).min(1.0)],
    );
    // Saturation 0.7 blends 30% of the luma in.
    let luma = 0.2989 * r + 0.587 * g + 0.114 * b;
    let pale = photometric_of(
        &grey,
        PhotometricParams {
            saturation: Some(0.7),
            ..Default::default()
        },
    );
    close(
        pale.pixel(0, 0).unwrap(),
        [
            0.7 * r + 0.3 * luma,
            0.7 * g + 0.3 * luma,
            0.7 * b + 0.3 * luma,
        ],
    );
    // Contrast blends with the mean luma of the whole image.
    let rgb = pattern_image(8, 3);
    let image = RgbPlanes::from_rgb8(&rgb, 8, 8).unwrap();
    let mean_luma: f32 = (0..8)
        .flat_map(|y| (0..8).map(move |x| (x, y)))
        .map(|(x, y)| {
            let [r, g, b] = image.pixel(x, y).unwrap();
            0.2989 * r + 0.587 * g + 0.114 * b
        })
        .sum::<f32>()
        / 64.0;
    let flat = photometric_of(
        &image,
        PhotometricParams {
            contrast: Some(0.75),
            ..Default::default()
        },
    );
    for (x, y) in [(0, 0), (3, 5), (7, 7)] {
        let [r, g, b] = image.pixel(x, y).unwrap();
        let want = [r, g, b].map(|v| (0.75 * v + 0.25 * mean_luma).clamp(0.0, 1.0));
        close(flat.pixel(x, y).unwrap(), want);
    }
}

#[test]
fn blur_keeps_flat_images_and_smooths_edges() {
    let side = 12;
    let flat = RgbPlanes::from_rgb8(&vec![100u8; side * side * 3], side, side).unwrap();
    for sigma in [0.1f32, 1.0, 2.0] {
        let blurred = photometric_of(
            &flat,
            PhotometricParams {
                blur_sigma: Some(sigma),
                ..Default::default()
            },
        );
        for (a, b) in blurred.data().iter().zip(flat.data()) {
            assert!((a - b).abs() < 1e-5);
        }
    }
    // A vertical edge: blurring spreads it but keeps the values in [0, 1]; sigma 0.1 is
    // (numerically) no blur.
    let mut rgb = vec![0u8; side * side * 3];
    for y in 0..side {
        for x in side / 2..side {
            rgb[(y * side + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
        }
    }
    let edge = RgbPlanes::from_rgb8(&rgb, side, side).unwrap();
    let sharp = photometric_of(
        &edge,
        PhotometricParams {
            blur_sigma: Some(0.1),
            ..Default::default()
        },
    );
    for (a, b) in sharp.data().iter().zip(edge.data()) {
        assert!((a - b).abs() < 1e-5);
    }
    let soft = photometric_of(
        &edge,
        PhotometricParams {
            blur_sigma: Some(1.5),
            ..Default::default()
        },
    );
    let [left, ..] = soft.pixel(side / 2 - 1, 4).unwrap();
    let [right, ..] = soft.pixel(side / 2, 4).unwrap();
    assert!(left > 0.1 && left < 0.5, "{left}");
    assert!(right > 0.5 && right < 0.9, "{right}");
    // Symmetric kernel: the two sides of the edge mirror each other.
    assert!((left + right - 1.0).abs() < 1e-5);
    assert!(soft.data().iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn gradients_flow_through_geometry_on_features() {
    let device = Device::flex().autodiff();
    let shape = [2, 4, 6, 6];
    let values: Vec<f32> = (0..2 * 4 * 36)
        .map(|i| ((i * 37 % 19) as f32 - 9.0) / 9.0)
        .collect();
    let features = Tensor::<4>::from_data(TensorData::new(values, shape), &device).require_grad();
    let geometries = [
        GeometricParams {
            x0: 1,
            y0: 2,
            side: 4,
            flip: true,
        },
        GeometricParams {
            x0: 0,
            y0: 0,
            side: 6,
            flip: false,
        },
    ];
    let moved = geometric_on_features(features.clone(), &geometries);
    assert_eq!(moved.dims(), shape);
    let weights: Vec<f32> = (0..2 * 4 * 36).map(|i| (i % 7) as f32 - 3.0).collect();
    let weights = Tensor::<4>::from_data(TensorData::new(weights, shape), &device);
    let grads = (moved * weights).sum().backward();
    let grad = to_vec(features.grad(&grads).expect("features have a gradient"));
    assert!(grad.iter().any(|v| v.abs() > 1e-6));
    assert!(grad.iter().all(|v| v.is_finite()));
    // Unit length over channels.
    let moved = to_vec(geometric_on_features(
        features.clone().detach(),
        &geometries,
    ));
    for b in 0..2 {
        for pixel in 0..36 {
            let norm: f32 = (0..4)
                .map(|d| moved[(b * 4 + d) * 36 + pixel].powi(2))
                .sum();
            assert!((norm - 1.0).abs() < 1e-4);
        }
    }
}

#[test]
fn build_time_of_a_batch() {
    // 16 images, base 320 -> input 160, as the default training configuration.
    let device = Device::flex();
    let (base, input) = (320usize, 160usize);
    let images: Vec<Vec<u8>> = (0..16).map(|salt| pattern_image(base, salt)).collect();
    let bases: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let params = draw_epoch_view_params(0, 0, 16, input / 4);
    let started = Instant::now();
    let (view1, view2) = build_views(&bases, base, input, &params, &device);
    let elapsed = started.elapsed();
    assert_eq!(view1.dims(), [16, 3, input, input]);
    assert_eq!(view2.dims(), [16, 3, input, input]);
    eprintln!(
        "build_views: 16 images {base} -> {input} in {:.1} ms on {} threads",
        elapsed.as_secs_f64() * 1000.0,
        rayon::current_num_threads()
    );
}

#[test]
fn resize_is_antialiased_like_pytorch() {
    // A horizontal ramp 0, 32, ..., 224 shrunk from 8 to 4 pixels. PyTorch's
    // `interpolate(mode="bilinear", antialias=True)` (and PIL) give 32 * (5/7, 2.5, 4.5, 44/7):
    // a triangle twice as wide, renormalised at the borders.
    let side = 8;
    let mut rgb = Vec::new();
    for _ in 0..side {
        for x in 0..side {
            rgb.extend_from_slice(&[(32 * x) as u8, 0, 0]);
        }
    }
    let device = Device::flex();
    let (view1, _) = build_views(&[&rgb], side, 4, &[ViewParams::identity(1)], &device);
    let red: Vec<f32> = to_vec(view1)[..16]
        .iter()
        .map(|v| (v * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0 / 32.0)
        .collect();
    let want = [5.0 / 7.0, 2.5, 4.5, 44.0 / 7.0];
    for row in red.chunks(4) {
        for (got, want) in row.iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{row:?}");
        }
    }
}
