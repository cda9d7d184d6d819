//! Cluster maps coloured on the GPU: `shaders/cluster_overlay.wgsl` draws each map's label
//! texture through the palette inside egui's wgpu paint callback, so recolouring, hiding a
//! cluster, the opacity and the boundary lines cost no CPU work and no texture re-upload.

use std::collections::HashMap;

use eframe::egui;
use eframe::egui_wgpu::{self, CallbackResources, CallbackTrait, ScreenDescriptor, wgpu};

const SHADER: &str = include_str!("../../shaders/cluster_overlay.wgsl");

/// Frames an unused map texture is kept before it is freed.
const EVICT_AFTER_FRAMES: u64 = 300;

/// The shader's uniform block (see `Params` in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rect_min: [f32; 2],
    rect_size: [f32; 2],
    grid: [f32; 2],
    opacity: f32,
    boundaries: f32,
}

struct MapResources {
    labels: wgpu::Texture,
    palette: wgpu::Texture,
    palette_len: u32,
    params: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    last_used: u64,
}

/// The pipeline and the per-map textures, kept in egui's callback resources.
pub struct OverlayRenderer {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    maps: HashMap<u64, MapResources>,
    frame: u64,
    last_frame_seen: u64,
}

impl OverlayRenderer {
    /// Builds the pipeline and registers it with egui's renderer. Returns false when the app
    /// does not run on wgpu (then the CPU path draws the maps).
    pub fn install(render_state: Option<&egui_wgpu::RenderState>) -> bool {
        let Some(render_state) = render_state else {
            return false;
        };
        let device = &render_state.device;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("cluster_overlay"),
            source: wgpu::ShaderSource::Wgsl(SHADER.into()),
        });
        let texture_entry = |binding, sample_type| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::FRAGMENT,
            ty: wgpu::BindingType::Texture {
                sample_type,
                view_dimension: wgpu::TextureViewDimension::D2,
                multisampled: false,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("cluster_overlay"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                texture_entry(1, wgpu::TextureSampleType::Uint),
                texture_entry(2, wgpu::TextureSampleType::Float { filterable: false }),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("cluster_overlay"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("cluster_overlay"),
            layout: Some(&pipeline_layout),
            vertex: wgpu::VertexState {
                module: &module,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[],
            },
            fragment: Some(wgpu::FragmentState {
                module: &module,
                entry_point: Some("fs_main"),
                compilation_options: Default::default(),
                targets: &[Some(wgpu::ColorTargetState {
                    format: render_state.target_format,
                    blend: Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING),
                    write_mask: wgpu::ColorWrites::ALL,
                })],
            }),
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            multiview_mask: None,
            cache: None,
        });
        render_state
            .renderer
            .write()
            .callback_resources
            .insert(OverlayRenderer {
                pipeline,
                layout,
                maps: HashMap::new(),
                frame: 0,
                last_frame_seen: u64::MAX,
            });
        true
    }
}

/// One map to draw: everything the shader needs, and a key that says when the labels change.
pub struct OverlayCallback {
    /// Identifies the label grid; a new key uploads `labels` again.
    pub key: u64,
    /// Label per cell, row-major.
    pub labels: Vec<u16>,
    /// Grid width.
    pub width: u32,
    /// Grid height.
    pub height: u32,
    /// RGBA per cluster id; alpha 0 hides the cluster.
    pub palette: Vec<[u8; 4]>,
    /// Opacity of the colours.
    pub opacity: f32,
    /// Draw boundary lines.
    pub boundaries: bool,
    /// The map's rectangle in points.
    pub rect: egui::Rect,
    /// The frame number (to free textures of maps no longer shown).
    pub frame: u64,
}

