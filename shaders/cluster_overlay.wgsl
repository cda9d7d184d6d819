// Colours a cluster map over its image: one label per feature cell, a palette row per cluster
// (alpha 0 hides a cluster), an overall opacity and optional boundary lines one screen pixel
// wide where the label changes.

struct Params {
    // The map's rectangle in framebuffer pixels.
    rect_min: vec2<f32>,
    rect_size: vec2<f32>,
    // Cells of the label grid (width, height).
    grid: vec2<f32>,
    opacity: f32,
    // 1.0 draws boundaries.
    boundaries: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var labels: texture_2d<u32>;
@group(0) @binding(2) var palette: texture_2d<f32>;

// One triangle covering the whole viewport; the fragment stage cuts out the map's rectangle.
@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> @builtin(position) vec4<f32> {
    let x = f32((index << 1u) & 2u) * 2.0 - 1.0;
    let y = f32(index & 2u) * 2.0 - 1.0;
    return vec4<f32>(x, y, 0.0, 1.0);
}

fn label_at(cell_position: vec2<f32>) -> u32 {
    let last = vec2<i32>(params.grid) - vec2<i32>(1, 1);
    let cell = clamp(vec2<i32>(floor(cell_position)), vec2<i32>(0, 0), last);
    return textureLoad(labels, cell, 0).r;
}

@fragment
fn fs_main(@builtin(position) position: vec4<f32>) -> @location(0) vec4<f32> {
    let uv = (position.xy - params.rect_min) / params.rect_size;
    if (any(uv < vec2<f32>(0.0)) || any(uv >= vec2<f32>(1.0))) {
        discard;
    }
    let cell_position = uv * params.grid;
    let label = label_at(cell_position);
    let colour = textureLoad(palette, vec2<i32>(i32(label), 0), 0);
    if (colour.a == 0.0) {
        discard;
    }
    if (params.boundaries > 0.5) {
        // Cells per screen pixel: a neighbour one pixel right or down in another cell.
        let step = params.grid / params.rect_size;
        let right = label_at(cell_position + vec2<f32>(step.x, 0.0));
        let down = label_at(cell_position + vec2<f32>(0.0, step.y));
        if (right != label || down != label) {
            return vec4<f32>(0.05, 0.05, 0.05, 0.9);
        }
    }
    // egui blends premultiplied colours.
    let alpha = params.opacity;
    return vec4<f32>(colour.rgb * alpha, alpha);
}
