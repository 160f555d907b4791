//! The input pipeline: `prepare` on the carried photographs and on broken inputs, the prepared
//! form read back, and the loader's determinism and replica split.

use alexnet::data::loader::{self, EpochLoader, LoaderConfig, Pixels, View};
use alexnet::data::prepare::{
    decode_square, in_val, prepare, symmetric_eigen3, PrepareOptions, ValSplit,
};
use alexnet::data::shards::{Dataset, METADATA_FILE};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn photos() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sample/imagenet-photos")
}

/// A fresh folder for one test, removed when the test ends.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("alexnet-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn quiet(shard_images: usize) -> PrepareOptions {
    PrepareOptions {
        shard_images,
        progress: false,
        ..PrepareOptions::default()
    }
}

/// A small ImageFolder tree: three classes of the carried photographs, two images each.
fn small_tree(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(photos())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .collect();
    sources.sort();
    let mut out = Vec::new();
    for (i, src) in sources.iter().take(6).enumerate() {
        let class = dir.join(["apple", "bear", "cat"][i % 3]);
        std::fs::create_dir_all(&class).unwrap();
        let dst = class.join(format!("img{i}.jpg"));
        std::fs::copy(src, &dst).unwrap();
        out.push(dst);
    }
    out
}

#[test]
fn prepares_the_carried_photographs() {
    let out = scratch("photos");
    let summary = prepare(&photos(), &out, &quiet(8)).unwrap();
    assert_eq!(
        (summary.images, summary.classes, summary.shards),
        (20, 19, 3)
    );
    assert!(summary.skipped.is_empty());
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.meta.class_counts.iter().sum::<usize>(), 20);
    assert_eq!(
        ds.meta.class_counts[ds.meta.classes.iter().position(|c| c == "609").unwrap()],
        2
    );
    // Every stored image is the decoded photograph, in sorted order, with its folder's label.
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    for (label, class) in ds.meta.classes.iter().enumerate() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(photos().join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        f.sort();
        files.extend(f.into_iter().map(|p| (p, label as u32)));
    }
    let mut mean = vec![0f64; 3 * 256 * 256];
    for (i, (path, label)) in files.iter().enumerate() {
        let (l, img) = ds.image(i).unwrap();
        assert_eq!(l, *label, "label of image {i}");
        assert_eq!(
            img,
            &decode_square(path, 256).unwrap()[..],
            "pixels of image {i}"
        );
        mean.iter_mut()
            .zip(img)
            .for_each(|(m, &v)| *m += v as f64 / 20.0);
    }
    // The mean image is the mean of the stored images.
    for (a, b) in ds.mean.iter().zip(&mean) {
        assert!((*a as f64 - b).abs() < 1e-3);
    }
    // The eigenvectors are unit length and orthogonal, the eigenvalues positive and descending.
    let (vals, vecs) = (ds.meta.rgb_eigenvalues, ds.meta.rgb_eigenvectors);
    assert!(
        vals[0] >= vals[1] && vals[1] >= vals[2] && vals[2] > 0.0,
        "{vals:?}"
    );
    for i in 0..3 {
        for j in 0..3 {
            let d: f64 = (0..3).map(|k| vecs[i][k] * vecs[j][k]).sum();
            assert!((d - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
        }
    }
}

#[test]
fn eigen_decomposition_of_a_known_matrix() {
    // diag(3, 1, 2) rotated: eigenvalues 3, 2, 1.
    let (c, s) = (0.8f64, 0.6f64);
    let r = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let d = [3.0, 1.0, 2.0];
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = (0..3).map(|k| r[i][k] * d[k] * r[j][k]).sum();
        }
    }
    let (vals, vecs) = symmetric_eigen3(m);
    for (got, want) in vals.iter().zip([3.0, 2.0, 1.0]) {
        assert!((got - want).abs() < 1e-12, "{vals:?}");
    }
    // The first eigenvector is r's first column, up to sign.
    let dot: f64 = (0..3).map(|k| vecs[0][k] * r[k][0]).sum();
    assert!((dot.abs() - 1.0).abs() < 1e-12);
}

