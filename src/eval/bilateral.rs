//! Joint bilateral upsampling (Kopf et al., SIGGRAPH 2007) of cluster logits, guided by the
//! image: each output pixel mixes the logits of the nearby feature cells, weighted by their
//! distance and by how close the cell's mean colour is to the pixel's own colour, so a cluster
//! border snaps to the colour edge instead of running through the middle of a 4x4 cell.

use rayon::prelude::*;

use super::stored::argmax;

/// Spatial reach and colour tolerance of [`bilateral_upsample_argmax`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BilateralParams {
    /// Gaussian width of the spatial weight, in feature cells.
    pub sigma_cells: f32,
    /// Gaussian width of the colour weight, in RGB units of 0..1 (Euclidean over the three
    /// channels).
    pub sigma_colour: f32,
    /// Feature cells on each side of the pixel's own cell that contribute.
    pub radius: usize,
}

impl Default for BilateralParams {
    fn default() -> Self {
        Self {
            sigma_cells: 1.0,
            sigma_colour: 0.1,
            radius: 2,
        }
    }
}

/// Upsamples pixel-major logits `[h * w, K]` of a `grid = [h, w]` feature map to the
/// `out = [H, W]` pixels of `guide` (row-major RGB, `H * W * 3` bytes) with a joint bilateral
/// filter, and returns the argmax cluster of every pixel (the first on ties), row-major.
pub fn bilateral_upsample_argmax(
    logits: &[f32],
    clusters: usize,
    grid: [usize; 2],
    guide: &[u8],
    out: [usize; 2],
    params: &BilateralParams,
) -> Vec<u16> {
    let [height, width] = grid;
    let [out_height, out_width] = out;
    assert_eq!(
        logits.len(),
        height * width * clusters,
        "logits of the grid"
    );
    assert_eq!(
        guide.len(),
        out_height * out_width * 3,
        "an RGB guide of the output size"
    );
    let cell_colours = cell_mean_colours(guide, grid, out);
    let inverse_spatial = 1.0 / (2.0 * params.sigma_cells * params.sigma_cells);
    let inverse_colour = 1.0 / (2.0 * params.sigma_colour * params.sigma_colour);
    let radius = params.radius as isize;
    let mut labels = vec![0u16; out_height * out_width];
    labels
        .par_chunks_mut(out_width.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            let mut mixed = vec![0f32; clusters];
            // The pixel centre in cell coordinates (align_corners = false, as the bilinear path).
            let cell_y = (y as f32 + 0.5) * height as f32 / out_height as f32 - 0.5;
            let rows = window(cell_y, radius, height);
            for (x, label) in row.iter_mut().enumerate() {
                let cell_x = (x as f32 + 0.5) * width as f32 / out_width as f32 - 0.5;
                let pixel = &guide[(y * out_width + x) * 3..][..3];
                let colour = [
                    f32::from(pixel[0]) / 255.0,
                    f32::from(pixel[1]) / 255.0,
                    f32::from(pixel[2]) / 255.0,
                ];
                mixed.fill(0.0);
                for row_index in rows.clone() {
                    let dy = row_index as f32 - cell_y;
                    for column in window(cell_x, radius, width) {
                        let dx = column as f32 - cell_x;
                        let cell = row_index * width + column;
                        let mean = &cell_colours[cell * 3..][..3];
                        let colour_distance = (colour[0] - mean[0]).powi(2)
                            + (colour[1] - mean[1]).powi(2)
                            + (colour[2] - mean[2]).powi(2);
                        let weight = (-(dx * dx + dy * dy) * inverse_spatial
                            - colour_distance * inverse_colour)
                            .exp();
                        for (mixed, &logit) in
                            mixed.iter_mut().zip(&logits[cell * clusters..][..clusters])
                        {
                            *mixed += weight * logit;
                        }
                    }
                }
                // The weights' sum is common to every cluster, so the argmax needs no division.
                *label = argmax(&mixed) as u16;
            }
        });
    labels
}

/// The cells within `radius` of `centre` along an axis of `size` cells.
fn window(centre: f32, radius: isize, size: usize) -> std::ops::Range<usize> {
    let nearest = centre.round() as isize;
    let low = (nearest - radius).max(0) as usize;
    let high = ((nearest + radius + 1).max(0) as usize).min(size);
    low..high.max(low)
}

/// Mean colour (0..1) of the guide pixels that fall in each feature cell, `[h * w, 3]`.
fn cell_mean_colours(guide: &[u8], grid: [usize; 2], out: [usize; 2]) -> Vec<f32> {
    let [height, width] = grid;
    let [out_height, out_width] = out;
    let mut sums = vec![0f32; height * width * 3];
    let mut counts = vec![0u32; height * width];
    for y in 0..out_height {
        let cell_y = (y * height / out_height.max(1)).min(height.saturating_sub(1));
        for x in 0..out_width {
            let cell_x = (x * width / out_width.max(1)).min(width.saturating_sub(1));
            let cell = cell_y * width + cell_x;
            let pixel = &guide[(y * out_width + x) * 3..][..3];
            for channel in 0..3 {
                sums[cell * 3 + channel] += f32::from(pixel[channel]) / 255.0;
            }
            counts[cell] += 1;
        }
    }
    for (cell, &count) in counts.iter().enumerate() {
        if count > 0 {
            for channel in 0..3 {
                sums[cell * 3 + channel] /= count as f32;
            }
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16x16 image, dark on the left 6 columns and bright on the rest, with logits on a
    /// 4x4 grid that favour cluster 0 in the left column of cells and cluster 1 elsewhere:
    /// the colour edge (column 6) lies inside cell column 1, where bilinear upsampling puts
    /// the border wherever the logits cross; the bilateral result follows the edge exactly.
    #[test]
    fn borders_follow_the_colour_edge() {
        let (size, grid) = (16usize, 4usize);
        let edge = 6;
        let mut guide = vec![0u8; size * size * 3];
        for y in 0..size {
            for x in 0..size {
                let value = if x < edge { 20 } else { 230 };
                guide[(y * size + x) * 3..][..3].fill(value);
            }
        }
        // Cell column 1 straddles the edge; its mixed logits lean slightly to cluster 1.
        let mut logits = vec![0f32; grid * grid * 2];
        for row in 0..grid {
            for column in 0..grid {
                let (a, b) = match column {
                    0 => (1.0, -1.0),
                    1 => (-0.1, 0.1),
                    _ => (-1.0, 1.0),
                };
                let cell = row * grid + column;
                logits[cell * 2] = a;
                logits[cell * 2 + 1] = b;
            }
        }
        let labels = bilateral_upsample_argmax(
            &logits,
            2,
            [grid, grid],
            &guide,
            [size, size],
            &BilateralParams::default(),
        );
        for y in 0..size {
            for x in 0..size {
                let expected = u16::from(x >= edge);
                assert_eq!(labels[y * size + x], expected, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn a_uniform_image_keeps_the_logits_winner() {
        let guide = vec![128u8; 8 * 8 * 3];
        // Cluster 1 wins every cell.
        let logits: Vec<f32> = (0..4).flat_map(|_| [0.2f32, 0.5, 0.1]).collect();
        let labels =
            bilateral_upsample_argmax(&logits, 3, [2, 2], &guide, [8, 8], &Default::default());
        assert!(labels.iter().all(|&label| label == 1));
    }
}
