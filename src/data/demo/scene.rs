//! One demo scene: its layout drawn at random (sky, horizon, grass, lake, road, buildings,
//! trees, vehicles, balls), then painted pixel by pixel from a per-pixel owner map, so the
//! label map matches the picture exactly. One concern, the painter, longer than most files.

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::noise::*;
use super::{BALL, BUILDING, GRASS, ROAD, SKY, TREE, VEHICLE, WATER};

/// How the pixels owned by one layer are coloured.
#[derive(Debug, Clone, Copy)]
enum Paint {
    Sky {
        top: Color,
        bottom: Color,
        cloud_cover: f32,
    },
    Grass {
        base: Color,
    },
    Water {
        base: Color,
        ripple: f32,
    },
    Road {
        asphalt: Color,
        center_x: f32,
        vanish_x: f32,
        half_bottom: f32,
        half_top: f32,
    },
    Bricks {
        brick: Color,
        mortar: Color,
        origin: (f32, f32),
        brick_w: f32,
        brick_h: f32,
        windows: Option<(Color, f32, f32)>,
    },
    Roof {
        tiles: Color,
        step: f32,
    },
    Foliage {
        base: Color,
        center: (f32, f32),
        radius: f32,
        grain: f32,
    },
    Bark {
        base: Color,
    },
    CarBody {
        paint: Color,
        top: f32,
        height: f32,
    },
    CarGlass,
    Wheel {
        center: (f32, f32),
        radius: f32,
    },
    Ball {
        a: Color,
        b: Color,
        center: (f32, f32),
        radius: f32,
        stripes: f32,
        spin: f32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Layer {
    class: u8,
    paint: Paint,
}

/// Per-image photometric variation applied after shading.
#[derive(Debug, Clone, Copy)]
struct Look {
    brightness: f32,
    cast: Color,
    hue_cos: f32,
    hue_sin: f32,
    light_slope: f32,
    contrast: f32,
    grain: f32,
}

pub(super) struct Scene {
    size: u32,
    noise: u32,
    layers: Vec<Layer>,
    owner: Vec<u16>,
    horizon: f32,
    look: Look,
    sun: (f32, f32),
}

impl Scene {
    pub(super) fn random(rng: &mut ChaCha8Rng, size: u32) -> Scene {
        let s = size as f32;
        let mut scene = Scene {
            size,
            noise: rng.random(),
            layers: Vec::new(),
            owner: vec![0; (size * size) as usize],
            horizon: s * rng.random_range(0.3..0.55),
            look: Look {
                brightness: rng.random_range(0.75..1.2),
                cast: [
                    1.0 + rng.random_range(-0.08..0.08),
                    1.0 + rng.random_range(-0.08..0.08),
                    1.0 + rng.random_range(-0.08..0.08),
                ],
                hue_cos: 1.0,
                hue_sin: 0.0,
                light_slope: rng.random_range(-0.35..0.35),
                contrast: rng.random_range(0.85..1.15),
                grain: rng.random_range(0.01..0.035),
            },
            sun: {
                let angle: f32 = rng.random_range(-2.4..-0.7);
                (angle.cos(), angle.sin())
            },
        };
        let hue: f32 = rng.random_range(-0.25..0.25);
        scene.look.hue_cos = hue.cos();
        scene.look.hue_sin = hue.sin();

        scene.draw_background(rng);
        scene.draw_buildings(rng);
        scene.draw_trees(rng);
        scene.draw_ground_objects(rng);
        scene
    }

    fn push(&mut self, class: u8, paint: Paint) -> u16 {
        self.layers.push(Layer { class, paint });
        (self.layers.len() - 1) as u16
    }

    /// Gives every pixel inside `inside(x, y)` (pixel centres) within the box to `layer`.
    fn fill(
        &mut self,
        layer: u16,
        bounds: (f32, f32, f32, f32),
        inside: impl Fn(f32, f32) -> bool,
    ) {
        let n = self.size as i32;
        let x0 = (bounds.0.floor() as i32).clamp(0, n);
        let y0 = (bounds.1.floor() as i32).clamp(0, n);
        let x1 = (bounds.2.ceil() as i32).clamp(0, n);
        let y1 = (bounds.3.ceil() as i32).clamp(0, n);
        for y in y0..y1 {
            let row = (y * n) as usize;
            for x in x0..x1 {
                if inside(x as f32 + 0.5, y as f32 + 0.5) {
                    self.owner[row + x as usize] = layer;
                }
            }
        }
    }

    fn fill_rect(&mut self, layer: u16, x0: f32, y0: f32, x1: f32, y1: f32) {
        self.fill(layer, (x0, y0, x1, y1), |_, _| true);
    }

    fn fill_circle(&mut self, layer: u16, cx: f32, cy: f32, r: f32) {
        self.fill(layer, (cx - r, cy - r, cx + r, cy + r), |x, y| {
            (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r
        });
    }

    /// An upward-pointing triangle with apex `(cx, top)` and base `[cx - half, cx + half]` at `base`.
    fn fill_triangle(&mut self, layer: u16, cx: f32, top: f32, base: f32, half: f32) {
        let height = (base - top).max(1.0);
        self.fill(layer, (cx - half, top, cx + half, base), |x, y| {
            let t = (y - top) / height;
            (x - cx).abs() <= half * t
        });
    }

    fn draw_background(&mut self, rng: &mut ChaCha8Rng) {
        let s = self.size as f32;
        let sky = self.push(
            SKY,
            Paint::Sky {
                top: jitter(rng, [0.18, 0.38, 0.78], 0.1),
                bottom: jitter(rng, [0.72, 0.84, 0.95], 0.06),
                cloud_cover: rng.random_range(0.0..1.0),
            },
        );
        let grass = self.push(
            GRASS,
            Paint::Grass {
                base: vary(
                    rng,
                    &[[0.27, 0.52, 0.14], [0.36, 0.55, 0.16], [0.2, 0.45, 0.18]],
                    0.1,
                ),
            },
        );
        // A gently rolling horizon.
        let (amp, freq, phase) = (
            s * rng.random_range(0.0..0.05),
            rng.random_range(1.0..3.5) / s,
            rng.random_range(0.0..std::f32::consts::TAU),
        );
        let horizon = self.horizon;
        let n = self.size;
        for y in 0..n {
            for x in 0..n {
                let line =
                    horizon + amp * ((x as f32) * freq * std::f32::consts::TAU + phase).sin();
                let owner = if (y as f32 + 0.5) < line { sky } else { grass };
                self.owner[(y * n + x) as usize] = owner;
            }
        }
        // Let the sky meet flat ground where buildings stand.
        self.horizon = horizon + amp;

        let water_paint = Paint::Water {
            base: jitter(rng, [0.1, 0.33, 0.52], 0.1),
            ripple: rng.random_range(0.6..1.4),
        };
        match rng.random_range(0..10) {
            // A lake.
            0..=4 => {
                let water = self.push(WATER, water_paint);
                let cy = self.horizon + (s - self.horizon) * rng.random_range(0.35..0.75);
                let cx = s * rng.random_range(0.2..0.8);
                let rx = s * rng.random_range(0.2..0.45);
                let ry = (s - self.horizon) * rng.random_range(0.15..0.3);
                self.fill(water, (cx - rx, cy - ry, cx + rx, cy + ry), |x, y| {
                    let (u, v) = ((x - cx) / rx, (y - cy) / ry);
                    u * u + v * v <= 1.0
                });
            }
            // A sea band along the horizon.
            5..=6 => {
                let water = self.push(WATER, water_paint);
                let depth = (s - self.horizon) * rng.random_range(0.2..0.4);
                let top = self.horizon;
                self.fill_rect(water, 0.0, top, s, top + depth);
            }
            _ => {}
        }

        if rng.random_bool(0.7) {
            let center_x = s * rng.random_range(0.25..0.75);
            let vanish_x = s * rng.random_range(0.3..0.7);
            let half_bottom = s * rng.random_range(0.15..0.3);
            let half_top = s * 0.01;
            let top = self.horizon + 1.0;
            let road = self.push(
                ROAD,
                Paint::Road {
                    asphalt: vary(
                        rng,
                        &[[0.33, 0.33, 0.35], [0.42, 0.41, 0.4], [0.26, 0.26, 0.28]],
                        0.08,
                    ),
                    center_x,
                    vanish_x,
                    half_bottom,
                    half_top,
                },
            );
            let height = s - top;
            self.fill(road, (0.0, top, s, s), |x, y| {
                let t = (y - top) / height;
                let c = vanish_x + (center_x - vanish_x) * t;
                let half = half_top + (half_bottom - half_top) * t;
                (x - c).abs() <= half
            });
        }
    }

    fn draw_buildings(&mut self, rng: &mut ChaCha8Rng) {
        let s = self.size as f32;
        let count = rng.random_range(0..=3);
        for _ in 0..count {
            let width = s * rng.random_range(0.15..0.35);
            let x0 = rng.random_range(-0.1 * s..s - 0.5 * width);
            let base = self.horizon + s * rng.random_range(0.0..0.04);
            let top = base - (self.horizon * rng.random_range(0.35..0.9)).max(4.0);
            let brick = vary(
                rng,
                &[
                    [0.6, 0.25, 0.18],
                    [0.55, 0.35, 0.25],
                    [0.7, 0.62, 0.5],
                    [0.5, 0.48, 0.46],
                ],
                0.08,
            );
            let brick_w = (s / 18.0 * rng.random_range(0.8..1.25)).max(3.0);
            let windows = rng.random_bool(0.6).then(|| {
                (
                    jitter(rng, [0.16, 0.2, 0.28], 0.15),
                    rng.random_range(3.0..5.0),
                    rng.random_range(2.0..3.5),
                )
            });
            let wall = self.push(
                BUILDING,
                Paint::Bricks {
                    brick,
                    mortar: jitter(rng, [0.78, 0.76, 0.72], 0.05),
                    origin: (x0, top),
                    brick_w,
                    brick_h: brick_w * 0.45,
                    windows,
                },
            );
            self.fill_rect(wall, x0, top, x0 + width, base);
            if rng.random_bool(0.5) {
                let roof = self.push(
                    BUILDING,
                    Paint::Roof {
                        tiles: vary(rng, &[[0.45, 0.16, 0.12], [0.3, 0.3, 0.34]], 0.1),
                        step: (s / 40.0).max(2.0),
                    },
                );
                let roof_h = width * rng.random_range(0.25..0.5);
                let cx = x0 + width * 0.5;
                self.fill_triangle(roof, cx, top - roof_h, top + 0.5, width * 0.55);
            }
        }
    }

    fn draw_trees(&mut self, rng: &mut ChaCha8Rng) {
        let s = self.size as f32;
        let count = rng.random_range(0..=3);
        let mut trees: Vec<(f32, f32, f32)> = (0..count)
            .map(|_| {
                let base = self.horizon + (s - self.horizon) * rng.random_range(0.0..0.35);
                let depth = (base - self.horizon) / (s - self.horizon).max(1.0);
                let height = s * rng.random_range(0.2..0.35) * (0.7 + depth);
                (rng.random_range(0.0..s), base, height)
            })
            .collect();
        // Far trees first so near ones overlap them.
        trees.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (x, base, height) in trees {
            let trunk_w = (height * 0.1).max(2.0);
            let bark = self.push(
                TREE,
                Paint::Bark {
                    base: jitter(rng, [0.34, 0.22, 0.12], 0.1),
                },
            );
            let leaf = vary(
                rng,
                &[[0.09, 0.3, 0.12], [0.12, 0.36, 0.1], [0.07, 0.25, 0.15]],
                0.12,
            );
            let grain = (s / 28.0).max(2.0) * rng.random_range(0.8..1.2);
            if rng.random_bool(0.6) {
                // Round crown.
                let r = height * 0.38;
                let cy = base - height + r;
                self.fill_rect(bark, x - trunk_w / 2.0, cy, x + trunk_w / 2.0, base);
                let crown = self.push(
                    TREE,
                    Paint::Foliage {
                        base: leaf,
                        center: (x, cy),
                        radius: r,
                        grain,
                    },
                );
                self.fill_circle(crown, x, cy, r);
            } else {
                // Conifer.
                let trunk_top = base - height * 0.2;
                self.fill_rect(bark, x - trunk_w / 2.0, trunk_top, x + trunk_w / 2.0, base);
                let top = base - height;
                let crown = self.push(
                    TREE,
                    Paint::Foliage {
                        base: leaf,
                        center: (x, trunk_top - height * 0.35),
                        radius: height * 0.45,
                        grain,
                    },
                );
                self.fill_triangle(crown, x, top, trunk_top + 0.5, height * 0.28);
            }
        }
    }

    fn draw_ground_objects(&mut self, rng: &mut ChaCha8Rng) {
        let s = self.size as f32;
        let ground = (s - self.horizon).max(1.0);
        let vehicles = rng.random_range(0..=2);
        let balls = rng.random_range(0..=2);
        // (is vehicle, x, base y, scale)
        let mut objects: Vec<(bool, f32, f32, f32)> = (0..vehicles + balls)
            .map(|i| {
                let depth: f32 = rng.random_range(0.15..1.0);
                let base = self.horizon + ground * depth;
                (
                    i < vehicles,
                    rng.random_range(0.0..s),
                    base,
                    0.35 + 0.65 * depth,
                )
            })
            .collect();
        objects.sort_by(|a, b| a.2.total_cmp(&b.2));
        for (is_vehicle, x, base, k) in objects {
            if is_vehicle {
                self.draw_vehicle(rng, x, base, s * 0.32 * k);
            } else {
                let r = s * rng.random_range(0.05..0.09) * k;
                let palette = [
                    [0.9, 0.15, 0.15],
                    [0.95, 0.85, 0.1],
                    [0.15, 0.35, 0.9],
                    [0.95, 0.5, 0.05],
                    [0.9, 0.9, 0.9],
                    [0.7, 0.15, 0.75],
                ];
                let a = pick(rng, &palette);
                let mut b = pick(rng, &palette);
                if a == b {
                    b = [0.95, 0.95, 0.95];
                }
                let ball = self.push(
                    BALL,
                    Paint::Ball {
                        a: jitter(rng, a, 0.06),
                        b: jitter(rng, b, 0.06),
                        center: (x, base - r),
                        radius: r,
                        stripes: f32::from(rng.random_range(2u8..=4) * 2),
                        spin: rng.random_range(0.0..std::f32::consts::TAU),
                    },
                );
                self.fill_circle(ball, x, base - r, r);
            }
        }
    }

    fn draw_vehicle(&mut self, rng: &mut ChaCha8Rng, x: f32, base: f32, length: f32) {
        let height = length * rng.random_range(0.3..0.42);
        let wheel_r = height * 0.28;
        let body_bottom = base - wheel_r * 0.8;
        let body_top = body_bottom - height * 0.6;
        let (x0, x1) = (x - length / 2.0, x + length / 2.0);
        let paint = vary(
            rng,
            &[
                [0.8, 0.1, 0.1],
                [0.9, 0.75, 0.1],
                [0.1, 0.25, 0.7],
                [0.92, 0.92, 0.9],
                [0.55, 0.1, 0.6],
                [0.1, 0.55, 0.6],
            ],
            0.06,
        );
        let body = self.push(
            VEHICLE,
            Paint::CarBody {
                paint,
                top: body_top,
                height: body_bottom - body_top,
            },
        );
        self.fill_rect(body, x0, body_top, x1, body_bottom);
        // A cab with windows, or a plain box (a van or a crate).
        if rng.random_bool(0.7) {
            let cab_top = body_top - height * 0.4;
            let (c0, c1) = (x0 + length * 0.2, x1 - length * 0.25);
            let cab = self.push(
                VEHICLE,
                Paint::CarBody {
                    paint,
                    top: cab_top,
                    height: height * 0.4,
                },
            );
            self.fill_rect(cab, c0, cab_top, c1, body_top + 0.5);
            let glass = self.push(VEHICLE, Paint::CarGlass);
            let inset = (height * 0.07).max(1.0);
            let mid = (c0 + c1) / 2.0;
            self.fill_rect(
                glass,
                c0 + inset,
                cab_top + inset,
                mid - inset / 2.0,
                body_top,
            );
            self.fill_rect(
                glass,
                mid + inset / 2.0,
                cab_top + inset,
                c1 - inset,
                body_top,
            );
        }
        for wx in [x0 + length * 0.2, x1 - length * 0.2] {
            let wheel = self.push(
                VEHICLE,
                Paint::Wheel {
                    center: (wx, base - wheel_r),
                    radius: wheel_r,
                },
            );
            self.fill_circle(wheel, wx, base - wheel_r, wheel_r);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Shading

    pub(super) fn render(&self) -> (RgbImage, GrayImage) {
        let n = self.size;
        let mut rgb = RgbImage::new(n, n);
        let mut label = GrayImage::new(n, n);
        for y in 0..n {
            for x in 0..n {
                let layer = self.layers[self.owner[(y * n + x) as usize] as usize];
                let color = self.shade(layer.paint, x as f32 + 0.5, y as f32 + 0.5);
                rgb.put_pixel(x, y, Rgb(self.finish(color, x, y)));
                label.put_pixel(x, y, Luma([layer.class]));
            }
        }
        (rgb, label)
    }

    fn shade(&self, paint: Paint, x: f32, y: f32) -> Color {
        let s = self.size as f32;
        // Texture frequencies are set for a 160-pixel scene and scale with the size.
        let u = x * 160.0 / s;
        let v = y * 160.0 / s;
        let seed = self.noise;
        match paint {
            Paint::Sky {
                top,
                bottom,
                cloud_cover,
            } => {
                let t = (y / self.horizon.max(1.0)).clamp(0.0, 1.0);
                let sky = lerp(top, bottom, t.powf(0.8));
                let cloud = fbm(u / 38.0, v / 12.0, seed ^ 0xC10D);
                let amount = smoothstep(0.62 - 0.22 * cloud_cover, 0.8, cloud) * cloud_cover;
                let white = scale([0.97, 0.97, 0.99], 0.9 + 0.1 * cloud);
                lerp(sky, white, amount)
            }
            Paint::Grass { base } => {
                let blades = value_noise(u * 0.9, v * 0.18, seed ^ 0x6A55);
                let patches = fbm(u / 20.0, v / 10.0, seed ^ 0x9A7C);
                let speck = hash01(x as i32, y as i32, seed ^ 0x51EC) - 0.5;
                let near = ((y - self.horizon) / (s - self.horizon).max(1.0)).clamp(0.0, 1.0);
                let k = 0.62 + 0.32 * blades + 0.3 * patches + 0.16 * speck + 0.12 * near;
                [base[0] * k + 0.04 * near, base[1] * k, base[2] * k]
            }
            Paint::Water { base, ripple } => {
                let wobble = 3.0 * value_noise(u / 14.0, v / 6.0, seed ^ 0x3A7E);
                let wave = (v * 0.9 * ripple + wobble).sin();
                let glint = wave.max(0.0).powi(6) * 0.45;
                let depth = value_noise(u / 30.0, v / 30.0, seed ^ 0xDEE9);
                let c = scale(base, 0.8 + 0.3 * depth);
                [c[0] + glint * 0.8, c[1] + glint * 0.9, c[2] + glint]
            }
            Paint::Road {
                asphalt,
                center_x,
                vanish_x,
                half_bottom,
                half_top,
            } => {
                let top = self.horizon + 1.0;
                let t = ((y - top) / (s - top).max(1.0)).clamp(0.0, 1.0);
                let c = vanish_x + (center_x - vanish_x) * t;
                let half = (half_top + (half_bottom - half_top) * t).max(0.5);
                let across = (x - c) / half;
                let speck = hash01(x as i32, y as i32, seed ^ 0xA5F1) - 0.5;
                let stain = fbm(u / 9.0, v / 9.0, seed ^ 0x0DD5);
                let gray = scale(asphalt, 0.85 + 0.25 * stain + 0.35 * speck);
                // Dashes shrink towards the horizon like painted lines in perspective.
                let dash = ((t + 0.05).ln() * 9.0).sin() > 0.0;
                if across.abs() < 0.045 && dash {
                    [0.92, 0.82, 0.3]
                } else if across.abs() > 0.9 {
                    scale([0.88, 0.88, 0.86], 0.9 + 0.2 * speck)
                } else {
                    gray
                }
            }
            Paint::Bricks {
                brick,
                mortar,
                origin,
                brick_w,
                brick_h,
                windows,
            } => {
                let (lx, ly) = (x - origin.0, y - origin.1);
                if let Some((glass, every_x, every_y)) = windows {
                    let (cell_w, cell_h) = (brick_w * every_x * 0.5, brick_h * every_y * 1.2);
                    let (fx, fy) = ((lx / cell_w).fract(), (ly / cell_h).fract());
                    if ly > cell_h * 0.5 && (0.3..0.7).contains(&fx) && (0.25..0.7).contains(&fy) {
                        return scale(glass, 0.8 + 0.5 * fy);
                    }
                }
                let row = (ly / brick_h).floor();
                let shift = if (row as i32) % 2 == 0 {
                    0.0
                } else {
                    0.5 * brick_w
                };
                let column = ((lx + shift) / brick_w).floor();
                let bx = lx + shift - column * brick_w;
                let by = ly - row * brick_h;
                if bx < 1.0 || by < 1.0 {
                    return scale(mortar, 0.9 + 0.1 * hash01(x as i32, y as i32, seed));
                }
                let tone = hash01(column as i32, row as i32, seed ^ 0xB41C);
                let speck = hash01(x as i32, y as i32, seed ^ 0x7E11) - 0.5;
                scale(brick, 0.75 + 0.4 * tone + 0.15 * speck)
            }
            Paint::Roof { tiles, step } => {
                let line = (y / step).fract() < 0.3;
                let speck = hash01(x as i32, y as i32, seed ^ 0x2007) - 0.5;
                scale(tiles, if line { 0.6 } else { 0.95 + 0.2 * speck })
            }
            Paint::Foliage {
                base,
                center,
                radius,
                grain,
            } => {
                let clumps = fbm(x / grain, y / grain, seed ^ 0x7EAF);
                let leaf = hash01(x as i32, y as i32, seed ^ 0x1EAF) - 0.5;
                // Lit from the sun's side, darker underneath.
                let (dx, dy) = ((x - center.0) / radius, (y - center.1) / radius);
                let lit = 0.75 + 0.35 * (-(dx * self.sun.0 + dy * self.sun.1)).clamp(-1.0, 1.0);
                scale(base, (0.45 + 1.0 * clumps + 0.2 * leaf) * lit)
            }
            Paint::Bark { base } => {
                let streak = value_noise(u * 0.7, v * 0.08, seed ^ 0xBA4C);
                scale(base, 0.65 + 0.6 * streak)
            }
            Paint::CarBody { paint, top, height } => {
                let t = ((y - top) / height.max(1.0)).clamp(0.0, 1.0);
                // Glossy paint: a bright band near the top, darker towards the sills.
                let gloss = (1.0 - ((t - 0.25) * 5.0).powi(2)).max(0.0) * 0.25;
                let trim = if (t - 0.55).abs() < 0.05 { 0.55 } else { 1.0 };
                let c = scale(paint, (1.05 - 0.35 * t) * trim);
                [c[0] + gloss, c[1] + gloss, c[2] + gloss]
            }
            Paint::CarGlass => {
                let streak = ((x + y) * 0.35).sin() * 0.5 + 0.5;
                [
                    0.2 + 0.18 * streak,
                    0.26 + 0.2 * streak,
                    0.33 + 0.22 * streak,
                ]
            }
            Paint::Wheel { center, radius } => {
                let d = ((x - center.0).powi(2) + (y - center.1).powi(2)).sqrt() / radius.max(0.5);
                if d < 0.45 {
                    [0.62, 0.62, 0.64]
                } else {
                    [0.07, 0.07, 0.08]
                }
            }
            Paint::Ball {
                a,
                b,
                center,
                radius,
                stripes,
                spin,
            } => {
                let (dx, dy) = ((x - center.0) / radius, (y - center.1) / radius);
                let nz = (1.0 - dx * dx - dy * dy).max(0.0).sqrt();
                let segment = ((dy.atan2(dx) + spin) / std::f32::consts::TAU * stripes)
                    .rem_euclid(stripes)
                    .floor() as i32;
                let c = if segment % 2 == 0 { a } else { b };
                let light =
                    (-(dx * self.sun.0 + dy * self.sun.1) * 0.6 + nz * 0.8).clamp(0.15, 1.2);
                let spec = (light - 0.95).max(0.0) * 3.0;
                let lit = scale(c, 0.35 + 0.7 * light);
                [lit[0] + spec, lit[1] + spec, lit[2] + spec]
            }
        }
    }

    /// Per-image lighting, colour cast, hue rotation and sensor grain, then 8-bit quantisation.
    fn finish(&self, c: Color, x: u32, y: u32) -> [u8; 3] {
        let look = &self.look;
        let s = self.size as f32;
        // Rotate hue around the grey axis in YIQ space.
        let luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
        let i = 0.596 * c[0] - 0.274 * c[1] - 0.322 * c[2];
        let q = 0.211 * c[0] - 0.523 * c[1] + 0.312 * c[2];
        let (i, q) = (
            i * look.hue_cos - q * look.hue_sin,
            i * look.hue_sin + q * look.hue_cos,
        );
        let rgb = [
            luma + 0.956 * i + 0.621 * q,
            luma - 0.272 * i - 0.647 * q,
            luma - 1.106 * i + 1.703 * q,
        ];
        let light = look.brightness * (1.0 + look.light_slope * (x as f32 / s - 0.5));
        let grain = (hash01(x as i32, y as i32, self.noise ^ 0x6EA1) - 0.5) * 2.0 * look.grain;
        let mut out = [0u8; 3];
        for (channel, value) in out.iter_mut().enumerate() {
            let v = (rgb[channel] * look.cast[channel] * light - 0.5) * look.contrast + 0.5 + grain;
            *value = (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
        }
        out
    }
}