impl CallbackTrait for OverlayCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        screen: &ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(renderer) = resources.get_mut::<OverlayRenderer>() else {
            return Vec::new();
        };
        if renderer.last_frame_seen != self.frame {
            renderer.last_frame_seen = self.frame;
            renderer.frame = self.frame;
            let now = renderer.frame;
            renderer
                .maps
                .retain(|_, map| now.saturating_sub(map.last_used) < EVICT_AFTER_FRAMES);
        }
        let palette_len = self.palette.len().max(1) as u32;
        let stale = renderer.maps.get(&self.key).is_none_or(|map| {
            map.labels.width() != self.width
                || map.labels.height() != self.height
                || map.palette_len != palette_len
        });
        if stale {
            let map = create_map(renderer, device, self.width, self.height, palette_len);
            upload_labels(queue, &map.labels, &self.labels, self.width, self.height);
            renderer.maps.insert(self.key, map);
        }
        let Some(map) = renderer.maps.get_mut(&self.key) else {
            return Vec::new();
        };
        map.last_used = self.frame;
        let mut palette = self.palette.clone();
        palette.resize(palette_len as usize, [0; 4]);
        queue.write_texture(
            map.palette.as_image_copy(),
            bytemuck::cast_slice(&palette),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(4 * palette_len),
                rows_per_image: None,
            },
            wgpu::Extent3d {
                width: palette_len,
                height: 1,
                depth_or_array_layers: 1,
            },
        );
        let scale = screen.pixels_per_point;
        let params = Params {
            rect_min: [self.rect.min.x * scale, self.rect.min.y * scale],
            rect_size: [
                (self.rect.width() * scale).max(1.0),
                (self.rect.height() * scale).max(1.0),
            ],
            grid: [self.width as f32, self.height as f32],
            opacity: self.opacity.clamp(0.0, 1.0),
            boundaries: if self.boundaries { 1.0 } else { 0.0 },
        };
        queue.write_buffer(&map.params, 0, bytemuck::bytes_of(&params));
        Vec::new()
    }

    fn paint(
        &self,
        info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &CallbackResources,
    ) {
        let Some(renderer) = resources.get::<OverlayRenderer>() else {
            return;
        };
        let Some(map) = renderer.maps.get(&self.key) else {
            return;
        };
        // The shader positions the map itself from framebuffer coordinates, so a map partly
        // scrolled out of view keeps its shape; the scissor (egui's clip rect) cuts it.
        let [width, height] = info.screen_size_px;
        render_pass.set_viewport(0.0, 0.0, width as f32, height as f32, 0.0, 1.0);
        render_pass.set_pipeline(&renderer.pipeline);
        render_pass.set_bind_group(0, &map.bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

fn create_map(
    renderer: &OverlayRenderer,
    device: &wgpu::Device,
    width: u32,
    height: u32,
    palette_len: u32,
) -> MapResources {
    let texture = |label: &str, width: u32, height: u32, format: wgpu::TextureFormat| {
        device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: width.max(1),
                height: height.max(1),
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        })
    };
    let labels = texture(
        "cluster_labels",
        width,
        height,
        wgpu::TextureFormat::R16Uint,
    );
    let palette = texture(
        "cluster_palette",
        palette_len,
        1,
        wgpu::TextureFormat::Rgba8Unorm,
    );
    let params = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("cluster_overlay_params"),
        size: std::mem::size_of::<Params>() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("cluster_overlay"),
        layout: &renderer.layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::TextureView(
                    &labels.create_view(&Default::default()),
                ),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: wgpu::BindingResource::TextureView(
                    &palette.create_view(&Default::default()),
                ),
            },
        ],
    });
    MapResources {
        labels,
        palette,
        palette_len,
        params,
        bind_group,
        last_used: 0,
    }
}

fn upload_labels(
    queue: &wgpu::Queue,
    texture: &wgpu::Texture,
    labels: &[u16],
    width: u32,
    height: u32,
) {
    if labels.len() != (width * height) as usize || labels.is_empty() {
        return;
    }
    // Rows of a texture copy need no padding with write_texture.
    queue.write_texture(
        texture.as_image_copy(),
        bytemuck::cast_slice(labels),
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(2 * width),
            rows_per_image: None,
        },
        wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
    );
}
