//! The project's own sample dataset, drawn in code.
//!
//! Demos (`yard dev`), tests and the reference trainer need a small dataset
//! with one coherent visual concept, and nothing may be downloaded, so it is
//! generated here: eight 64×64 PNGs of the "tyzx" emblem — an orange disc
//! with a dark rim and a white Z — at different positions and sizes on
//! different background colours. Half the images have a sidecar caption
//! (one starting with the trigger word, one using `[trigger]`, two plain),
//! half do not, so a prepare run exercises every caption path. Everything is
//! integer arithmetic with fixed zip timestamps: the same bytes every run.

use std::fs;
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

/// The trigger word the sample captions are written for.
pub const SAMPLE_TRIGGER_WORD: &str = "tyzx";
pub const SAMPLE_IMAGE_COUNT: usize = 8;
/// Side of every sample image, in pixels.
pub const SAMPLE_SIZE: u32 = 64;
/// Wrapper folder inside the sample zip.
pub const SAMPLE_ZIP_FOLDER: &str = "tyzx_sample";

const ORANGE: Rgb<u8> = Rgb([255, 140, 0]);
const RIM: Rgb<u8> = Rgb([150, 60, 0]);
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

/// One sample: emblem centre, radius, background, and maybe a caption.
struct Variant {
    cx: i32,
    cy: i32,
    r: i32,
    bg: [u8; 3],
    caption: Option<&'static str>,
}

const VARIANTS: [Variant; SAMPLE_IMAGE_COUNT] = [
    Variant {
        cx: 32,
        cy: 32,
        r: 24,
        bg: [20, 30, 70],
        caption: Some("tyzx, an orange emblem centred on a navy background"),
    },
    Variant {
        cx: 20,
        cy: 22,
        r: 14,
        bg: [0, 110, 110],
        caption: None,
    },
    Variant {
        cx: 44,
        cy: 40,
        r: 16,
        bg: [220, 220, 220],
        caption: Some("a small [trigger] emblem on a pale grey background"),
    },
    Variant {
        cx: 32,
        cy: 36,
        r: 20,
        bg: [30, 90, 40],
        caption: None,
    },
    Variant {
        cx: 24,
        cy: 44,
        r: 12,
        bg: [80, 40, 110],
        caption: Some("a tiny orange coin with a white zigzag,\non purple\n"),
    },
    Variant {
        cx: 40,
        cy: 24,
        r: 18,
        bg: [120, 180, 230],
        caption: None,
    },
    Variant {
        cx: 32,
        cy: 32,
        r: 28,
        bg: [240, 230, 200],
        caption: Some("a large orange emblem filling a cream background"),
    },
    Variant {
        cx: 46,
        cy: 46,
        r: 10,
        bg: [50, 50, 50],
        caption: None,
    },
];

fn draw(v: &Variant) -> RgbImage {
    let size = SAMPLE_SIZE as i32;
    let inner = v.r * 6 / 10; // half-size of the Z's box
    let t = (v.r / 6).max(1); // stroke thickness
    RgbImage::from_fn(SAMPLE_SIZE, SAMPLE_SIZE, |x, y| {
        let (dx, dy) = (x as i32 - v.cx, y as i32 - v.cy);
        let d2 = dx * dx + dy * dy;
        if d2 >= v.r * v.r {
            // A faint vertical gradient so backgrounds are not flat.
            let shade = (y as i32 * 24 / size) as u8;
            return Rgb(v.bg.map(|c| c.saturating_add(shade)));
        }
        let in_box = dx.abs() <= inner && dy.abs() <= inner;
        let z = in_box && (dy <= -inner + t || dy >= inner - t || (dx + dy).abs() <= t);
        if z {
            WHITE
        } else if d2 >= (v.r - 2) * (v.r - 2) {
            RIM
        } else {
            ORANGE
        }
    })
}

fn png_bytes(image: &RgbImage) -> io::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(io::Error::other)?;
    Ok(out.into_inner())
}

/// The sample files as (file name, bytes), images and captions in order.
fn sample_files() -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for (i, v) in VARIANTS.iter().enumerate() {
        let stem = format!("tyzx_{:02}", i + 1);
        files.push((format!("{stem}.png"), png_bytes(&draw(v))?));
        if let Some(caption) = v.caption {
            files.push((format!("{stem}.txt"), caption.as_bytes().to_vec()));
        }
    }
    Ok(files)
}

/// Writes the sample images (`tyzx_01.png` …) and their sidecar captions
/// into `dir` (created if missing) and returns the paths written. Blocking
/// but tiny (well under a millisecond per image).
pub fn write_sample_dataset(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, bytes) in sample_files()? {
        let path = dir.join(name);
        fs::write(&path, bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the sample as a zip the way macOS Finder would: everything inside
/// a `tyzx_sample/` folder, plus a `.DS_Store` and a `__MACOSX/` tree of
/// AppleDouble files, so a prepare run exercises flattening and junk removal.
pub fn write_sample_zip(path: &Path) -> io::Result<()> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(DateTime::default())
        .unix_permissions(0o644);
    let folder = SAMPLE_ZIP_FOLDER;
    zip.add_directory(format!("{folder}/"), options)?;
    for (name, bytes) in sample_files()? {
        zip.start_file(format!("{folder}/{name}"), options)?;
        zip.write_all(&bytes)?;
    }
    zip.start_file(format!("{folder}/.DS_Store"), options)?;
    zip.write_all(b"\0\0\0\x01Bud1 not a real desktop services store")?;
    zip.add_directory("__MACOSX/", options)?;
    zip.add_directory(format!("__MACOSX/{folder}/"), options)?;
    zip.start_file(format!("__MACOSX/{folder}/._tyzx_01.png"), options)?;
    zip.write_all(b"\0\x05\x16\x07\0\x02\0\0Mac OS X        ")?;
    let bytes = zip.finish()?.into_inner();
    fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emblem_is_drawn_where_expected() {
        let v = &VARIANTS[0];
        let img = draw(v);
        // The disc just right of the Z's box is orange, the corner is background.
        let edge = (v.r * 6 / 10 + 3) as u32;
        assert_eq!(*img.get_pixel(v.cx as u32 + edge, v.cy as u32 + 2), ORANGE);
        assert_eq!(*img.get_pixel(v.cx as u32, v.cy as u32), WHITE);
        assert_ne!(*img.get_pixel(0, 0), ORANGE);
    }
}
