//! The PiCIE loss: cross-entropy of pixel features against frozen cluster centroids, within and
//! across the two views, with optional class weights.
//!
//! `Lab = CE(<z_a, mu_b>, y_b; w_b)` and `L = ((L12 + L21) / 2 + (L11 + L22) / 2) / 2`, where
//! `z_1`, `z_2` are the unit pixel features of view 1 and view 2 (the latter after G), `mu_b`
//! the k-means centroids of view b and `y_b` its pixel labels (nearest centroid).

use std::fmt;
use std::str::FromStr;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// How the cross-entropy weights the clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceMode {
    /// As the authors' code: each cluster weighted by its pixel frequency in that view (big
    /// clusters count more). It produced the published numbers.
    #[default]
    Reference,
    /// Inverse pixel frequency, normalised so the K weights sum to K (small clusters count more).
    Inverse,
    /// Plain cross-entropy, every pixel alike.
    None,
}

impl BalanceMode {
    /// Every mode.
    pub const ALL: [BalanceMode; 3] = [
        BalanceMode::Reference,
        BalanceMode::Inverse,
        BalanceMode::None,
    ];

    /// The name used on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Inverse => "inverse",
            Self::None => "none",
        }
    }

    /// A one-line explanation for the user.
    pub fn description(self) -> &'static str {
        match self {
            Self::Reference => "cluster frequency as class weight (the authors' code)",
            Self::Inverse => "inverse cluster frequency as class weight",
            Self::None => "no class weights",
        }
    }
}

impl fmt::Display for BalanceMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for BalanceMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "reference" => Ok(Self::Reference),
            "inverse" => Ok(Self::Inverse),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown balance mode '{other}': use reference, inverse or none"
            )),
        }
    }
}

/// The cross-entropy class weights of one view from its per-cluster pixel counts; `None` means
/// unweighted (mode [`BalanceMode::None`], no clusters, or no pixels at all).
///
/// - `Reference`: `count_k / sum(count)`;
/// - `Inverse`: `1 / max(count_k, 1)`, scaled so the weights sum to K.
pub fn class_weights(counts: &[u64], mode: BalanceMode) -> Option<Vec<f32>> {
    if counts.is_empty() {
        return None;
    }
    match mode {
        BalanceMode::Reference => {
            let total: f64 = counts.iter().map(|&count| count as f64).sum();
            // All-zero weights would make every loss 0/0.
            (total > 0.0).then(|| {
                counts
                    .iter()
                    .map(|&count| (count as f64 / total) as f32)
                    .collect()
            })
        }
        BalanceMode::Inverse => {
            let inverse: Vec<f64> = counts
                .iter()
                .map(|&count| 1.0 / count.max(1) as f64)
                .collect();
            let scale = counts.len() as f64 / inverse.iter().sum::<f64>();
            Some(
                inverse
                    .iter()
                    .map(|&weight| (weight * scale) as f32)
                    .collect(),
            )
        }
        BalanceMode::None => None,
    }
}

/// Softmax cross-entropy of pixel features against frozen centroids, as PyTorch's
/// `F.cross_entropy(conv1x1(z, mu), y, weight=w)`: the mean over pixels of
/// `-log softmax_k(<z, mu_k>)[y]`, or with weights `sum w[y] * nll / sum w[y]`.
///
/// - `features`: `[B, D, h, w]`, unit vectors along D;
/// - `centroids`: `[K, D]`; detached here, so they never receive gradients;
/// - `labels`: `[B, h, w]`, each in `0..K`;
/// - `weights`: `[K]` class weights, or `None` for the plain mean.
///
/// Returns a one-element tensor.
pub fn cluster_cross_entropy(
    features: Tensor<4>,
    centroids: Tensor<2>,
    labels: Tensor<3, Int>,
    weights: Option<Tensor<1>>,
) -> Tensor<1> {
    let [batch, dim, height, width] = features.dims();
    let pixels = batch * height * width;
    // [B, D, h, w] -> [B, h, w, D] -> [B*h*w, D]
    let pixel_features = crate::model::permute_axes(features, [0, 2, 3, 1]).reshape([pixels, dim]);
    // The 1x1 convolution with centroid weights: [B*h*w, D] x [D, K] -> [B*h*w, K].
    let logits = pixel_features.matmul(centroids.detach().transpose());
    let log_probabilities = log_softmax(logits, 1);
    // [B, h, w] -> [B*h*w]
    let labels = labels.reshape([pixels]);
    // [B*h*w, K] -> [B*h*w, 1] -> [B*h*w]: the negative log-likelihood of each pixel's label.
    let nll = log_probabilities
        .gather(1, labels.clone().reshape([pixels, 1]))
        .reshape([pixels])
        .neg();
    match weights {
        None => nll.mean(),
        Some(weights) => {
            // [K] -> [B*h*w]: each pixel's class weight.
            let pixel_weights = weights.detach().select(0, labels);
            (nll * pixel_weights.clone()).sum() / pixel_weights.sum()
        }
    }
}

/// The four PiCIE loss terms and their combination, each a one-element tensor.
#[derive(Debug, Clone)]
pub struct PicieLoss {
    /// L11 = CE(z1 . mu1, y1).
    pub within_first: Tensor<1>,
    /// L22 = CE(z2 . mu2, y2).
    pub within_second: Tensor<1>,
    /// L12 = CE(z1 . mu2, y2): view 1 features against view 2 clusters.
    pub cross_first_second: Tensor<1>,
    /// L21 = CE(z2 . mu1, y1): view 2 features against view 1 clusters.
    pub cross_second_first: Tensor<1>,
    /// `((L12 + L21) / 2 + (L11 + L22) / 2) / 2`, the tensor to backpropagate.
    pub total: Tensor<1>,
}

