//! Label files for images that do not sit in class folders: ILSVRC-2012's validation labels
//! (`LOC_val_solution.csv`) or plain `file,class` lines, and the classes' human names
//! (`LOC_synset_mapping.txt`).
//!
//! Both are read whole and checked before anything is written: a malformed line or an image
//! that is not there stops `prepare` with the file, the line and what to do.

use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// ILSVRC's header: an image id, then a prediction string whose first word is the class.
const ILSVRC_HEADER: &str = "ImageId,PredictionString";

/// The image files named by a label file, with their classes, in the file's order.
#[derive(Debug, PartialEq)]
pub struct LabelFile {
    /// (image path under the input folder, class), one per labelled image.
    pub entries: Vec<(PathBuf, String)>,
}

/// Reads `labels` for the images in `input` (found by file name, with or without its
/// extension: ILSVRC names `ILSVRC2012_val_00008726` for `ILSVRC2012_val_00008726.JPEG`).
/// `images` is every image file under `input`.
pub fn read_label_file(labels: &Path, input: &Path, images: &[PathBuf]) -> Result<LabelFile> {
    let text = std::fs::read_to_string(labels)
        .with_context(|| format!("reading --labels {}", labels.display()))?;
    let name = labels.display();
    // An image is found by its path under the input, or by its file name with or without
    // its extension.
    let mut by_name: HashMap<String, Vec<&PathBuf>> = HashMap::new();
    for p in images {
        let rel = p.strip_prefix(input).unwrap_or(p);
        let mut keys = vec![rel.to_string_lossy().into_owned()];
        if let Some(f) = p.file_name() {
            keys.push(f.to_string_lossy().into_owned());
        }
        if let Some(s) = p.file_stem() {
            keys.push(s.to_string_lossy().into_owned());
        }
        keys.dedup();
        for k in keys {
            by_name.entry(k).or_default().push(p);
        }
    }
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let first = lines
        .next()
        .map(|(_, l)| l.trim().trim_start_matches('\u{feff}'));
    let ilsvrc = first == Some(ILSVRC_HEADER);
    let plain_header = first.is_some_and(|l| l.eq_ignore_ascii_case("file,class"));
    let body: Vec<(usize, &str)> = match (ilsvrc || plain_header, first) {
        (_, None) => bail!(
            "--labels {name} is empty: expected `file,class` lines or ILSVRC's {ILSVRC_HEADER}"
        ),
        (true, _) => lines.collect(),
        (false, _) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect(),
    };
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    for (i, line) in body {
        let number = i + 1;
        let shown: String = line.chars().take(80).collect();
        let (file, class) = if ilsvrc {
            let parsed = line.split_once(',').and_then(|(id, pred)| {
                let class = pred.split_whitespace().next()?;
                (!id.trim().is_empty()).then_some((id.trim(), class))
            });
            parsed.ok_or_else(|| {
                anyhow::anyhow!(
                    "--labels {name} line {number}: expected `ImageId,PredictionString` (an \
                     image id, then the class and its boxes: `ILSVRC2012_val_00008726,n02119789 \
                     255 142 454 329`), found `{shown}`; fix the line and rerun"
                )
            })?
        } else {
            let parsed = line.rsplit_once(',').and_then(|(f, c)| {
                let (f, c) = (f.trim(), c.trim());
                (!f.is_empty() && !c.is_empty() && !c.contains(char::is_whitespace))
                    .then_some((f, c))
            });
            parsed.ok_or_else(|| {
                anyhow::anyhow!(
                    "--labels {name} line {number}: expected `file,class`, found `{shown}`; fix \
                     the line and rerun"
                )
            })?
        };
        match by_name.get(file).map(Vec::as_slice) {
            Some([path]) => {
                let path = (*path).clone();
                if let Some(before) = seen.insert(path.clone(), number) {
                    bail!(
                        "--labels {name} line {number} labels {file} again (line {before} did): \
                         an image takes one class; remove one of the lines and rerun"
                    );
                }
                entries.push((path, class.to_string()));
            }
            Some(several) => bail!(
                "--labels {name} line {number}: `{file}` could be any of {} files ({}): name \
                 them by their path under --input",
                several.len(),
                several
                    .iter()
                    .take(3)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => missing.push((number, file.to_string())),
        }
    }
    if !missing.is_empty() {
        let (number, file) = &missing[0];
        bail!(
            "--labels {name} line {number} names {file}, which is not in --input {} (no image \
             file by that name){}: add the image{} or remove the line{}, and rerun",
            input.display(),
            if missing.len() > 1 {
                format!(
                    "; {} more lines name missing images (lines {})",
                    missing.len() - 1,
                    missing
                        .iter()
                        .skip(1)
                        .take(5)
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                        + if missing.len() > 6 { ", ..." } else { "" }
                )
            } else {
                String::new()
            },
            if missing.len() > 1 { "s" } else { "" },
            if missing.len() > 1 { "s" } else { "" },
        );
    }
    ensure!(
        !entries.is_empty(),
        "--labels {name} labels no image: expected `file,class` lines or ILSVRC's \
         {ILSVRC_HEADER}"
    );
    Ok(LabelFile { entries })
}

/// `LOC_synset_mapping.txt`: on each line a class, a space, and its human name
/// (`n01440764 tench, Tinca tinca`); returned in the file's order.
pub fn read_class_names(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --class-names {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim().trim_start_matches('\u{feff}');
        if line.is_empty() {
            continue;
        }
        let (class, words) = line.split_once(char::is_whitespace).ok_or_else(|| {
            anyhow::anyhow!(
                "--class-names {} line {}: expected a class, a space and its name \
                 (`n01440764 tench, Tinca tinca`), found `{}`; fix the line and rerun",
                path.display(),
                i + 1,
                line.chars().take(80).collect::<String>()
            )
        })?;
        if let Some(before) = seen.insert(class.to_string(), i + 1) {
            bail!(
                "--class-names {} line {} names {class} again (line {before} did): keep one",
                path.display(),
                i + 1
            );
        }
        out.push((class.to_string(), words.trim().to_string()));
    }
    ensure!(
        !out.is_empty(),
        "--class-names {} names no class",
        path.display()
    );
    Ok(out)
}

/// The classes of labelled images, sorted (as the class folders of an ImageFolder tree are):
/// every class of `names` (the `--class-names` file, with its path) where one is given, so
/// that a validation set lacking a class still lines up with its training set (every label
/// must be among them); else the labels' own.
pub fn classes_of(
    entries: &[(PathBuf, String)],
    labels: &Path,
    names: Option<(&[(String, String)], &Path)>,
) -> Result<Vec<String>> {
    let Some((names, file)) = names else {
        return Ok(entries
            .iter()
            .map(|(_, c)| c.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect());
    };
    let known: BTreeSet<&str> = names.iter().map(|(c, _)| c.as_str()).collect();
    if let Some((path, class)) = entries.iter().find(|(_, c)| !known.contains(c.as_str())) {
        bail!(
            "--labels {} gives {} the class {class}, which --class-names {} does not name: add \
             it there, or correct the label",
            labels.display(),
            path.display(),
            file.display()
        );
    }
    let mut classes: Vec<String> = names.iter().map(|(c, _)| c.clone()).collect();
    classes.sort();
    Ok(classes)
}
