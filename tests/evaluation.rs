//! Evaluation: Hungarian matching against brute force, perfect and hand-computed scores, and
//! the logits-upsampling prediction helper on the Flex CPU device.

use burn::tensor::{Device, Tensor, TensorData};
use picie::cluster::PixelLabels;
use picie::eval::{self, ConfusionMatrix, EvalError, Evaluation, IGNORE_LABEL};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The best total of a one-to-one matching of the smaller side into the larger, by trying
/// every injective map.
fn brute_force_best(confusion: &ConfusionMatrix) -> u64 {
    fn search(
        confusion: &ConfusionMatrix,
        cluster: usize,
        used: &mut Vec<bool>,
        transpose: bool,
    ) -> u64 {
        let (rows, columns) = if transpose {
            (confusion.classes, confusion.clusters)
        } else {
            (confusion.clusters, confusion.classes)
        };
        if cluster == rows {
            return 0;
        }
        let mut best = 0;
        for column in 0..columns {
            if used[column] {
                continue;
            }
            used[column] = true;
            let weight = if transpose {
                confusion.get(column, cluster)
            } else {
                confusion.get(cluster, column)
            };
            best = best.max(weight + search(confusion, cluster + 1, used, transpose));
            used[column] = false;
        }
        best
    }
    let transpose = confusion.clusters > confusion.classes;
    let columns = confusion.clusters.max(confusion.classes);
    search(confusion, 0, &mut vec![false; columns], transpose)
}

fn random_confusion(rng: &mut ChaCha8Rng, clusters: usize, classes: usize) -> ConfusionMatrix {
    let mut confusion = ConfusionMatrix::new(clusters, classes);
    for count in &mut confusion.counts {
        *count = rng.random_range(0..1000);
    }
    confusion
}

#[test]
fn matching_equals_brute_force() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (clusters, classes) in [(4, 4), (5, 5), (3, 5), (5, 3)] {
        for _ in 0..25 {
            let confusion = random_confusion(&mut rng, clusters, classes);
            let evaluation = Evaluation::from_confusion(&confusion);
            // The assignment is one-to-one and its total is the brute-force optimum.
            let matched: Vec<(usize, usize)> = evaluation
                .assignment
                .iter()
                .enumerate()
                .filter_map(|(k, c)| c.map(|c| (k, c)))
                .collect();
            assert_eq!(matched.len(), clusters.min(classes));
            let mut classes_used: Vec<usize> = matched.iter().map(|&(_, c)| c).collect();
            classes_used.sort_unstable();
            classes_used.dedup();
            assert_eq!(classes_used.len(), matched.len());
            let total: u64 = matched.iter().map(|&(k, c)| confusion.get(k, c)).sum();
            let best = brute_force_best(&confusion);
            assert_eq!(total, best, "{clusters}x{classes}: {:?}", confusion.counts);
            let accuracy = 100.0 * best as f64 / confusion.total() as f64;
            assert!((evaluation.accuracy - accuracy).abs() < 1e-9);
        }
    }
}

#[test]
fn permuted_labels_score_perfectly() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let classes = 6;
    let permutation = [3u8, 0, 5, 1, 4, 2];
    let labels: Vec<u8> = (0..5000)
        .map(|_| {
            if rng.random_bool(0.1) {
                IGNORE_LABEL
            } else {
                rng.random_range(0..classes as u8)
            }
        })
        .collect();
    // Ignored pixels get arbitrary predictions: they must not count.
    let predictions: Vec<u8> = labels
        .iter()
        .map(|&label| {
            if label == IGNORE_LABEL {
                rng.random_range(0..classes as u8)
            } else {
                permutation[usize::from(label)]
            }
        })
        .collect();
    for clusters in [classes, classes + 2] {
        let mut confusion = ConfusionMatrix::new(clusters, classes);
        confusion.add(&predictions, &labels).unwrap();
        let evaluation = Evaluation::from_confusion(&confusion);
        assert_eq!(evaluation.accuracy, 100.0);
        assert_eq!(evaluation.mean_iou, 100.0);
        assert!(
            evaluation
                .per_class_iou
                .iter()
                .all(|&iou| iou == Some(100.0))
        );
        for (class, &cluster) in permutation.iter().enumerate() {
            assert_eq!(evaluation.assignment[usize::from(cluster)], Some(class));
        }
    }
}

