//! Reader for the IDX format used by MNIST and Fashion-MNIST.
//!
//! An IDX file is a big-endian header (`0x00 0x00 <type> <ndim>` followed by
//! `ndim` u32 sizes) and then the raw payload. Image files are `u8` with three
//! dimensions (count, rows, columns); label files are `u8` with one (count).
//! Files may be gzipped, as they are distributed; that is detected from the
//! content, not the name, so a renamed file still reads.
//!
//! The repository carries a class-balanced Fashion-MNIST sample in
//! `data/sample/fashion-mnist/` (see the README there).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;

/// Fashion-MNIST's class names, indexed by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// IDX magic for unsigned bytes in three dimensions (count, rows, columns).
const IMAGE_MAGIC: u32 = 0x0000_0803;
/// IDX magic for unsigned bytes in one dimension (count).
const LABEL_MAGIC: u32 = 0x0000_0801;
/// An IDX file of `rows` x `cols` byte images (`pixels`, image after image): what
/// [`read_idx_pair`] reads.
pub fn encode_images(rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let count = pixels.len() / (rows * cols).max(1) as usize;
    encode(IMAGE_MAGIC, &[count as u32, rows, cols], pixels)
}

/// An IDX file of byte labels.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    encode(LABEL_MAGIC, &[labels.len() as u32], labels)
}

/// The big-endian header (magic, then each dimension), then the payload.
fn encode(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// The first two bytes of every gzip stream (RFC 1952). An IDX file always
/// starts with two zero bytes, so the two cannot be confused.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A labelled set of small grey or colour images held in memory (u8, NCHW-like:
/// image-major, then channel, row, column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// `len() * channels * height * width` pixel values, one image after another.
    pub images: Vec<u8>,
    /// One label per image, each below `class_names.len()`.
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Display name of each class, indexed by label.
    pub class_names: Vec<String>,
}

impl ImageSet {
    /// Number of images (and labels).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`, channel-major then row-major.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.image_size();
        &self.images[i * size..(i + 1) * size]
    }

    /// Number of classes the labels index into, which may exceed the number of
    /// distinct labels present (a small test split can miss a class).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// Reads an IDX image file and label file (plain or .gz), checking magic
/// numbers, dimensions, counts and file lengths; errors name the file and what
/// is wrong.
///
/// Class names are the label numbers as text (`"0"`, `"1"`, ...), one per
/// label up to the largest seen; callers that know the dataset replace them.
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<ImageSet> {
    let (image_dims, pixels) = read_idx(images, IMAGE_MAGIC)?;
    let (label_dims, raw_labels) = read_idx(labels, LABEL_MAGIC)?;
    let [count, height, width] = image_dims[..] else {
        unreachable!("read_idx returns as many dimensions as the magic declares")
    };
    ensure!(
        height > 0 && width > 0,
        "{}: image size is {height}x{width}; both sides must be positive",
        images.display()
    );
    ensure!(
        count == label_dims[0],
        "{} holds {count} images but {} holds {} labels",
        images.display(),
        labels.display(),
        label_dims[0]
    );

    let labels: Vec<u32> = raw_labels.into_iter().map(u32::from).collect();
    let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    Ok(ImageSet {
        images: pixels,
        labels,
        channels: 1,
        height,
        width,
        class_names: (0..num_classes).map(|c| c.to_string()).collect(),
    })
}

/// Reads `<dir>/train-*` and `<dir>/t10k-*` (both the carried sample and the
/// full Fashion-MNIST/MNIST folder layout, .gz or not): (train, test); class
/// names are Fashion-MNIST's when labels are 0..9.
///
/// Both sets get the same class list, so `num_classes()` agrees between them
/// even when the test split lacks a class. MNIST digits also have labels 0..9
/// and so get Fashion-MNIST's names too: the files do not say which dataset
/// they are, and the names are only used for display.
pub fn read_fashion_mnist_dir(dir: &Path) -> Result<(ImageSet, ImageSet)> {
    let read_split = |split: &str| -> Result<ImageSet> {
        let images = find_idx_file(dir, split, "images", 3)?;
        let labels = find_idx_file(dir, split, "labels", 1)?;
        read_idx_pair(&images, &labels)
    };
    let mut train = read_split("train")?;
    let mut test = read_split("t10k")?;

    let num_classes = train.num_classes().max(test.num_classes());
    let class_names: Vec<String> = if num_classes <= FASHION_MNIST_CLASSES.len() {
        // Always all ten, even if the labels seen stop short of 9, so that a
        // model's output width does not depend on which classes a subset holds.
        FASHION_MNIST_CLASSES
            .iter()
            .map(|&s| s.to_owned())
            .collect()
    } else {
        (0..num_classes).map(|c| c.to_string()).collect()
    };
    train.class_names = class_names.clone();
    test.class_names = class_names;
    Ok((train, test))
}

