//! Images in, batches out.
//!
//! - [`idx`]: labelled image sets in IDX files (MNIST / Fashion-MNIST), held in memory.
//! - [`prepare`]: an ImageFolder tree into the paper's preprocessed, sharded form.
//! - [`labels`]: label files for flat folders of images (ILSVRC's, `file,class`), class names.
//! - [`shards`]: that form on disk, and reading it back.
//! - [`augment`]: the paper's training and evaluation views.
//! - [`loader`]: batches from prepared shards, on background threads.

pub mod augment;
pub mod bench;
pub mod idx;
pub mod labels;
pub mod loader;
pub mod prepare;
pub mod shards;
