//! `make-demo-dataset`: procedurally drawn shapes (circle, square, triangle,
//! cross) in varied colours on light backgrounds, with comma-separated
//! captions, so the whole pipeline can be exercised without external data.
//! Deterministic for a given seed.

use std::path::Path;

use rand::Rng;

use crate::error::{Result, TrainerError};
use crate::rng::{self, Purpose};

const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
const COLORS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 40, 40]),
    ("blue", [40, 70, 210]),
    ("green", [40, 170, 70]),
    ("black", [20, 20, 20]),
    ("purple", [140, 50, 170]),
];

/// Writes `count` PNGs (`shape-XX.png`, `size`×`size`) and captions into `dir`.
pub fn make_demo_dataset(
    dir: &Path,
    count: usize,
    size: u32,
    seed: u64,
    trigger: &str,
) -> Result<()> {
    if count == 0 || !(8..=1024).contains(&size) {
        return Err(TrainerError::Config(
            "count must be >= 1 and size between 8 and 1024".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io("cannot create", dir, e))?;
    for i in 0..count {
        let mut r = rng::stream(Purpose::Demo, seed, i as u64);
        let shape = SHAPES[i % SHAPES.len()];
        let (color_name, color) = COLORS[r.random_range(0..COLORS.len())];
        let bg = [
            r.random_range(200..=255u8),
            r.random_range(200..=255u8),
            r.random_range(200..=255u8),
        ];
        let s = size as f32;
        let (cx, cy) = (
            s * r.random_range(0.35..0.65f32),
            s * r.random_range(0.35..0.65f32),
        );
        let half = s * r.random_range(0.18..0.3f32);
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= half * half,
                "square" => dx.abs() <= half && dy.abs() <= half,
                "triangle" => dy <= half && dy >= -half && dx.abs() <= (dy + half) / 2.0,
                _ => {
                    (dx.abs() <= half / 3.0 && dy.abs() <= half)
                        || (dy.abs() <= half / 3.0 && dx.abs() <= half)
                }
            };
            image::Rgb(if inside { color } else { bg })
        });
        let stem = format!("shape-{i:02}");
        let png = dir.join(format!("{stem}.png"));
        img.save(&png)
            .map_err(|e| TrainerError::io("cannot write", &png, std::io::Error::other(e)))?;
        let mut caption = format!("{color_name} {shape}, simple shape, plain background");
        if !trigger.is_empty() {
            caption = format!("{trigger}, {caption}");
        }
        let txt = dir.join(format!("{stem}.txt"));
        std::fs::write(&txt, caption).map_err(|e| TrainerError::io("cannot write", &txt, e))?;
    }
    Ok(())
}