/// Finds `<split>-<kind>-idx<ndim>-ubyte`, gzipped or not. The dotted spelling
/// `<split>-<kind>.idx<ndim>-ubyte` is also accepted because some MNIST
/// mirrors and unpackers use it.
fn find_idx_file(dir: &Path, split: &str, kind: &str, ndim: usize) -> Result<PathBuf> {
    let names = [
        format!("{split}-{kind}-idx{ndim}-ubyte.gz"),
        format!("{split}-{kind}-idx{ndim}-ubyte"),
        format!("{split}-{kind}.idx{ndim}-ubyte.gz"),
        format!("{split}-{kind}.idx{ndim}-ubyte"),
    ];
    names
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "no {split} {kind} file in {}: looked for {}",
                dir.display(),
                names.join(", ")
            )
        })
}

/// Opens `path`, transparently decompressing it if it is gzipped.
fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let head = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(if head.starts_with(&GZIP_MAGIC) {
        // Multi-member so that files concatenated with `cat a.gz b.gz` decode
        // whole instead of silently stopping after the first member.
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Reads one IDX file whose magic must be `magic`; returns its dimensions and
/// payload, which must be exactly as long as the dimensions say.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut reader = open_maybe_gz(path)?;
    let file = path.display();

    let found = read_u32(&mut reader)
        .with_context(|| format!("{file}: truncated before the end of the IDX magic number"))?;
    ensure!(
        found == magic,
        "{file}: IDX magic number is {found:#010x}, expected {magic:#010x} ({})",
        describe_magic(magic)
    );

    let ndim = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        let size = read_u32(&mut reader)
            .with_context(|| format!("{file}: truncated in the IDX header (dimension {d})"))?;
        dims.push(size as usize);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("{file}: dimensions {dims:?} overflow the address space"))?;

    // Read through `take` rather than allocating `expected` bytes up front: a
    // corrupt header could claim terabytes, and we want that reported as a
    // short file, not an allocation abort. One extra byte detects trailing data.
    let mut payload = Vec::new();
    reader
        .take(expected as u64 + 1)
        .read_to_end(&mut payload)
        .with_context(|| format!("{file}: cannot read the IDX payload"))?;
    match payload.len().cmp(&expected) {
        std::cmp::Ordering::Less => bail!(
            "{file}: truncated: header {dims:?} needs {expected} payload bytes, found {}",
            payload.len()
        ),
        std::cmp::Ordering::Greater => {
            bail!("{file}: longer than its header {dims:?} says ({expected} payload bytes)")
        }
        std::cmp::Ordering::Equal => Ok((dims, payload)),
    }
}

