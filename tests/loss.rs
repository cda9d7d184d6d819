//! The PiCIE loss against values computed by hand and by a plain f64 loop.

use burn::tensor::{Device, Int, Tensor, TensorData};
use picie::loss::{
    BalanceMode, class_weights, cluster_cross_entropy, overclustering_weights, picie_loss,
};

fn features(values: &[f32], shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn centroids(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn labels(values: &[i64], shape: [usize; 3], device: &Device) -> Tensor<3, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn weights(values: Option<&[f32]>, device: &Device) -> Option<Tensor<1>> {
    values.map(|values| Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device))
}

fn scalar(tensor: Tensor<1>) -> f32 {
    let values = tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    assert_eq!(values.len(), 1, "the loss is a one-element tensor");
    values[0]
}

/// PyTorch's `F.cross_entropy(einsum("bdhw,kd->bkhw", z, mu), y, weight=w)`, in f64.
fn reference_cross_entropy(
    features: &[f32],
    [batch, dim, height, width]: [usize; 4],
    centroids: &[f32],
    labels: &[i64],
    weights: Option<&[f32]>,
) -> f64 {
    let clusters = centroids.len() / dim;
    let plane = height * width;
    let (mut numerator, mut denominator) = (0.0f64, 0.0f64);
    for b in 0..batch {
        for pixel in 0..plane {
            let logits: Vec<f64> = (0..clusters)
                .map(|k| {
                    (0..dim)
                        .map(|d| {
                            f64::from(features[(b * dim + d) * plane + pixel])
                                * f64::from(centroids[k * dim + d])
                        })
                        .sum()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            let label = labels[b * plane + pixel] as usize;
            let weight = weights.map_or(1.0, |w| f64::from(w[label]));
            numerator += weight * (log_sum - logits[label]);
            denominator += weight;
        }
    }
    numerator / denominator
}

fn unit_features(raw: &[f32], [batch, dim, height, width]: [usize; 4]) -> Vec<f32> {
    let plane = height * width;
    let mut out = raw.to_vec();
    for b in 0..batch {
        for pixel in 0..plane {
            let norm = (0..dim)
                .map(|d| raw[(b * dim + d) * plane + pixel].powi(2))
                .sum::<f32>()
                .sqrt();
            for d in 0..dim {
                out[(b * dim + d) * plane + pixel] /= norm;
            }
        }
    }
    out
}

/// A small deterministic pseudo-random sequence (no rand needed in the test).
fn sequence(count: usize, salt: u32) -> Vec<f32> {
    (0..count)
        .map(|index| {
            let x = (index as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(salt.wrapping_mul(40_503));
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn single_pixel_matches_hand_value() {
    let device = Device::flex();
    // z = (1, 0), mu = [(1, 0), (0, 1)], y = 0: logits (1, 0), loss = ln(1 + e^-1).
    let loss = cluster_cross_entropy(
        features(&[1.0, 0.0], [1, 2, 1, 1], &device),
        centroids(&[1.0, 0.0, 0.0, 1.0], [2, 2], &device),
        labels(&[0], [1, 1, 1], &device),
        None,
    );
    let expected = (1.0f64 + (-1.0f64).exp()).ln();
    assert!((f64::from(scalar(loss)) - expected).abs() < 1e-6);
}

#[test]
fn weighted_two_pixels_match_hand_value() {
    let device = Device::flex();
    // Pixel a: z = (1, 0), y = 0: nll = ln(1 + e^-1). Pixel b: z = (1, 0), y = 1: nll = ln(1 + e).
    // Weights (0.25, 0.75): (0.25 * nll_a + 0.75 * nll_b) / (0.25 + 0.75).
    let loss = cluster_cross_entropy(
        features(&[1.0, 1.0, 0.0, 0.0], [1, 2, 1, 2], &device),
        centroids(&[1.0, 0.0, 0.0, 1.0], [2, 2], &device),
        labels(&[0, 1], [1, 1, 2], &device),
        weights(Some(&[0.25, 0.75]), &device),
    );
    let nll_a = (1.0f64 + (-1.0f64).exp()).ln();
    let nll_b = (1.0f64 + 1.0f64.exp()).ln();
    let expected = 0.25 * nll_a + 0.75 * nll_b;
    assert!((f64::from(scalar(loss)) - expected).abs() < 1e-6);
    // Unweighted it is the plain mean.
    let loss = cluster_cross_entropy(
        features(&[1.0, 1.0, 0.0, 0.0], [1, 2, 1, 2], &device),
        centroids(&[1.0, 0.0, 0.0, 1.0], [2, 2], &device),
        labels(&[0, 1], [1, 1, 2], &device),
        None,
    );
    assert!((f64::from(scalar(loss)) - (nll_a + nll_b) / 2.0).abs() < 1e-6);
}

#[test]
fn class_weights_of_each_mode() {
    let counts = [1u64, 3, 0, 4];
    let reference = class_weights(&counts, BalanceMode::Reference).expect("weights");
    for (got, want) in reference.iter().zip([0.125f32, 0.375, 0.0, 0.5]) {
        assert!((got - want).abs() < 1e-7, "{reference:?}");
    }
    let inverse = class_weights(&counts, BalanceMode::Inverse).expect("weights");
    // 1 / max(count, 1) = (1, 1/3, 1, 1/4), sum 31/12, scaled to sum to K = 4.
    let scale = 4.0 / (31.0 / 12.0);
    for (got, want) in inverse.iter().zip([scale, scale / 3.0, scale, scale / 4.0]) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{inverse:?}");
    }
    assert!((inverse.iter().sum::<f32>() - 4.0).abs() < 1e-5);
    assert_eq!(class_weights(&counts, BalanceMode::None), None);
    // Degenerate inputs give no weights instead of NaN.
    assert_eq!(class_weights(&[], BalanceMode::Inverse), None);
    assert_eq!(class_weights(&[0, 0], BalanceMode::Reference), None);
}

#[test]
fn balance_mode_names_round_trip() {
    for mode in BalanceMode::ALL {
        assert_eq!(mode.name().parse::<BalanceMode>(), Ok(mode));
        let json = serde_json::to_string(&mode).expect("serialise");
        assert_eq!(json, format!("\"{}\"", mode.name()));
        assert_eq!(
            serde_json::from_str::<BalanceMode>(&json).expect("parse"),
            mode
        );
    }
    assert!("frequency".parse::<BalanceMode>().is_err());
}

#[test]
fn cross_entropy_matches_f64_loop_in_all_balance_modes() {
    let device = Device::flex();
    let shape = [2, 3, 2, 3];
    let z = unit_features(&sequence(2 * 3 * 2 * 3, 1), shape);
    // Centroids need not be unit vectors for the formula.
    let mu = sequence(3 * 3, 7);
    let y: Vec<i64> = (0..12).map(|i| (i * 7 % 3) as i64).collect();
    let mut counts = [0u64; 3];
    for &label in &y {
        counts[label as usize] += 1;
    }
    for mode in BalanceMode::ALL {
        let w = class_weights(&counts, mode);
        let got = scalar(cluster_cross_entropy(
            features(&z, shape, &device),
            centroids(&mu, [3, 3], &device),
            labels(&y, [2, 2, 3], &device),
            weights(w.as_deref(), &device),
        ));
        let want = reference_cross_entropy(&z, shape, &mu, &y, w.as_deref());
        assert!(
            (f64::from(got) - want).abs() < 1e-5,
            "{mode}: got {got}, want {want}"
        );
    }
}

#[test]
fn total_combines_the_four_terms() {
    let device = Device::flex();
    let shape = [2, 2, 2, 2];
    let z1 = unit_features(&sequence(16, 3), shape);
    let z2 = unit_features(&sequence(16, 5), shape);
    let mu1 = [0.6f32, 0.8, -1.0, 0.0];
    let mu2 = [0.0f32, 1.0, 0.8, -0.6];
    let y1: Vec<i64> = vec![0, 1, 1, 0, 1, 1, 1, 0];
    let y2: Vec<i64> = vec![1, 1, 0, 0, 0, 1, 0, 0];
    let w1 = class_weights(&[3, 5], BalanceMode::Reference);
    let w2 = class_weights(&[5, 3], BalanceMode::Inverse);
    let loss = picie_loss(
        features(&z1, shape, &device),
        features(&z2, shape, &device),
        centroids(&mu1, [2, 2], &device),
        centroids(&mu2, [2, 2], &device),
        labels(&y1, [2, 2, 2], &device),
        labels(&y2, [2, 2, 2], &device),
        weights(w1.as_deref(), &device),
        weights(w2.as_deref(), &device),
    );
    let terms = loss.terms();
    let reference = |z: &[f32], mu: &[f32], y: &[i64], w: &Option<Vec<f32>>| {
        reference_cross_entropy(z, shape, mu, y, w.as_deref()) as f32
    };
    let l11 = reference(&z1, &mu1, &y1, &w1);
    let l22 = reference(&z2, &mu2, &y2, &w2);
    let l12 = reference(&z1, &mu2, &y2, &w2);
    let l21 = reference(&z2, &mu1, &y1, &w1);
    assert!((terms.within_first - l11).abs() < 1e-5);
    assert!((terms.within_second - l22).abs() < 1e-5);
    assert!((terms.cross_first_second - l12).abs() < 1e-5);
    assert!((terms.cross_second_first - l21).abs() < 1e-5);
    let combined = ((l12 + l21) / 2.0 + (l11 + l22) / 2.0) / 2.0;
    assert!((terms.total - combined).abs() < 1e-5);
    assert!((scalar(loss.total) - terms.total).abs() < 1e-7);
}

#[test]
fn gradients_reach_features_but_not_centroids() {
    let device = Device::flex().autodiff();
    let shape = [1, 3, 2, 2];
    let z1 = features(&unit_features(&sequence(12, 11), shape), shape, &device).require_grad();
    let z2 = features(&unit_features(&sequence(12, 13), shape), shape, &device).require_grad();
    let mu1 = centroids(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [2, 3], &device).require_grad();
    let mu2 = centroids(&[0.0, 0.0, 1.0, 0.6, 0.8, 0.0], [2, 3], &device).require_grad();
    let y1 = labels(&[0, 1, 1, 0], [1, 2, 2], &device);
    let y2 = labels(&[1, 1, 0, 1], [1, 2, 2], &device);
    let w = weights(Some(&[0.4, 0.6]), &device);
    let loss = picie_loss(
        z1.clone(),
        z2.clone(),
        mu1.clone(),
        mu2.clone(),
        y1,
        y2,
        w.clone(),
        w,
    );
    let grads = loss.total.backward();
    for (name, z) in [("z1", &z1), ("z2", &z2)] {
        let grad = z
            .grad(&grads)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let values = grad
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        assert!(
            values.iter().any(|v| v.abs() > 1e-6),
            "{name} gradient is zero"
        );
        assert!(values.iter().all(|v| v.is_finite()));
    }
    assert!(mu1.grad(&grads).is_none(), "centroids must be frozen");
    assert!(mu2.grad(&grads).is_none(), "centroids must be frozen");
    // The values can still be read after backward.
    assert!(loss.terms().total.is_finite());
}

#[test]
fn overclustering_weights_follow_the_logs() {
    let (lambda1, lambda2) = overclustering_weights(27, 100);
    let (l1, l2) = (27f64.ln(), 100f64.ln());
    assert!((f64::from(lambda1) - l2 / (l1 + l2)).abs() < 1e-6);
    assert!((f64::from(lambda2) - l1 / (l1 + l2)).abs() < 1e-6);
    assert!((lambda1 + lambda2 - 1.0).abs() < 1e-6);
    // More clusters weigh less.
    assert!(lambda1 > lambda2);
    assert_eq!(overclustering_weights(1, 1), (0.5, 0.5));
    assert_eq!(overclustering_weights(0, 0), (0.5, 0.5));
}
