//! Cluster colours shared by the app and the exporters.

/// The default palette from `assets/palette.txt`.
const PALETTE_TEXT: &str = include_str!("../assets/palette.txt");

/// The colour of cluster `index`: the palette's entry, then golden-angle hues beyond it, so
/// any number of clusters get distinct, stable colours.
pub fn cluster_colour(index: usize) -> [u8; 3] {
    let palette: Vec<[u8; 3]> = PALETTE_TEXT
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_hex)
        .collect();
    if let Some(colour) = palette.get(index) {
        return *colour;
    }
    let hue = (index as f32 * 137.507_77) % 360.0;
    hsv_to_rgb(hue, 0.65, 0.95)
}

fn parse_hex(text: &str) -> Option<[u8; 3]> {
    let value = u32::from_str_radix(text, 16).ok()?;
    Some([(value >> 16) as u8, (value >> 8) as u8, value as u8])
}

fn hsv_to_rgb(hue: f32, saturation: f32, value: f32) -> [u8; 3] {
    let chroma = value * saturation;
    let sector = hue / 60.0;
    let x = chroma * (1.0 - (sector % 2.0 - 1.0).abs());
    let (r, g, b) = match sector as u32 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    let m = value - chroma;
    [r, g, b].map(|channel| ((channel + m) * 255.0).round() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_distinct_for_many_clusters() {
        let colours: Vec<[u8; 3]> = (0..100).map(cluster_colour).collect();
        assert_eq!(colours[0], [0xe6, 0x19, 0x4b]);
        let unique: std::collections::HashSet<_> = colours.iter().collect();
        assert_eq!(unique.len(), 100);
    }
}