#[test]
#[cfg(target_os = "linux")]
fn an_interrupted_run_is_finished_by_a_rerun_that_keeps_finished_shards() {
    let input = scratch("resume-in");
    small_tree(&input);
    let clean = scratch("resume-clean");
    prepare(&input, &clean, &quiet(2)).unwrap();
    // Interrupt a run at its third shard: the disk "fills up" there.
    let out = scratch("resume-out");
    let blocker = out.join("shard-00002.bin.tmp");
    std::os::unix::fs::symlink("/dev/full", &blocker).unwrap();
    assert!(prepare(&input, &out, &quiet(2)).is_err());
    assert!(
        !out.join(METADATA_FILE).exists(),
        "an interrupted run leaves no metadata"
    );
    assert!(
        Dataset::open(&out).is_err(),
        "nor anything that opens as a dataset"
    );
    std::fs::remove_file(&blocker).ok();
    let again = prepare(&input, &out, &quiet(2)).unwrap();
    assert_eq!(again.shards_reused, 2, "the two finished shards are kept");
    let read = |d: &Path| std::fs::read_to_string(d.join(METADATA_FILE)).unwrap();
    assert_eq!(
        read(&out),
        read(&clean),
        "the same dataset as an uninterrupted run"
    );
    // A third run finds it complete.
    assert_eq!(prepare(&input, &out, &quiet(2)).unwrap().shards_reused, 3);
}

#[test]
fn broken_and_foreign_files_are_skipped_and_named() {
    let input = scratch("broken-in");
    let files = small_tree(&input);
    // A truncated JPEG, a file that claims to be a JPEG but is text, and a non-image file.
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(input.join("bear/fake.jpg"), b"not a jpeg at all").unwrap();
    std::fs::write(input.join("cat/notes.txt"), b"hello").unwrap();
    let out = scratch("broken-out");
    let summary = prepare(&input, &out, &quiet(4)).unwrap();
    let named: Vec<&str> = summary.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(summary.skipped.len(), 3, "{named:?}");
    assert!(named.iter().any(|p| p.ends_with("img0.jpg")), "{named:?}");
    assert!(named.iter().any(|p| p.ends_with("fake.jpg")));
    assert!(named.iter().any(|p| p.ends_with("notes.txt")));
    assert_eq!(summary.images, 5, "six images, one truncated");
    assert_eq!(Dataset::open(&out).unwrap().meta.skipped.len(), 3);
    // --strict stops instead, naming the file.
    let out = scratch("broken-strict");
    let e = prepare(
        &input,
        &out,
        &PrepareOptions {
            strict: true,
            ..quiet(4)
        },
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("--strict")
            && (msg.contains("img0.jpg") || msg.contains("fake.jpg") || msg.contains("notes.txt")),
        "{msg}"
    );
    assert!(!out.join(METADATA_FILE).exists());
}

#[test]
fn empty_class_folders_and_empty_inputs_are_refused_by_name() {
    let input = scratch("empty-class");
    small_tree(&input);
    std::fs::create_dir_all(input.join("dog")).unwrap();
    let e = format!(
        "{:#}",
        prepare(&input, &scratch("empty-class-out"), &quiet(4)).unwrap_err()
    );
    assert!(e.contains("dog") && e.contains("holds no images"), "{e}");
    let input = scratch("no-classes");
    std::fs::write(input.join("stray.jpg"), b"x").unwrap();
    let e = format!(
        "{:#}",
        prepare(&input, &scratch("no-classes-out"), &quiet(4)).unwrap_err()
    );
    assert!(e.contains("no class folders"), "{e}");
}

#[test]
#[cfg(target_os = "linux")]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_complete() {
    let input = scratch("full-in");
    small_tree(&input);
    let out = scratch("full-out");
    // The first shard's temporary file leads to /dev/full: every write to it fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", out.join("shard-00000.bin.tmp")).unwrap();
    let e = format!("{:#}", prepare(&input, &out, &quiet(4)).unwrap_err());
    assert!(
        e.contains("shard-00000.bin") && e.contains("disk is full"),
        "{e}"
    );
    assert!(!out.join(METADATA_FILE).exists());
    assert!(!out.join("shard-00000.bin").exists());
    assert!(Dataset::open(&out).is_err());
}