fn read_u32(reader: &mut impl Read) -> std::io::Result<u32> {
    let mut bytes = [0u8; 4];
    reader.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn describe_magic(magic: u32) -> &'static str {
    match magic {
        IMAGE_MAGIC => "u8 images, 3 dimensions",
        LABEL_MAGIC => "u8 labels, 1 dimension",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn sample_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fashion-mnist")
    }

    /// A scratch folder under the system temp dir, removed on drop. Named by
    /// process id and a counter so parallel tests and concurrent runs never
    /// share one.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("alexnet-idx-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Three 2x2 images labelled 0, 2, 1.
    fn tiny_pair(dir: &TempDir) -> (PathBuf, PathBuf) {
        let pixels: Vec<u8> = (0..12).collect();
        let images = dir.write("imgs-idx3-ubyte", &encode(IMAGE_MAGIC, &[3, 2, 2], &pixels));
        let labels = dir.write("lbls-idx1-ubyte", &encode(LABEL_MAGIC, &[3], &[0, 2, 1]));
        (images, labels)
    }

    fn error_text(result: Result<ImageSet>) -> String {
        // `{:#}` includes the whole context chain, which is what a user sees.
        format!("{:#}", result.expect_err("expected an error"))
    }

    fn class_counts(set: &ImageSet) -> Vec<usize> {
        let mut counts = vec![0; set.num_classes()];
        for &l in &set.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    #[test]
    fn reads_carried_sample() {
        let (train, test) = read_fashion_mnist_dir(&sample_dir()).unwrap();
        for (set, n, per_class) in [(&train, 3000, 300), (&test, 500, 50)] {
            assert_eq!(set.len(), n);
            assert_eq!((set.channels, set.height, set.width), (1, 28, 28));
            assert_eq!(set.images.len(), n * 28 * 28);
            assert_eq!(set.num_classes(), 10);
            assert_eq!(class_counts(set), vec![per_class; 10]);
            // The sample interleaves classes so that any prefix is balanced.
            assert_eq!(&set.labels[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        }
        assert_eq!(train.class_names[0], "T-shirt/top");
        assert_eq!(train.class_names[9], "Ankle boot");
        // Real images, not zero padding: every image has some ink.
        assert!((0..train.len()).all(|i| train.image(i).iter().any(|&p| p > 0)));
    }

    #[test]
    fn reads_plain_and_gzipped_alike() {
        let dir = TempDir::new("plain-gz");
        let (images, labels) = tiny_pair(&dir);
        let plain = read_idx_pair(&images, &labels).unwrap();
        assert_eq!(plain.len(), 3);
        assert_eq!((plain.channels, plain.height, plain.width), (1, 2, 2));
        assert_eq!(plain.image(1), &[4, 5, 6, 7]);
        assert_eq!(plain.labels, vec![0, 2, 1]);
        assert_eq!(plain.class_names, vec!["0", "1", "2"]);

        let gz_images = dir.write("imgs.gz", &gzip(&std::fs::read(&images).unwrap()));
        let gz_labels = dir.write("lbls.gz", &gzip(&std::fs::read(&labels).unwrap()));
        assert_eq!(read_idx_pair(&gz_images, &gz_labels).unwrap(), plain);
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = TempDir::new("truncated");
        let (images, labels) = tiny_pair(&dir);
        let full = std::fs::read(&images).unwrap();
        let short = dir.write("short-images-idx3-ubyte", &full[..full.len() - 1]);
        let msg = error_text(read_idx_pair(&short, &labels));
        assert!(msg.contains("short-images-idx3-ubyte"), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");

        // Cut inside the header, and cut inside a gzip stream, too.
        let header_cut = dir.write("header-cut", &full[..6]);
        let msg = error_text(read_idx_pair(&header_cut, &labels));
        assert!(
            msg.contains("header-cut") && msg.contains("truncated"),
            "{msg}"
        );

        let gz = gzip(&full);
        let gz_cut = dir.write("cut.gz", &gz[..gz.len() / 2]);
        let msg = error_text(read_idx_pair(&gz_cut, &labels));
        assert!(msg.contains("cut.gz"), "{msg}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let dir = TempDir::new("trailing");
        let (images, labels) = tiny_pair(&dir);
        let mut long = std::fs::read(&labels).unwrap();
        long.push(0);
        let long = dir.write("long-labels", &long);
        let msg = error_text(read_idx_pair(&images, &long));
        assert!(
            msg.contains("long-labels") && msg.contains("longer"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_magic_is_an_error_naming_the_file() {
        let dir = TempDir::new("magic");
        let (images, labels) = tiny_pair(&dir);
        // Swapping the files gives each the other's magic number.
        let msg = error_text(read_idx_pair(&labels, &images));
        assert!(
            msg.contains("lbls-idx1-ubyte") && msg.contains("magic"),
            "{msg}"
        );

        let bogus = dir.write("bogus-labels", &encode(0x0000_0901, &[3], &[0, 1, 2]));
        let msg = error_text(read_idx_pair(&images, &bogus));
        assert!(
            msg.contains("bogus-labels") && msg.contains("0x00000901"),
            "{msg}"
        );
    }

    #[test]
    fn mismatched_counts_are_an_error_naming_both_files() {
        let dir = TempDir::new("counts");
        let (images, _) = tiny_pair(&dir);
        let labels = dir.write("four-labels", &encode(LABEL_MAGIC, &[4], &[0, 1, 2, 3]));
        let msg = error_text(read_idx_pair(&images, &labels));
        assert!(
            msg.contains("imgs-idx3-ubyte") && msg.contains("four-labels"),
            "{msg}"
        );
        assert!(
            msg.contains("3 images") && msg.contains("4 labels"),
            "{msg}"
        );
    }

    #[test]
    fn missing_files_are_reported_with_the_names_tried() {
        let dir = TempDir::new("missing");
        let msg = format!("{:#}", read_fashion_mnist_dir(&dir.0).unwrap_err());
        assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
    }

    #[test]
    fn reads_unzipped_mnist_layout() {
        let dir = TempDir::new("layout");
        let (images, labels) = tiny_pair(&dir);
        let (img, lbl) = (
            std::fs::read(images).unwrap(),
            std::fs::read(labels).unwrap(),
        );
        dir.write("train-images-idx3-ubyte", &img);
        dir.write("train-labels-idx1-ubyte", &lbl);
        dir.write("t10k-images.idx3-ubyte", &img);
        dir.write("t10k-labels.idx1-ubyte", &lbl);
        let (train, test) = read_fashion_mnist_dir(&dir.0).unwrap();
        assert_eq!((train.len(), test.len()), (3, 3));
        // Labels 0..=2 lie within 0..9, so both sets get all ten names.
        assert_eq!(train.num_classes(), 10);
        assert_eq!(test.class_names[2], "Pullover");
    }
}
