//! Training data: readers that turn image files on disk into in-memory labelled sets.

pub mod idx;
