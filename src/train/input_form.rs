//! What a trained run needs to take an image as its network took them in training, kept in
//! the run folder when training starts: the class names, the form of its images and the mean
//! image. `predict` reads them, so a run stays usable after its dataset moves.

use crate::data::augment::{centre, render};
use crate::files::write_atomic;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The run's input form, in the run folder.
pub const INPUT_FILE: &str = "input.json";
/// The mean image subtracted from every input, little-endian f32, in the run folder.
pub const MEAN_FILE: &str = "input-mean.bin";

/// How an image file becomes the network's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageForm {
    /// A prepared dataset's: shorter side to `side`, central square, RGB; the mean image
    /// (`side` x `side`) subtracted, the network's centre crop taken.
    Prepared { side: usize },
    /// IDX files': resized to their `height` x `width` in `channels` planes, then to the
    /// network's input side, the mean image (at that side) subtracted.
    Idx {
        height: usize,
        width: usize,
        channels: usize,
    },
}

/// The run's input as `input.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputForm {
    /// Class names, by label.
    pub classes: Vec<String>,
    pub image: ImageForm,
    /// The training data it was taken from.
    pub data: PathBuf,
    /// Human names of the classes, by label (`prepare --class-names`); empty where none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptions: Vec<String>,
}

impl InputForm {
    /// The classes as `predict` and `eval` show them: each with its description where there
    /// is one (`n01440764 tench, Tinca tinca`).
    pub fn display_names(&self) -> Vec<String> {
        (0..self.classes.len())
            .map(|i| crate::data::shards::display_name(&self.classes, &self.descriptions, i))
            .collect()
    }
}

/// The form and the mean image of a run's input.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInput {
    pub form: InputForm,
    pub mean: Vec<f32>,
}

impl RunInput {
    /// Writes `input-mean.bin`, then `input.json`, each atomically.
    pub fn write(&self, run_dir: &Path) -> anyhow::Result<()> {
        let bytes: Vec<u8> = self.mean.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_atomic(&run_dir.join(MEAN_FILE), &bytes)?;
        write_atomic(
            &run_dir.join(INPUT_FILE),
            serde_json::to_string_pretty(&self.form)?.as_bytes(),
        )
    }

    /// The run's input, or `None` for a run that has none recorded (trained before it was).
    pub fn read(run_dir: &Path) -> anyhow::Result<Option<RunInput>> {
        let path = run_dir.join(INPUT_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let form: InputForm = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        let mean_path = run_dir.join(MEAN_FILE);
        let bytes = std::fs::read(&mean_path).with_context(|| {
            format!(
                "reading {} (beside {})",
                mean_path.display(),
                path.display()
            )
        })?;
        let mean: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want = match form.image {
            ImageForm::Prepared { side } => 3 * side * side,
            // The IDX mean is at the network's input side, checked where that is known.
            ImageForm::Idx { .. } => mean.len(),
        };
        anyhow::ensure!(
            bytes.len() == 4 * want && !mean.is_empty(),
            "{} is damaged: {} bytes, expected {}",
            mean_path.display(),
            bytes.len(),
            4 * want
        );
        Ok(Some(RunInput { form, mean }))
    }

    /// The network input (`input_size` square) for one image file.
    pub fn input_for(&self, path: &Path, input_size: usize) -> anyhow::Result<Vec<f32>> {
        match self.form.image {
            ImageForm::Prepared { side } => {
                let img = crate::data::prepare::decode_square(path, side)?;
                let mut x = vec![0.0f32; 3 * input_size * input_size];
                render(
                    &img,
                    &self.mean,
                    side,
                    centre(side, input_size),
                    [0.0; 3],
                    input_size,
                    &mut x,
                );
                Ok(x)
            }
            ImageForm::Idx {
                height,
                width,
                channels,
            } => {
                anyhow::ensure!(
                    self.mean.len() == channels * input_size * input_size,
                    "the run's mean image has {} values, its network takes {channels}x{input_size}x{input_size}",
                    self.mean.len()
                );
                let pixels = decode_planes(path, height, width, channels)?;
                Ok(network_input(
                    &pixels, channels, height, width, input_size, &self.mean,
                ))
            }
        }
    }
}

/// The network input for one `h x w` image of `channels` planes: each plane resized to
/// `side` (bilinear), `mean` subtracted, as the training images were made.
pub fn network_input(
    pixels: &[u8],
    channels: usize,
    h: usize,
    w: usize,
    side: usize,
    mean: &[f32],
) -> Vec<f32> {
    let mut out = vec![0.0f32; channels * side * side];
    for c in 0..channels {
        resize_plane(
            &pixels[c * h * w..(c + 1) * h * w],
            h,
            w,
            side,
            &mut out[c * side * side..(c + 1) * side * side],
        );
    }
    out.iter_mut().zip(mean).for_each(|(v, m)| *v -= m);
    out
}

/// Bilinear resize of one `h x w` plane to `side x side` (pixel centres aligned).
pub(crate) fn resize_plane(src: &[u8], h: usize, w: usize, side: usize, dst: &mut [f32]) {
    let (sy, sx) = (h as f32 / side as f32, w as f32 / side as f32);
    for y in 0..side {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(h - 1);
        for x in 0..side {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(w - 1);
            let p = |yy: usize, xx: usize| src[yy * w + xx] as f32;
            let top = p(y0, x0) * (1.0 - tx) + p(y0, x1) * tx;
            let bottom = p(y1, x0) * (1.0 - tx) + p(y1, x1) * tx;
            dst[y * side + x] = top * (1.0 - ty) + bottom * ty;
        }
    }
}

/// An image file as `channels` planes of `height` x `width` bytes.
fn decode_planes(path: &Path, h: usize, w: usize, channels: usize) -> anyhow::Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()?
        .decode()
        .with_context(|| format!("decoding {}", path.display()))?;
    let resized = img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle);
    Ok(if channels == 1 {
        resized.into_luma8().into_raw()
    } else {
        let rgb = resized.into_rgb8();
        let mut planar = vec![0u8; 3 * h * w];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                planar[c * h * w + i] = p.0[c];
            }
        }
        planar
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_form_is_read_back_as_written_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("alexnet-input-form-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = RunInput {
            form: InputForm {
                classes: vec!["apple".into(), "bear".into()],
                image: ImageForm::Prepared { side: 4 },
                data: "/data/prepared/train".into(),
                descriptions: Vec::new(),
            },
            mean: (0..48).map(|i| i as f32 / 3.0).collect(),
        };
        assert!(RunInput::read(&dir).unwrap().is_none());
        input.write(&dir).unwrap();
        assert_eq!(RunInput::read(&dir).unwrap().unwrap(), input);
        std::fs::write(dir.join(MEAN_FILE), [0u8; 12]).unwrap();
        let e = format!("{:#}", RunInput::read(&dir).unwrap_err());
        assert!(
            e.contains("input-mean.bin is damaged: 12 bytes, expected 192"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