#[test]
fn truncated_and_corrupted_shards_are_detected() {
    let input = scratch("damage-in");
    small_tree(&input);
    let out = scratch("damage-out");
    prepare(&input, &out, &quiet(4)).unwrap();
    let shard = out.join("shard-00001.bin");
    let bytes = std::fs::read(&shard).unwrap();
    // Truncated: caught when the dataset is opened.
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let e = format!(
        "{:#}",
        Dataset::open(&out)
            .err()
            .expect("a truncated shard is refused")
    );
    assert!(
        e.contains("shard-00001.bin") && e.contains("truncated"),
        "{e}"
    );
    // Same length, one byte changed: caught by the checksum when first read.
    let mut flipped = bytes.clone();
    let at = flipped.len() - 7;
    flipped[at] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let ds = Dataset::open(&out).unwrap();
    ds.image(0).unwrap();
    let e = format!(
        "{:#}",
        ds.image(5).expect_err("a corrupted shard is refused")
    );
    assert!(
        e.contains("shard-00001.bin") && e.contains("corrupted"),
        "{e}"
    );
}

/// The photographs prepared into a scratch folder (kept alive with the dataset).
fn prepared(name: &str) -> (Scratch, Arc<Dataset>) {
    let out = scratch(name);
    prepare(&photos(), &out, &quiet(8)).unwrap();
    let ds = Arc::new(Dataset::open(&out).unwrap());
    (out, ds)
}

fn config(global_batch: usize, replicas: usize, replica: usize, view: View) -> LoaderConfig {
    LoaderConfig {
        global_batch,
        replicas,
        replica,
        seed: 5,
        view,
        crop: 224,
        threads: 2,
        prefetch: 2,
        bytes: false,
    }
}