#[test]
fn hand_computed_scores_with_an_absent_class_and_ignored_pixels() {
    // (prediction, label, pixels); class 3 never occurs, 255 and 7 (>= C) are ignored.
    let pixels = [
        (0u8, 0u8, 4),
        (0, 1, 1),
        (1, 1, 3),
        (2, 2, 2),
        (2, 0, 1),
        (1, IGNORE_LABEL, 2),
        (0, 7, 1),
    ];
    let mut predictions = Vec::new();
    let mut labels = Vec::new();
    for (prediction, label, count) in pixels {
        predictions.extend(std::iter::repeat_n(prediction, count));
        labels.extend(std::iter::repeat_n(label, count));
    }
    let mut confusion = ConfusionMatrix::new(3, 4);
    confusion.add(&predictions, &labels).unwrap();
    assert_eq!(confusion.counts, vec![4, 1, 0, 0, 0, 3, 0, 0, 1, 0, 2, 0]);
    assert_eq!(confusion.total(), 11);
    let evaluation = Evaluation::from_confusion(&confusion);
    assert_eq!(evaluation.assignment, vec![Some(0), Some(1), Some(2)]);
    // Matched 4 + 3 + 2 of 11 pixels.
    assert!((evaluation.accuracy - 900.0 / 11.0).abs() < 1e-9);
    // IoU: c0 4 / (5 + 5 - 4), c1 3 / (4 + 3 - 3), c2 2 / (2 + 3 - 2), c3 absent.
    let expected = [400.0 / 6.0, 75.0, 200.0 / 3.0];
    for (got, want) in evaluation.per_class_iou.iter().zip(expected) {
        assert!((got.unwrap() - want).abs() < 1e-9);
    }
    assert_eq!(evaluation.per_class_iou[3], None);
    let mean = expected.iter().sum::<f64>() / 3.0;
    assert!((evaluation.mean_iou - mean).abs() < 1e-9);

    let json = serde_json::to_value(&evaluation).unwrap();
    assert!((json["acc"].as_f64().unwrap() - 900.0 / 11.0).abs() < 1e-9);
    assert!((json["miou"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert_eq!(json["per_class_iou"].as_array().unwrap().len(), 4);
    assert!(json["per_class_iou"][3].is_null());
}

#[test]
fn unmatched_clusters_count_as_wrong() {
    // Three clusters, two classes: cluster 2 is left unmatched.
    let predictions: Vec<u16> = [vec![0; 5], vec![1; 4], vec![2; 1]].concat();
    let labels: Vec<u8> = [vec![0; 5], vec![1; 4], vec![0; 1]].concat();
    let mut confusion = ConfusionMatrix::new(3, 2);
    confusion
        .add_labels(&PixelLabels::U16(predictions), &labels)
        .unwrap();
    let evaluation = Evaluation::from_confusion(&confusion);
    assert_eq!(evaluation.assignment, vec![Some(0), Some(1), None]);
    assert!((evaluation.accuracy - 90.0).abs() < 1e-9);
    // c0: 5 / (6 + 5 - 5); c1: 4 / (4 + 4 - 4).
    assert!((evaluation.per_class_iou[0].unwrap() - 500.0 / 6.0).abs() < 1e-9);
    assert_eq!(evaluation.per_class_iou[1], Some(100.0));
}

#[test]
fn confusion_errors_leave_the_matrix_untouched() {
    let mut confusion = ConfusionMatrix::new(2, 2);
    assert!(matches!(
        confusion.add(&[0u8, 1], &[0]),
        Err(EvalError::LengthMismatch { .. })
    ));
    assert!(matches!(
        confusion.add(&[0u8, 2], &[0, 1]),
        Err(EvalError::PredictionOutOfRange { .. })
    ));
    assert_eq!(confusion.total(), 0);
    assert!(confusion.merge(&ConfusionMatrix::new(2, 3)).is_err());
    let empty = Evaluation::from_confusion(&confusion);
    assert_eq!((empty.accuracy, empty.mean_iou), (0.0, 0.0));
    let degenerate = Evaluation::from_confusion(&ConfusionMatrix::new(0, 3));
    assert_eq!(degenerate.per_class_iou, vec![None; 3]);
}

/// Bilinear resize of one `h x w` map, `align_corners = false` (PyTorch's formula).
fn bilinear(map: &[f64], [h, w]: [usize; 2], [out_h, out_w]: [usize; 2]) -> Vec<f64> {
    let source = |dst: usize, input: usize, output: usize| -> (usize, usize, f64) {
        let position = ((dst as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0);
        let low = (position.floor() as usize).min(input - 1);
        let high = (low + 1).min(input - 1);
        (low, high, position - low as f64)
    };
    let mut out = Vec::with_capacity(out_h * out_w);
    for y in 0..out_h {
        let (y0, y1, fy) = source(y, h, out_h);
        for x in 0..out_w {
            let (x0, x1, fx) = source(x, w, out_w);
            let at = |yy: usize, xx: usize| map[yy * w + xx];
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[test]
fn upsampled_logits_argmax_matches_a_hand_made_case() {
    let device = Device::flex();
    let (batch, dim, h, w) = (2, 2, 2, 3);
    // Pixel features (x, y) per image, row-major over the 2x3 map.
    let pixels: [[(f64, f64); 6]; 2] = [
        [
            (1.0, 0.0),
            (0.0, 1.0),
            (-1.0, 0.1),
            (0.6, 0.8),
            (0.9, -0.4),
            (-0.3, -0.9),
        ],
        [
            (-0.8, 0.6),
            (0.2, -1.0),
            (0.7, 0.7),
            (0.1, 0.95),
            (-1.0, -0.2),
            (0.95, 0.1),
        ],
    ];
    let centroids = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)];
    let clusters = centroids.len();
    // [B, D, h, w] layout.
    let mut values = Vec::new();
    for image in &pixels {
        for channel in 0..dim {
            for &(x, y) in image {
                values.push(if channel == 0 { x } else { y } as f32);
            }
        }
    }
    let features = Tensor::<4>::from_data(TensorData::new(values, [batch, dim, h, w]), &device);
    let centroid_values: Vec<f32> = centroids
        .iter()
        .flat_map(|&(x, y)| [x as f32, y as f32])
        .collect();
    let centroid_tensor = || {
        Tensor::<2>::from_data(
            TensorData::new(centroid_values.clone(), [clusters, dim]),
            &device,
        )
    };

    // At the feature resolution: the nearest centroid of each pixel.
    let same = eval::upsample_logits_argmax(features.clone(), centroid_tensor(), [h, w]).unwrap();
    let expected_same = [vec![0u8, 1, 2, 1, 0, 3], vec![2u8, 3, 0, 1, 2, 0]];
    for (got, want) in same.iter().zip(&expected_same) {
        assert_eq!(got.as_u8().unwrap(), want.as_slice());
    }

    // Upsampled to 5x7: the argmax of the bilinearly interpolated logits.
    let out = [5, 7];
    let predicted = eval::upsample_logits_argmax(features, centroid_tensor(), out).unwrap();
    assert_eq!(predicted.len(), batch);
    let mut checked = 0;
    for (image, labels) in pixels.iter().zip(&predicted) {
        let logits: Vec<Vec<f64>> = centroids
            .iter()
            .map(|&(cx, cy)| {
                let map: Vec<f64> = image.iter().map(|&(x, y)| x * cx + y * cy).collect();
                bilinear(&map, [h, w], out)
            })
            .collect();
        let labels = labels.as_u8().unwrap();
        assert_eq!(labels.len(), out[0] * out[1]);
        for (pixel, &label) in labels.iter().enumerate() {
            let mut order: Vec<usize> = (0..clusters).collect();
            order.sort_by(|&a, &b| logits[b][pixel].total_cmp(&logits[a][pixel]));
            let margin = logits[order[0]][pixel] - logits[order[1]][pixel];
            if margin > 1e-4 {
                assert_eq!(usize::from(label), order[0], "pixel {pixel}");
                checked += 1;
            }
        }
    }
    // Near-ties are skipped; nearly all 70 pixels must have been compared.
    assert!(checked >= 60, "only {checked} pixels compared");

    let wrong_dim = Tensor::<2>::zeros([clusters, 3], &device);
    let features = Tensor::<4>::zeros([1, dim, h, w], &device);
    assert!(matches!(
        eval::upsample_logits_argmax(features, wrong_dim, out),
        Err(EvalError::DimensionMismatch { .. })
    ));
}
