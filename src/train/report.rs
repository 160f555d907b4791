//! The training report in the run folder: `report.csv` (one row per epoch) and `report.svg`
//! (training loss and validation errors against epochs), refreshed after every epoch.

use super::checkpoint::EpochRecord;
use crate::files::write_atomic;
use std::fmt::Write;
use std::path::Path;

pub fn write(run_dir: &Path, history: &[EpochRecord], _classes: usize) -> anyhow::Result<()> {
    let mut csv = String::from("epoch,train_loss,val_top1_err,val_top5_err,lr,seconds\n");
    for h in history {
        writeln!(
            csv,
            "{},{:.6},{:.6},{:.6},{},{:.2}",
            h.epoch, h.train_loss, h.val_top1_err, h.val_top5_err, h.lr, h.seconds
        )?;
    }
    write_atomic(&run_dir.join("report.csv"), csv.as_bytes())?;
    write_atomic(&run_dir.join("report.svg"), svg(history).as_bytes())
}

/// A two-panel line chart: training loss (left), validation top-1 and top-5 error (right).
pub fn svg(history: &[EpochRecord]) -> String {
    let (w, h, pad) = (900.0f64, 360.0f64, 50.0f64);
    let panel_w = (w - 3.0 * pad) / 2.0;
    let max_epoch = history.iter().map(|r| r.epoch).max().unwrap_or(1).max(1) as f64;
    let max_loss = history
        .iter()
        .map(|r| r.train_loss as f64)
        .fold(0.0f64, f64::max)
        .max(1e-6);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels = [
        (pad, "training loss", max_loss),
        (2.0 * pad + panel_w, "validation error", 1.0),
    ];
    for (x0, title, ymax) in panels {
        let _ = writeln!(
            out,
            r#"<rect x="{x0}" y="{pad}" width="{panel_w}" height="{}" fill="none" stroke="black"/>"#,
            h - 2.0 * pad
        );
        let _ = writeln!(out, r#"<text x="{x0}" y="{}">{title}</text>"#, pad - 10.0);
        let _ = writeln!(
            out,
            r#"<text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">epoch {max_epoch}</text>"#,
            h - pad + 15.0,
            x0 + panel_w,
            h - pad + 15.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{ymax:.3}</text>"#,
            x0 - 4.0,
            pad + 10.0
        );
    }
    let line = |values: Vec<(f64, f64)>, x0: f64, ymax: f64, colour: &str| {
        let pts: Vec<String> = values
            .iter()
            .map(|(e, v)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + e / max_epoch * panel_w,
                    h - pad - (v / ymax).clamp(0.0, 1.0) * (h - 2.0 * pad)
                )
            })
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        )
    };
    let epochs = |f: &dyn Fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        history.iter().map(|r| (r.epoch as f64, f(r))).collect()
    };
    let _ = writeln!(
        out,
        "{}",
        line(epochs(&|r| r.train_loss as f64), pad, max_loss, "black")
    );
    let x1 = 2.0 * pad + panel_w;
    let _ = writeln!(
        out,
        "{}",
        line(epochs(&|r| r.val_top1_err), x1, 1.0, "crimson")
    );
    let _ = writeln!(
        out,
        "{}",
        line(epochs(&|r| r.val_top5_err), x1, 1.0, "steelblue")
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" fill="crimson">top-1</text><text x="{}" y="{}" fill="steelblue">top-5</text>"#,
        x1 + 10.0,
        pad + 20.0,
        x1 + 60.0,
        pad + 20.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_a_row_per_epoch_and_a_line_per_curve() {
        let history: Vec<EpochRecord> = (1..=3)
            .map(|e| EpochRecord {
                epoch: e,
                train_loss: 2.0 / e as f32,
                val_top1_err: 0.5 / e as f64,
                val_top5_err: 0.1,
                lr: 0.01,
                seconds: 1.0,
                val_loss: Some(1.0 / e as f64),
                images_per_s: Some(100.0),
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("alexnet-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, &history, 10).unwrap();
        let csv = std::fs::read_to_string(dir.join("report.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4);
        assert!(csv
            .lines()
            .nth(3)
            .unwrap()
            .starts_with("3,0.666667,0.166667,0.100000,0.01,"));
        let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