/// An XXH3 of every batch of an epoch: samples, labels and pixels.
fn epoch_digest(ds: &Arc<Dataset>, cfg: &LoaderConfig, epoch: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for b in EpochLoader::new(ds.clone(), cfg.clone(), epoch).unwrap() {
        let b = b.unwrap();
        h.update(
            &b.samples
                .iter()
                .flat_map(|s| (*s as u64).to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        h.update(
            &b.labels
                .iter()
                .flat_map(|l| l.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        h.update(
            &b.pixels
                .into_floats()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    h.digest()
}

#[test]
fn batches_are_the_same_in_every_run_and_process() {
    let (_dir, ds) = prepared("determinism");
    let cfg = config(4, 1, 0, View::Train);
    let digest = epoch_digest(&ds, &cfg, 3);
    if std::env::var("ALEXNET_DIGEST_CHILD").is_ok() {
        println!("digest={digest}");
        return;
    }
    assert_eq!(digest, epoch_digest(&ds, &cfg, 3), "the same run");
    assert_ne!(digest, epoch_digest(&ds, &cfg, 4), "another epoch");
    assert_ne!(
        digest,
        epoch_digest(
            &ds,
            &LoaderConfig {
                seed: 6,
                ..cfg.clone()
            },
            3
        ),
        "another seed"
    );
    // Another process, with another number of loader threads.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "batches_are_the_same_in_every_run_and_process",
            "--nocapture",
        ])
        .env("ALEXNET_DIGEST_CHILD", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("digest={digest}")),
        "the child printed: {text}"
    );
}

#[test]
fn replicas_split_every_batch_disjointly_and_cover_the_epoch() {
    let (_dir, ds) = prepared("replicas");
    for replicas in [1, 2, 4] {
        let mut seen = HashSet::new();
        let mut per_batch: Vec<Vec<usize>> = Vec::new();
        for r in 0..replicas {
            let cfg = config(8, replicas, r, View::Train);
            for (i, b) in EpochLoader::new(ds.clone(), cfg, 2).unwrap().enumerate() {
                let b = b.unwrap();
                assert_eq!(b.samples.len(), 8 / replicas);
                if per_batch.len() <= i {
                    per_batch.push(Vec::new());
                }
                per_batch[i].extend(&b.samples);
                for s in b.samples {
                    assert!(
                        seen.insert(s),
                        "sample {s} drawn twice ({replicas} replicas)"
                    );
                }
            }
        }
        // Together the replicas draw exactly the global batches of one process.
        let whole = loader::epoch_order(ds.len(), 5, 2, View::Train);
        for (i, mut got) in per_batch.into_iter().enumerate() {
            let mut want = whole[i * 8..(i + 1) * 8].to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want, "batch {i}, {replicas} replicas");
        }
        assert_eq!(
            seen.len(),
            16,
            "two full batches of the 20 samples ({replicas} replicas)"
        );
    }
    // Evaluation covers every sample once, the last batch partial.
    let mut seen = Vec::new();
    for r in 0..3 {
        for b in EpochLoader::new(ds.clone(), config(8, 3, r, View::Centre), 0).unwrap() {
            seen.extend(b.unwrap().samples);
        }
    }
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
}

#[test]
fn evaluation_views_are_the_centre_and_the_ten_patches() {
    let (_dir, ds) = prepared("views");
    let first = |view| {
        let b = EpochLoader::new(ds.clone(), config(4, 1, 0, view), 0).unwrap();
        b.into_iter()
            .next()
            .unwrap()
            .unwrap()
            .pixels
            .into_floats()
            .unwrap()
    };
    let (centre, ten) = (first(View::Centre), first(View::TenPatches));
    let per = 3 * 224 * 224;
    assert_eq!(centre.len(), 4 * per);
    assert_eq!(ten.len(), 40 * per);
    // Patch 4 of each sample is the centre crop; patch 9 is its mirror.
    for s in 0..4 {
        let c = &centre[s * per..(s + 1) * per];
        assert_eq!(&ten[(s * 10 + 4) * per..(s * 10 + 5) * per], c);
        let mirror = &ten[(s * 10 + 9) * per..(s * 10 + 10) * per];
        for row in 0..3 * 224 {
            let (a, b) = (
                &c[row * 224..(row + 1) * 224],
                &mirror[row * 224..(row + 1) * 224],
            );
            assert!(
                a.iter().eq(b.iter().rev()),
                "row {row} of sample {s} is mirrored"
            );
        }
    }
    // The centre view is the stored image minus the mean, at offset 16.
    let (_, img) = ds.image(0).unwrap();
    let want = img[16 * 256 + 16] as f32 - ds.mean[16 * 256 + 16];
    assert_eq!(centre[0], want);
}

#[test]
fn views_shipped_as_bytes_finish_to_the_same_bits_as_float_views() {
    let (_dir, ds) = prepared("bytes");
    for view in [View::Train, View::Centre, View::TenPatches] {
        let floats = config(8, 2, 1, view);
        let bytes = LoaderConfig {
            bytes: true,
            ..floats.clone()
        };
        let a = EpochLoader::new(ds.clone(), floats, 1).unwrap();
        let b = EpochLoader::new(ds.clone(), bytes, 1).unwrap();
        let mut batches = 0;
        for (a, b) in a.zip(b) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!((&a.samples, &a.labels), (&b.samples, &b.labels));
            let Pixels::Bytes(views) = &b.pixels else {
                panic!("{view:?}: a byte batch came as floats")
            };
            // One byte per value where the float views take four.
            let values = a.pixels.clone().into_floats().unwrap().len();
            assert_eq!(views.pixels.len(), values);
            let bits = |p: Pixels| -> Vec<u32> {
                p.into_floats()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert!(bits(a.pixels) == bits(b.pixels), "{view:?}: views differ");
            batches += 1;
        }
        assert!(batches >= 2, "{view:?}: {batches} batches compared");
    }
}

#[test]
fn evaluation_sets_are_centred_by_the_training_mean() {
    let (_dir, train) = prepared("train-mean");
    let input = scratch("other-set-input");
    small_tree(&input);
    let out = scratch("other-set");
    prepare(&input, &out, &quiet(4)).unwrap();
    let mut other = Dataset::open(&out).unwrap();
    assert!(
        other.mean != train.mean,
        "six photographs average otherwise than twenty"
    );
    other.use_mean_of(&train).unwrap();
    let other = Arc::new(other);
    let b = EpochLoader::new(other.clone(), config(2, 1, 0, View::Centre), 0).unwrap();
    let centre = b
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .pixels
        .into_floats()
        .unwrap();
    let (_, img) = other.image(0).unwrap();
    let at = 16 * 256 + 16;
    assert_eq!(centre[0], img[at] as f32 - train.mean[at]);
    // A set prepared at another side cannot take the training mean, and says why.
    let small = scratch("other-side");
    let opts = PrepareOptions {
        side: 128,
        ..quiet(4)
    };
    prepare(&input, &small, &opts).unwrap();
    let e = Dataset::open(&small)
        .unwrap()
        .use_mean_of(&train)
        .unwrap_err();
    assert!(
        format!("{e}").contains("prepared at the training set's size"),
        "{e}"
    );
}

/// A rerun of `prepare` into a finished output notices that the input changed (an image
/// added, a class added) and refuses with what to do, instead of keeping the stale dataset;
/// an unchanged input is still "nothing to do". A run folder is not an output.
#[test]
fn a_changed_input_is_noticed_by_a_rerun() {
    let dir = scratch("fingerprint");
    let input = dir.join("in");
    let images = small_tree(&input);
    let out = dir.join("out");
    prepare(&input, &out, &quiet(4)).unwrap();
    let again = prepare(&input, &out, &quiet(4)).unwrap();
    assert_eq!(again.shards_reused, again.shards);
    std::fs::copy(&images[0], input.join("apple/added.jpg")).unwrap();
    let e = format!("{:#}", prepare(&input, &out, &quiet(4)).unwrap_err());
    assert!(
        e.contains("holds a dataset prepared from other input")
            && e.contains("6 images in 3 classes then; 7 images in 3 classes")
            && e.contains(&format!("remove {}", out.display())),
        "{e}"
    );
    std::fs::remove_file(input.join("apple/added.jpg")).unwrap();
    prepare(&input, &out, &quiet(4)).unwrap();
    std::fs::create_dir_all(input.join("dog")).unwrap();
    std::fs::copy(&images[1], input.join("dog/d.jpg")).unwrap();
    let e = format!("{:#}", prepare(&input, &out, &quiet(4)).unwrap_err());
    assert!(e.contains("7 images in 4 classes"), "{e}");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("job.json"), "{}").unwrap();
    let e = format!("{:#}", prepare(&input, &run, &quiet(4)).unwrap_err());
    assert!(e.contains("is a training run's folder"), "{e}");
}

/// Images the tests make: `per_class` 12x12 PNGs of one flat colour in each class folder,
/// red the image's number and green its class's, so that a stored image says which it is.
fn made_tree(dir: &Path, classes: &[&str], per_class: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let path = dir.join(class).join(format!("img{i:03}.png"));
            made_image(&path, i as u8, c as u8);
            out.push(path);
        }
    }
    out
}

