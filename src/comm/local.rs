//! Both columns in one process: the exchange is a copy in memory.

use super::ColumnExchange;
use super::COLUMNS;
use crate::backend::Backend;

/// The exchange of a process that holds both columns.
#[derive(Debug)]
pub struct LocalExchange {
    columns: Vec<usize>,
}

impl Default for LocalExchange {
    fn default() -> Self {
        LocalExchange {
            columns: (0..COLUMNS).collect(),
        }
    }
}

impl<B: Backend> ColumnExchange<B> for LocalExchange {
    fn local_columns(&self) -> &[usize] {
        &self.columns
    }

    fn finish_all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
        out: &mut B::Buf,
    ) -> anyhow::Result<Vec<B::Buf>> {
        anyhow::ensure!(
            local.len() == COLUMNS,
            "a local exchange needs all {COLUMNS} columns, got {}",
            local.len()
        );
        backend.concat_rows(rows, local, &[width; COLUMNS], out);
        Ok(Vec::new())
    }

    fn finish_reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
        out: &mut [&mut B::Buf],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            full.len() == COLUMNS && out.len() == COLUMNS,
            "a local exchange needs all {COLUMNS} columns"
        );
        for (c, dst) in out.iter_mut().enumerate() {
            for (i, src) in full.iter().enumerate() {
                backend.slice_rows(rows, COLUMNS * width, c * width, width, src, dst, i > 0);
            }
        }
        Ok(())
    }
}