impl PicieLoss {
    /// Reads the five values to the host in one transfer, for logs and the UI. Values that
    /// cannot be read come back as NaN.
    pub fn terms(&self) -> LossTerms {
        // 5 x [1] -> [5], detached so reading adds nothing to the autodiff graph.
        let stacked = Tensor::cat(
            vec![
                self.within_first.clone().detach(),
                self.within_second.clone().detach(),
                self.cross_first_second.clone().detach(),
                self.cross_second_first.clone().detach(),
                self.total.clone().detach(),
            ],
            0,
        );
        let values = stacked
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let value = |index: usize| values.get(index).copied().unwrap_or(f32::NAN);
        LossTerms {
            within_first: value(0),
            within_second: value(1),
            cross_first_second: value(2),
            cross_second_first: value(3),
            total: value(4),
        }
    }

    /// Scales every term (and the total) by `factor`, e.g. the +H weights of
    /// [`overclustering_weights`].
    pub fn scaled(self, factor: f32) -> Self {
        Self {
            within_first: self.within_first.mul_scalar(factor),
            within_second: self.within_second.mul_scalar(factor),
            cross_first_second: self.cross_first_second.mul_scalar(factor),
            cross_second_first: self.cross_second_first.mul_scalar(factor),
            total: self.total.mul_scalar(factor),
        }
    }

    /// Adds two losses term by term (e.g. the K and K2 heads of PiCIE + H).
    pub fn combined(self, other: Self) -> Self {
        Self {
            within_first: self.within_first + other.within_first,
            within_second: self.within_second + other.within_second,
            cross_first_second: self.cross_first_second + other.cross_first_second,
            cross_second_first: self.cross_second_first + other.cross_second_first,
            total: self.total + other.total,
        }
    }
}

/// The PiCIE loss of a batch: `z1`, `z2` are the unit features `[B, D, h, w]` of view 1 and of
/// view 2 after G; `mu1`, `mu2` the frozen centroids `[K, D]` of each view; `y1`, `y2` the labels
/// `[B, h, w]`; `w1`, `w2` the class weights `[K]` (see [`class_weights`]).
// Eight arguments mirror the paper's notation (z, mu, y, w per view); a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn picie_loss(
    z1: Tensor<4>,
    z2: Tensor<4>,
    mu1: Tensor<2>,
    mu2: Tensor<2>,
    y1: Tensor<3, Int>,
    y2: Tensor<3, Int>,
    w1: Option<Tensor<1>>,
    w2: Option<Tensor<1>>,
) -> PicieLoss {
    let within_first = cluster_cross_entropy(z1.clone(), mu1.clone(), y1.clone(), w1.clone());
    let within_second = cluster_cross_entropy(z2.clone(), mu2.clone(), y2.clone(), w2.clone());
    let cross_first_second = cluster_cross_entropy(z1, mu2, y2, w2);
    let cross_second_first = cluster_cross_entropy(z2, mu1, y1, w1);
    let cross = (cross_first_second.clone() + cross_second_first.clone()).div_scalar(2.0);
    let within = (within_first.clone() + within_second.clone()).div_scalar(2.0);
    let total = (cross + within).div_scalar(2.0);
    PicieLoss {
        within_first,
        within_second,
        cross_first_second,
        cross_second_first,
        total,
    }
}

/// The weights (lambda1, lambda2) of the K1 and K2 (overclustering) losses of PiCIE + H:
/// `ln K2 / (ln K1 + ln K2)` and `ln K1 / (ln K1 + ln K2)`. Degenerate inputs (K < 2 for both,
/// so no logarithm is positive) give equal weights of 0.5.
pub fn overclustering_weights(k1: usize, k2: usize) -> (f32, f32) {
    let log1 = (k1.max(1) as f64).ln();
    let log2 = (k2.max(1) as f64).ln();
    let sum = log1 + log2;
    if sum <= 0.0 {
        return (0.5, 0.5);
    }
    ((log2 / sum) as f32, (log1 / sum) as f32)
}

/// The four PiCIE loss terms and their combination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossTerms {
    /// L11: view 1 features against view 1 clusters.
    pub within_first: f32,
    /// L22: view 2 features against view 2 clusters.
    pub within_second: f32,
    /// L12: view 1 features against view 2 clusters.
    pub cross_first_second: f32,
    /// L21: view 2 features against view 1 clusters.
    pub cross_second_first: f32,
    /// ((L12 + L21) / 2 + (L11 + L22) / 2) / 2.
    pub total: f32,
}

impl std::ops::Add for LossTerms {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            within_first: self.within_first + other.within_first,
            within_second: self.within_second + other.within_second,
            cross_first_second: self.cross_first_second + other.cross_first_second,
            cross_second_first: self.cross_second_first + other.cross_second_first,
            total: self.total + other.total,
        }
    }
}

impl LossTerms {
    /// Every term divided by `count` (a mean over steps); unchanged for a count of 0.
    pub fn divided_by(self, count: usize) -> Self {
        let n = count.max(1) as f32;
        Self {
            within_first: self.within_first / n,
            within_second: self.within_second / n,
            cross_first_second: self.cross_first_second / n,
            cross_second_first: self.cross_second_first / n,
            total: self.total / n,
        }
    }
}