fn made_image(path: &Path, red: u8, green: u8) {
    // PNG whatever the name says (`.JPEG` too): the decoder goes by the content, and PNG
    // keeps the colours exact.
    image::RgbImage::from_pixel(12, 12, image::Rgb([red, green, 200]))
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

/// (green, red) of every stored image: which made image it is.
fn stored(ds: &Dataset) -> Vec<(u8, u8)> {
    let plane = ds.side() * ds.side();
    (0..ds.len())
        .map(|i| {
            let (label, img) = ds.image(i).unwrap();
            assert_eq!(label as u8, img[plane], "the label is the class's");
            (img[plane], img[0])
        })
        .collect()
}

fn split_opts(fraction: f64, seed: u64) -> PrepareOptions {
    PrepareOptions {
        side: 12,
        val_split: Some(ValSplit { fraction, seed }),
        ..quiet(16)
    }
}

/// `prepare --val-fraction`: train/ and val/ from one tree, every image in exactly one, each
/// image's part the function of its path and the seed, every class split at the fraction's
/// rate, val/ carrying train/'s statistics; adding an image moves no other.
#[test]
fn a_validation_split_is_stratified_stable_and_disjoint() {
    let input = scratch("split-in");
    let classes = ["apple", "bear", "cat"];
    made_tree(&input, &classes, 40);
    let out = scratch("split-out");
    let summary = prepare(&input, &out, &split_opts(0.25, 7)).unwrap();
    let train = Dataset::open(&out.join("train")).unwrap();
    let val = Dataset::open(&out.join("val")).unwrap();
    assert_eq!(summary.images, train.len());
    assert_eq!(summary.val.as_ref().unwrap().images, val.len());
    let (t, v) = (stored(&train), stored(&val));
    let mut all: Vec<_> = t.iter().chain(&v).copied().collect();
    all.sort();
    let want: Vec<(u8, u8)> = (0..3).flat_map(|c| (0..40).map(move |i| (c, i))).collect();
    assert_eq!(all, want, "every image in exactly one part");
    for (c, class) in classes.iter().enumerate() {
        let predicted: Vec<u8> = (0..40u8)
            .filter(|i| {
                in_val(
                    &format!("{class}/img{i:03}.png"),
                    ValSplit {
                        fraction: 0.25,
                        seed: 7,
                    },
                )
            })
            .collect();
        let got: Vec<u8> = v.iter().filter(|x| x.0 == c as u8).map(|x| x.1).collect();
        assert_eq!(
            got, predicted,
            "{class}: val/ is the images the split draws"
        );
        assert!(
            (4..=16).contains(&got.len()),
            "{class}: {} of 40 in val/ at 0.25",
            got.len()
        );
        assert_eq!(val.meta.class_counts[c], got.len());
    }
    assert_eq!(train.meta.classes, val.meta.classes);
    assert_eq!(
        std::fs::read(out.join("train/mean.bin")).unwrap(),
        std::fs::read(out.join("val/mean.bin")).unwrap(),
        "val/ is centred by the training mean"
    );
    assert_eq!(train.meta.rgb_eigenvalues, val.meta.rgb_eigenvalues);
    let split = val.meta.split.as_ref().unwrap();
    assert_eq!(
        (
            split.part.as_str(),
            split.val_fraction,
            split.seed,
            split.val_files
        ),
        ("val", 0.25, 7, v.len())
    );
    assert_eq!(train.meta.split.as_ref().unwrap().part, "train");
    // A rerun finds both parts complete.
    let again = prepare(&input, &out, &split_opts(0.25, 7)).unwrap();
    assert_eq!(again.shards_reused, again.shards);
    // Another seed, another split, refused into the same output by name.
    let e = format!(
        "{:#}",
        prepare(&input, &out, &split_opts(0.25, 8)).unwrap_err()
    );
    assert!(e.contains("--val-fraction or --seed"), "{e}");
    let other = scratch("split-seed8");
    prepare(&input, &other, &split_opts(0.25, 8)).unwrap();
    assert_ne!(stored(&Dataset::open(&other.join("val")).unwrap()), v);
    // An image added: every other stays where it was.
    made_image(&input.join("bear/img999.png"), 250, 1);
    let grown = scratch("split-grown");
    prepare(&input, &grown, &split_opts(0.25, 7)).unwrap();
    let (t2, v2) = (
        stored(&Dataset::open(&grown.join("train")).unwrap()),
        stored(&Dataset::open(&grown.join("val")).unwrap()),
    );
    assert!(t.iter().all(|x| t2.contains(x)), "a training image moved");
    assert!(v.iter().all(|x| v2.contains(x)), "a validation image moved");
    assert_eq!(t2.len() + v2.len(), 121);
    assert!(t2.contains(&(1, 250)) != v2.contains(&(1, 250)));
}

/// A split keeps a training image in every class (the carried photographs have one or two
/// per class), and refuses what cannot be split, by name; nothing is left behind.
#[test]
fn a_split_of_the_photographs_keeps_every_class_in_training() {
    let out = scratch("split-photos");
    let opts = PrepareOptions {
        side: 32,
        ..split_opts(0.5, 1)
    };
    let s = prepare(&photos(), &out, &opts).unwrap();
    let train = Dataset::open(&out.join("train")).unwrap();
    assert!(
        train.meta.class_counts.iter().all(|&n| n >= 1),
        "{:?}",
        train.meta.class_counts
    );
    assert_eq!(s.images + s.val.unwrap().images, 20);
    let e = format!(
        "{:#}",
        prepare(&photos(), &out.join("x"), &split_opts(1.5, 1)).unwrap_err()
    );
    assert!(
        e.contains("--val-fraction 1.5 must be between 0 and 1"),
        "{e}"
    );
    assert!(!out.join("x").exists());
    let e = format!(
        "{:#}",
        prepare(&photos(), &out.join("y"), &split_opts(0.001, 1)).unwrap_err()
    );
    assert!(e.contains("puts none of the 20 images in val/"), "{e}");
    assert!(!out.join("y").exists());
    let whole = scratch("split-whole");
    prepare(
        &photos(),
        &whole,
        &PrepareOptions {
            side: 32,
            ..quiet(8)
        },
    )
    .unwrap();
    let e = format!("{:#}", prepare(&photos(), &whole, &opts).unwrap_err());
    assert!(e.contains("holds a dataset prepared whole"), "{e}");
    let e = format!(
        "{:#}",
        prepare(
            &photos(),
            &out,
            &PrepareOptions {
                side: 32,
                ..quiet(8)
            }
        )
        .unwrap_err()
    );
    assert!(e.contains("holds a split dataset"), "{e}");
}

/// A flat folder of made images, as ImageNet's validation images come.
fn flat_folder(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, n) in names.iter().enumerate() {
        made_image(&dir.join(n), i as u8, 0);
    }
}

