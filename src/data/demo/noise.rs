//! The demo's randomness and colour arithmetic: seed mixing, hashed value noise with fractal
//! sums, and small colour helpers.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: spreads nearby seeds far apart.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Noise

pub(super) fn hash2(x: i32, y: i32, seed: u32) -> u32 {
    let mut h = (x as u32).wrapping_mul(0x27D4_EB2D)
        ^ (y as u32).wrapping_mul(0x1656_67B1)
        ^ seed.wrapping_mul(0x9E37_79B9);
    h ^= h >> 15;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Uniform in [0, 1).
pub(super) fn hash01(x: i32, y: i32, seed: u32) -> f32 {
    (hash2(x, y, seed) >> 8) as f32 / (1u32 << 24) as f32
}

/// Smooth value noise in [0, 1) with unit lattice spacing.
pub(super) fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (fx, fy) = (x.floor(), y.floor());
    let (ix, iy) = (fx as i32, fy as i32);
    let (tx, ty) = (x - fx, y - fy);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = hash01(ix, iy, seed);
    let b = hash01(ix + 1, iy, seed);
    let c = hash01(ix, iy + 1, seed);
    let d = hash01(ix + 1, iy + 1, seed);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

/// Three octaves of value noise, in [0, 1).
pub(super) fn fbm(x: f32, y: f32, seed: u32) -> f32 {
    let n1 = value_noise(x, y, seed);
    let n2 = value_noise(x * 2.03, y * 2.03, seed ^ 0x5bd1_e995);
    let n3 = value_noise(x * 4.01, y * 4.01, seed ^ 0x1b87_3593);
    (n1 * 4.0 + n2 * 2.0 + n3) / 7.0
}

pub(super) fn smoothstep(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

pub(super) type Color = [f32; 3];

pub(super) fn lerp(a: Color, b: Color, t: f32) -> Color {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

pub(super) fn scale(c: Color, k: f32) -> Color {
    [c[0] * k, c[1] * k, c[2] * k]
}

/// A palette colour with a little per-object variation.
pub(super) fn jitter(rng: &mut ChaCha8Rng, base: Color, amount: f32) -> Color {
    let k = 1.0 + rng.random_range(-amount..=amount);
    [
        (base[0] * k + rng.random_range(-amount..=amount) * 0.25).max(0.0),
        (base[1] * k + rng.random_range(-amount..=amount) * 0.25).max(0.0),
        (base[2] * k + rng.random_range(-amount..=amount) * 0.25).max(0.0),
    ]
}

pub(super) fn pick(rng: &mut ChaCha8Rng, palette: &[Color]) -> Color {
    palette[rng.random_range(0..palette.len())]
}

/// A random palette entry with a little per-object variation.
pub(super) fn vary(rng: &mut ChaCha8Rng, palette: &[Color], amount: f32) -> Color {
    let base = pick(rng, palette);
    jitter(rng, base, amount)
}