fn labelled(labels: &Path, class_names: Option<&Path>) -> PrepareOptions {
    PrepareOptions {
        side: 12,
        labels: Some(labels.to_path_buf()),
        class_names: class_names.map(Path::to_path_buf),
        ..quiet(4)
    }
}

/// `prepare --labels`: ILSVRC's LOC_val_solution.csv (ids without their extension, the class
/// the prediction string's first word) and plain `file,class` lines, for a flat folder;
/// `--class-names` (LOC_synset_mapping.txt) names the classes and makes them the file's
/// (sorted), so a set lacking one still lines up with its training set.
#[test]
fn label_files_in_both_formats_label_a_flat_folder() {
    let dir = scratch("labels");
    let images = dir.join("val");
    flat_folder(
        &images,
        &[
            "ILSVRC2012_val_00000001.JPEG",
            "ILSVRC2012_val_00000002.JPEG",
            "ILSVRC2012_val_00000003.JPEG",
        ],
    );
    std::fs::write(images.join("README.txt"), "not an image").unwrap();
    let solution = dir.join("LOC_val_solution.csv");
    std::fs::write(
        &solution,
        "ImageId,PredictionString\n\
         ILSVRC2012_val_00000003,n01440764 10 20 30 40 n01440764 1 2 3 4\n\
         ILSVRC2012_val_00000001,n02119789 255 142 454 329 n02119789 44 21 322 295\n\
         ILSVRC2012_val_00000002,n02119789 1 1 5 5\n",
    )
    .unwrap();
    let mapping = dir.join("LOC_synset_mapping.txt");
    std::fs::write(
        &mapping,
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02119789 kit fox, Vulpes macrotis\n",
    )
    .unwrap();
    let out = dir.join("out");
    let s = prepare(&images, &out, &labelled(&solution, Some(&mapping))).unwrap();
    assert_eq!((s.images, s.classes), (3, 3));
    assert_eq!(s.skipped.len(), 1, "README.txt: {:?}", s.skipped);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.meta.classes, ["n01440764", "n01443537", "n02119789"]);
    assert_eq!(ds.meta.class_counts, [1, 0, 2]);
    assert_eq!(
        ds.meta.display_name(2),
        "n02119789 kit fox, Vulpes macrotis"
    );
    // Stored in file order, each with its label: red is the image's number.
    let got: Vec<(u32, u8)> = (0..3)
        .map(|i| ds.image(i).unwrap())
        .map(|(l, img)| (l, img[0]))
        .collect();
    assert_eq!(got, [(2, 0), (2, 1), (0, 2)]);
    // A training tree in class folders, with the same names: the same classes in the same
    // order, though the validation set has no goldfish.
    let tree = dir.join("train");
    made_tree(&tree, &["n01440764", "n01443537", "n02119789"], 2);
    let train_out = dir.join("train-out");
    let opts = PrepareOptions {
        class_names: Some(mapping.clone()),
        side: 12,
        ..quiet(4)
    };
    prepare(&tree, &train_out, &opts).unwrap();
    let train = Arc::new(Dataset::open(&train_out).unwrap());
    assert_eq!(train.meta.classes, ds.meta.classes);
    assert_eq!(train.meta.display_name(0), "n01440764 tench, Tinca tinca");
    let net = alexnet::model::NetConfig::narrow(11, [4, 4, 4, 4, 4], [4, 4], 4);
    let open = |val: Arc<Dataset>| {
        alexnet::train::prepared::PreparedData::new(
            train.clone(),
            val,
            &net,
            2,
            (1, 0),
            1,
            1,
            false,
        )
    };
    assert!(open(Arc::new(ds)).is_ok());

    // Plain `file,class` lines, with or without a header, by file name; no --class-names:
    // the labels' own classes.
    for (name, text) in [
        (
            "with-header.csv",
            "file,class\nILSVRC2012_val_00000001.JPEG,fox\nILSVRC2012_val_00000002.JPEG,fish\n",
        ),
        (
            "bare.csv",
            "ILSVRC2012_val_00000001.JPEG,fox\nILSVRC2012_val_00000002.JPEG,fish\n",
        ),
    ] {
        let labels = dir.join(name);
        std::fs::write(&labels, text).unwrap();
        let out = dir.join(format!("out-{name}"));
        let s = prepare(&images, &out, &labelled(&labels, None)).unwrap();
        assert_eq!(s.images, 2, "{name}");
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(ds.meta.classes, ["fish", "fox"], "{name}");
        assert_eq!(ds.image(0).unwrap().0, 1, "{name}: image 1 is a fox");
        assert!(
            ds.meta
                .skipped
                .iter()
                .any(|s| s.path.ends_with("00000003.JPEG") && s.reason.contains("not in --labels")),
            "{name}: {:?}",
            ds.meta.skipped
        );
        // Without the names file the classes are the labels' own: training refuses the
        // pair, saying where they part.
        let e = open(Arc::new(ds)).err().expect("other classes").to_string();
        assert!(
            e.contains(
                "have different classes (3 and 2; class 0 is n01440764 in one, fish in the other)"
            ) && e.contains("--class-names"),
            "{e}"
        );
    }
}

/// A label file naming an image that is not there, a malformed line (in either file), a class
/// the names file lacks and an image labelled twice are each refused with the file, the line
/// and what to do, before anything is written.
#[test]
fn label_file_mistakes_are_named_and_nothing_is_written() {
    let dir = scratch("labels-bad");
    let images = dir.join("val");
    flat_folder(&images, &["a.png", "b.png"]);
    let mapping = dir.join("names.txt");
    std::fs::write(&mapping, "fox a fox\nfish a fish\n").unwrap();
    let cases: [(&str, &str, Option<&Path>, &[&str]); 6] = [
        ("missing.csv", "a.png,fox\nc.png,fish\nd.png,fish\n", None,
         &["missing.csv line 2 names c.png, which is not in --input", "1 more lines name missing images (lines 3)", "rerun"]),
        ("malformed.csv", "a.png,fox\nb.png fish\n", None,
         &["malformed.csv line 2: expected `file,class`, found `b.png fish`; fix the line and rerun"]),
        ("ilsvrc.csv", "ImageId,PredictionString\na,fox 1 2 3 4\nb\n", None,
         &["ilsvrc.csv line 3: expected `ImageId,PredictionString`", "found `b`"]),
        ("twice.csv", "a.png,fox\na.png,fish\n", None,
         &["twice.csv line 2 labels a.png again (line 1 did)"]),
        ("unknown.csv", "a.png,fox\nb.png,cat\n", Some(&mapping),
         &["the class cat, which --class-names", "does not name"]),
        ("fine.csv", "a.png,fox\n", Some(&dir.join("bad-names.txt")),
         &["bad-names.txt line 2: expected a class, a space and its name", "found `fish`"]),
    ];
    std::fs::write(dir.join("bad-names.txt"), "fox a fox\nfish\n").unwrap();
    for (name, text, names, want) in cases {
        let labels = dir.join(name);
        std::fs::write(&labels, text).unwrap();
        let out = dir.join(format!("out-{name}"));
        let e = format!(
            "{:#}",
            prepare(&images, &out, &labelled(&labels, names)).unwrap_err()
        );
        for w in want {
            assert!(e.contains(w), "{name}: wanted `{w}` in: {e}");
        }
        assert!(!out.exists(), "{name}: an output was left behind");
    }
}
