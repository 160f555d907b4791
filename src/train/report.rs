//! The training report in the run folder, refreshed after every epoch: `report.csv` (one row
//! per epoch) and the same figures drawn as `report.svg` and `report.png`: loss (log scale),
//! validation error against chance, and throughput per epoch, learning-rate drops marked.

use super::checkpoint::EpochRecord;
use crate::files::write_atomic;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write;
use std::path::Path;

/// The charts' size in pixels: three panels stacked, sharing the epoch axis.
pub const SIZE: (u32, u32) = (1000, 1140);

pub fn write(run_dir: &Path, history: &[EpochRecord], classes: usize) -> anyhow::Result<()> {
    write_atomic(&run_dir.join("report.csv"), csv(history).as_bytes())?;
    write_atomic(
        &run_dir.join("report.svg"),
        svg(history, classes)?.as_bytes(),
    )?;
    write_atomic(&run_dir.join("report.png"), &png(history, classes)?)
}

fn csv(history: &[EpochRecord]) -> String {
    let mut csv = String::from(
        "epoch,train_loss,val_top1_err,val_top5_err,lr,seconds,val_loss,images_per_s\n",
    );
    for h in history {
        let _ = write!(
            csv,
            "{},{:.6},{:.6},{:.6},{},{:.2},",
            h.epoch, h.train_loss, h.val_top1_err, h.val_top5_err, h.lr, h.seconds
        );
        if let Some(l) = h.val_loss {
            let _ = write!(csv, "{l:.6}");
        }
        csv.push(',');
        if let Some(r) = h.images_per_s {
            let _ = write!(csv, "{r:.1}");
        }
        csv.push('\n');
    }
    csv
}

fn svg(history: &[EpochRecord], classes: usize) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        draw(&root, history, classes).map_err(|e| anyhow::anyhow!("drawing report.svg: {e}"))?;
    }
    Ok(out)
}

fn png(history: &[EpochRecord], classes: usize) -> anyhow::Result<Vec<u8>> {
    use image::ImageEncoder;
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, history, classes).map_err(|e| anyhow::anyhow!("drawing report.png: {e}"))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(png)
}

/// The one face every text is set in, embedded so that drawing needs no system font.
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const SANS: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A font that fails to parse shows up as the drawing's error (font unavailable).
        let _ = plotters::style::register_font(SANS, FontStyle::Normal, FONT);
    });
}

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(255, 127, 14);
const TOP1: RGBColor = RGBColor(214, 39, 40);
const TOP5: RGBColor = RGBColor(31, 119, 180);
const RATE: RGBColor = RGBColor(44, 160, 44);
const GREY: RGBColor = RGBColor(90, 90, 90);

// The panel's frame: the left and right margins are the same in every panel so that their
// epoch axes line up.
const TITLE_H: i32 = 38;
const LR_ROW_H: i32 = 19;
const MARGIN_LEFT: i32 = 10;
const MARGIN_RIGHT: i32 = 28;
const Y_LABELS_W: i32 = 74;
const X_LABELS_H: i32 = 44;
const MARGIN_BOTTOM: i32 = 6;

/// A line of values per epoch; `None` (no value, or one a log scale cannot show) breaks it.
struct Curve {
    label: &'static str,
    colour: RGBColor,
    points: Vec<(u64, Option<f64>)>,
}

/// A chance level: a dashed horizontal line, labelled.
struct Chance {
    name: &'static str,
    value: f64,
    colour: RGBColor,
}

struct Panel {
    title: &'static str,
    /// The last epoch's figures, beside the title.
    summary: String,
    y_desc: &'static str,
    log: bool,
    /// The y range in data units (positive where `log`).
    y: (f64, f64),
    curves: Vec<Curve>,
    chance: Vec<Chance>,
}

type Failed<DB> = DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    history: &[EpochRecord],
    classes: usize,
) -> Result<(), Failed<DB>> {
    register_font();
    root.fill(&WHITE)?;
    // Epochs count from 1; one epoch to either side keeps the end markers clear of the frame.
    let first = history.iter().map(|r| r.epoch).min().unwrap_or(1);
    let last = history.iter().map(|r| r.epoch).max().unwrap_or(0);
    let x = (first.saturating_sub(1), last.max(first) + 1);
    let drops: Vec<(u64, f32)> = history
        .windows(2)
        .filter(|w| w[1].lr < w[0].lr)
        .map(|w| (w[1].epoch, w[1].lr))
        .collect();
    let lr_rows = lr_label_rows(root, &drops, x)?;
    let panels = [
        loss_panel(history),
        error_panel(history, classes),
        rate_panel(history),
    ];
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
        draw_panel(area, panel, x, &drops, &lr_rows)?;
    }
    root.present()
}

fn loss_panel(history: &[EpochRecord]) -> Panel {
    let train = |r: &EpochRecord| Some(r.train_loss as f64);
    let val = |r: &EpochRecord| r.val_loss;
    let curves = vec![
        curve("training loss", TRAIN, history, train),
        curve("validation loss", VAL, history, val),
    ];
    let positive = curves
        .iter()
        .flat_map(|c| c.points.iter().filter_map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let y = if hi > 0.0 {
        // At least a factor of 4 top to bottom, for the ticks to have somewhere to go.
        let mid = (lo * hi).sqrt();
        let half = (hi / lo).sqrt().max(2.0) * 1.15;
        (mid / half, mid * half)
    } else {
        (0.1, 10.0)
    };
    let summary = history
        .last()
        .map(|r| {
            let mut s = format!(
                "epoch {}: training {}",
                r.epoch,
                digits4(r.train_loss as f64)
            );
            if let Some(v) = r.val_loss {
                let _ = write!(s, ", validation {}", digits4(v));
            }
            s
        })
        .unwrap_or_default();
    Panel {
        title: "Loss",
        summary,
        y_desc: "cross-entropy (log scale)",
        log: true,
        y,
        curves,
        chance: Vec::new(),
    }
}

fn error_panel(history: &[EpochRecord], classes: usize) -> Panel {
    let mut chance = Vec::new();
    if classes >= 2 {
        let value = 1.0 - 1.0 / classes as f64;
        chance.push(Chance {
            name: "top-1",
            value,
            colour: TOP1,
        });
    }
    if classes > 5 {
        let value = 1.0 - 5.0 / classes as f64;
        chance.push(Chance {
            name: "top-5",
            value,
            colour: TOP5,
        });
    }
    let summary = history
        .last()
        .map(|r| {
            format!(
                "epoch {}: top-1 {:.3}, top-5 {:.3}",
                r.epoch, r.val_top1_err, r.val_top5_err
            )
        })
        .unwrap_or_default();
    Panel {
        title: "Validation error",
        summary,
        y_desc: "error",
        log: false,
        y: (0.0, 1.0),
        curves: vec![
            curve("top-1 error", TOP1, history, |r| Some(r.val_top1_err)),
            curve("top-5 error", TOP5, history, |r| Some(r.val_top5_err)),
        ],
        chance,
    }
}

fn rate_panel(history: &[EpochRecord]) -> Panel {
    let rate = curve("training images/s", RATE, history, |r| r.images_per_s);
    let hi = rate
        .points
        .iter()
        .filter_map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let summary = match history.last() {
        Some(EpochRecord {
            epoch,
            images_per_s: Some(r),
            ..
        }) => {
            format!("epoch {epoch}: {r:.0} images/s")
        }
        _ => String::new(),
    };
    Panel {
        title: "Throughput",
        summary,
        y_desc: "images/s",
        log: false,
        // Room above the curve for the legend.
        y: (0.0, if hi > 0.0 { hi * 1.3 } else { 1.0 }),
        curves: vec![rate],
        chance: Vec::new(),
    }
}

fn curve(
    label: &'static str,
    colour: RGBColor,
    history: &[EpochRecord],
    value: impl Fn(&EpochRecord) -> Option<f64>,
) -> Curve {
    let points = history.iter().map(|r| (r.epoch, value(r))).collect();
    Curve {
        label,
        colour,
        points,
    }
}

fn style(size: u32) -> TextStyle<'static> {
    (SANS, size).into_font().color(&BLACK)
}

/// `v` to four significant digits, as short as it reads: a loss near 0 keeps its digits.
fn digits4(v: f64) -> String {
    let decimals = (3.0 - v.abs().log10().floor()).clamp(0.0, 12.0) as i32;
    crate::log_fields::rounded(v, decimals).to_string()
}

/// `lr 0.001`, to three digits: a rate divided in f32 reads 0.0009999999 in full.
fn lr_text(lr: f32) -> String {
    let lr = lr as f64;
    let decimals = (2.0 - lr.abs().log10().floor()).clamp(0.0, 12.0) as i32;
    format!("lr {}", crate::log_fields::rounded(lr, decimals))
}

/// The row (from the bottom up) of each drop's label over the panels, so that labels of drops
/// close together do not overlap; and how many rows there are.
fn lr_label_rows<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    drops: &[(u64, f32)],
    x: (u64, u64),
) -> Result<(Vec<usize>, usize), Failed<DB>> {
    let (w, _) = root.dim_in_pixel();
    let left = (MARGIN_LEFT + Y_LABELS_W) as f64;
    let right = w as f64 - MARGIN_RIGHT as f64;
    let mut row_ends: Vec<f64> = Vec::new();
    let mut rows = Vec::new();
    for &(epoch, lr) in drops {
        let (tw, _) = root.estimate_text_size(&lr_text(lr), &style(15))?;
        let centre = left + (epoch - x.0) as f64 / (x.1 - x.0) as f64 * (right - left);
        let (start, end) = (centre - tw as f64 / 2.0, centre + tw as f64 / 2.0);
        let row = match row_ends.iter().position(|&e| e + 8.0 <= start) {
            Some(r) => r,
            None => {
                row_ends.push(f64::NEG_INFINITY);
                row_ends.len() - 1
            }
        };
        row_ends[row] = end;
        rows.push(row);
    }
    Ok((rows, row_ends.len()))
}

/// A box in pixels: top-left and bottom-right corners.
type Boxed = ((i32, i32), (i32, i32));

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
    x: (u64, u64),
    drops: &[(u64, f32)],
    (lr_rows, lr_row_count): &(Vec<usize>, usize),
) -> Result<(), Failed<DB>> {
    let to_y = |v: f64| if p.log { v.log10() } else { v };
    let from_y = |v: f64| if p.log { 10f64.powf(v) } else { v };
    let y = to_y(p.y.0)..to_y(p.y.1);
    let top = TITLE_H + LR_ROW_H * *lr_row_count as i32 + if drops.is_empty() { 0 } else { 4 };
    let plot_h = area.dim_in_pixel().1 as i32 - top - X_LABELS_H - MARGIN_BOTTOM;
    let (ticks, minor) = if p.log {
        log_ticks(p.y, plot_h)
    } else {
        (RangedCoordf64::from(y.clone()).key_points(8), Vec::new())
    };
    let decimals = tick_decimals(&ticks);
    let y_coord = Ticked {
        linear: y.clone().into(),
        major: ticks,
        minor,
    };

    let title = Text::new(p.title, (MARGIN_LEFT + 4, 8), style(24));
    area.draw(&title)?;
    let (tw, _) = area.estimate_text_size(p.title, &style(24))?;
    area.draw(&Text::new(
        p.summary.as_str(),
        (MARGIN_LEFT + 4 + tw as i32 + 14, 13),
        style(17).color(&GREY),
    ))?;

    let mut chart = ChartBuilder::on(area)
        .margin_top(top)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_bottom(MARGIN_BOTTOM)
        .x_label_area_size(X_LABELS_H)
        .y_label_area_size(Y_LABELS_W)
        .build_cartesian_2d(x.0..x.1, y_coord)?;
    // Log ticks each as short as it reads (0.5, 1, 2); linear ones to the same decimals.
    let y_label = |v: &f64| match p.log {
        true => crate::log_fields::rounded(from_y(*v), 6).to_string(),
        false => format!("{:.*}", decimals, v),
    };
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(p.y_desc)
        .x_labels(16)
        .y_label_formatter(&y_label)
        .label_style(style(15))
        .axis_desc_style(style(16))
        .bold_line_style(BLACK.mix(0.14))
        .light_line_style(BLACK.mix(0.05))
        .draw()?;

    let base = area.get_base_pixel();
    let (px, py) = chart.plotting_area().get_pixel_range();
    let plot_box: Boxed = ((px.start, py.start), (px.end, py.end));
    // What the legend should not cover, in pixels of the panel: curves, lines, labels.
    let mut busy = Occupancy::new(plot_box);

    for (&(epoch, lr), &row) in drops.iter().zip(lr_rows) {
        let line = [(epoch, y.start), (epoch, y.end)];
        chart.draw_series(DashedLineSeries::new(
            line,
            6,
            4,
            GREY.mix(0.8).stroke_width(1),
        ))?;
        let at = chart.backend_coord(&(epoch, y.end));
        busy.mark_line(chart.backend_coord(&line[0]), at, 1);
        let label_y = py.start - base.1 - 3 - LR_ROW_H * row as i32;
        area.draw(&Text::new(
            lr_text(lr),
            (at.0 - base.0, label_y),
            style(15)
                .color(&GREY)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
    }

    for c in &p.chance {
        let line = [(x.0, to_y(c.value)), (x.1, to_y(c.value))];
        let colour = c.colour.mix(0.6);
        chart.draw_series(DashedLineSeries::new(line, 8, 5, colour.stroke_width(1)))?;
        busy.mark_line(
            chart.backend_coord(&line[0]),
            chart.backend_coord(&line[1]),
            1,
        );
    }

    let marker = if x.1 - x.0 > 60 { 2 } else { 3 };
    let mut labelled = Vec::new();
    for c in &p.curves {
        let shown = |v: &f64| v.is_finite() && (!p.log || *v > 0.0);
        let pts: Vec<Option<(u64, f64)>> = c
            .points
            .iter()
            .map(|&(e, v)| v.filter(shown).map(|v| (e, to_y(v))))
            .collect();
        for run in pts.split(Option::is_none) {
            let run: Vec<(u64, f64)> = run.iter().flatten().copied().collect();
            if run.len() > 1 {
                chart.draw_series(LineSeries::new(run.clone(), c.colour.stroke_width(2)))?;
            }
            for w in run.windows(2) {
                busy.mark_line(chart.backend_coord(&w[0]), chart.backend_coord(&w[1]), 4);
            }
        }
        let present: Vec<(u64, f64)> = pts.iter().flatten().copied().collect();
        if present.is_empty() {
            continue;
        }
        labelled.push(c.label);
        for pt in &present {
            let at = chart.backend_coord(pt);
            busy.mark_line(at, at, 4);
        }
        let colour = c.colour;
        chart
            .draw_series(
                present
                    .iter()
                    .map(|&pt| Circle::new(pt, marker, colour.filled())),
            )?
            .label(c.label)
            .legend(move |(lx, ly)| {
                EmptyElement::at((lx, ly))
                    + PathElement::new(vec![(0, 0), (22, 0)], colour.stroke_width(2))
                    + Circle::new((11, 0), 3, colour.filled())
            });
    }

    // The chance labels, at the right end (where the errors are lowest), under their lines;
    // lines too close together for two labels share one.
    let mut labels: Vec<(i32, String)> = Vec::new();
    for c in &p.chance {
        let at = chart.backend_coord(&(x.1, to_y(c.value))).1 - base.1;
        let text = format!("{} {:.3}", c.name, c.value);
        match labels.last_mut() {
            Some((prev, joined)) if (at - *prev).abs() < 20 => {
                *prev = (*prev).max(at);
                let _ = write!(joined, ", {text}");
            }
            _ => labels.push((at, format!("chance {text}"))),
        }
    }
    for (at, text) in &labels {
        let (w, h) = area.estimate_text_size(text, &style(15))?;
        let right = px.end - base.0 - 8;
        let (w, h) = (w as i32, h as i32);
        let rect = ((right - w - 4, at + 3), (right + 4, at + 5 + h));
        area.draw(&Rectangle::new([rect.0, rect.1], WHITE.mix(0.85).filled()))?;
        area.draw(&Text::new(
            text.as_str(),
            (right, at + 4),
            style(15).color(&GREY).pos(Pos::new(HPos::Right, VPos::Top)),
        ))?;
        let shift = |(x, y): (i32, i32)| (x + base.0, y + base.1);
        busy.mark_box((shift(rect.0), shift(rect.1)), 8);
    }

    if labelled.is_empty() {
        let note = if p.curves.iter().all(|c| c.points.is_empty()) {
            "no epochs yet"
        } else {
            "not recorded"
        };
        let centre = (
            (px.start + px.end) / 2 - base.0,
            (py.start + py.end) / 2 - base.1,
        );
        area.draw(&Text::new(
            note,
            centre,
            style(18)
                .color(&GREY)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        return Ok(());
    }

    let legend_font = style(16);
    let mut text = MultiLineText::<_, &str>::new((0, 0), &legend_font);
    for label in labelled {
        text.push_line(label);
    }
    // The titles above were set in the same font, so it measures.
    let (lw, lh) = text.estimate_dimension().unwrap_or((160, 40));
    let (legend_margin, legend_line) = (8, 30);
    let size = (lw + legend_line + 2 * legend_margin, lh + 2 * legend_margin);
    let (lx, ly) = busy.quietest(size);
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::Coordinate(lx, ly))
        .margin(legend_margin)
        .legend_area_size(legend_line)
        .label_font(legend_font.clone())
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
}

/// A linear axis with the ticks given: those plotters picks for a log axis can be none at all
/// over less than a decade. (Its own `WithKeyPoints` leaves f64 without a label format.)
struct Ticked {
    linear: RangedCoordf64,
    major: Vec<f64>,
    minor: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.major.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }
}

/// Log-scale ticks over `range` for an axis `px` pixels long, in log10 units: the roundest
/// values first (powers of ten, then 2 and 5 times them, then 3, then the other digits), each
/// kept where it is clear of those kept before; and the minor grid (every digit).
fn log_ticks(range: (f64, f64), px: i32) -> (Vec<f64>, Vec<f64>) {
    let (lo, hi) = (range.0.log10(), range.1.log10());
    let gap = (hi - lo) * 28.0 / px.max(1) as f64;
    let steps = |mantissas: &[f64]| -> Vec<f64> {
        let mut v = Vec::new();
        for e in (lo.floor() as i32)..=(hi.ceil() as i32) {
            for m in mantissas {
                let t = (m * 10f64.powi(e)).log10();
                if t >= lo - 1e-9 && t <= hi + 1e-9 {
                    v.push(t);
                }
            }
        }
        v
    };
    let mut ticks: Vec<f64> = Vec::new();
    for tier in [&[1.0][..], &[2.0, 5.0], &[3.0], &[4.0, 6.0, 7.0, 8.0, 9.0]] {
        for t in steps(tier) {
            if ticks.iter().all(|k| (k - t).abs() >= gap) {
                ticks.push(t);
            }
        }
    }
    ticks.sort_by(f64::total_cmp);
    (ticks, steps(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]))
}

/// The fewest decimals that write every tick exactly.
fn tick_decimals(ticks: &[f64]) -> usize {
    (0..6)
        .find(|&d| {
            let scale = 10f64.powi(d as i32);
            ticks
                .iter()
                .all(|t| ((t * scale).round() - t * scale).abs() < 1e-6)
        })
        .unwrap_or(6)
}

/// A coarse map of what is drawn in a plotting area, to put the legend where it covers least.
struct Occupancy {
    /// The plotting area's top-left corner, in pixels of the backend (as all points here).
    origin: (i32, i32),
    cols: usize,
    rows: usize,
    weight: Vec<u32>,
}

const CELL: i32 = 4;

impl Occupancy {
    fn new(((x0, y0), (x1, y1)): Boxed) -> Self {
        let cols = ((x1 - x0) / CELL).max(1) as usize;
        let rows = ((y1 - y0) / CELL).max(1) as usize;
        Occupancy {
            origin: (x0, y0),
            cols,
            rows,
            weight: vec![0; cols * rows],
        }
    }

    fn cell(&self, (x, y): (i32, i32)) -> (i32, i32) {
        (
            (x - self.origin.0).div_euclid(CELL),
            (y - self.origin.1).div_euclid(CELL),
        )
    }

    fn mark(&mut self, (c, r): (i32, i32), w: u32) {
        if c >= 0 && r >= 0 && (c as usize) < self.cols && (r as usize) < self.rows {
            self.weight[r as usize * self.cols + c as usize] += w;
        }
    }

    /// Each cell a segment crosses, once.
    fn mark_line(&mut self, a: (i32, i32), b: (i32, i32), w: u32) {
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) / 2).max(1);
        let mut last = None;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let p = (
                a.0 + (t * (b.0 - a.0) as f64).round() as i32,
                a.1 + (t * (b.1 - a.1) as f64).round() as i32,
            );
            let cell = self.cell(p);
            if last != Some(cell) {
                last = Some(cell);
                self.mark(cell, w);
            }
        }
    }

    fn mark_box(&mut self, (a, b): Boxed, w: u32) {
        let ((c0, r0), (c1, r1)) = (self.cell(a), self.cell(b));
        for r in r0..=r1 {
            for c in c0..=c1 {
                self.mark((c, r), w);
            }
        }
    }

    /// The top-left corner (relative to the plotting area) of the `size` box that covers the
    /// least, the one nearer a corner among equals.
    fn quietest(&self, size: (i32, i32)) -> (i32, i32) {
        // Sums over every rectangle of cells from one table of sums over their top-left ones.
        let (cols, rows) = (self.cols, self.rows);
        let mut sum = vec![0u64; (cols + 1) * (rows + 1)];
        for r in 0..rows {
            for c in 0..cols {
                sum[(r + 1) * (cols + 1) + c + 1] = self.weight[r * cols + c] as u64
                    + sum[r * (cols + 1) + c + 1]
                    + sum[(r + 1) * (cols + 1) + c]
                    - sum[r * (cols + 1) + c];
            }
        }
        let cover = |c0: usize, r0: usize, c1: usize, r1: usize| {
            let (c1, r1) = (c1.min(cols), r1.min(rows));
            sum[r1 * (cols + 1) + c1] + sum[r0 * (cols + 1) + c0]
                - sum[r0 * (cols + 1) + c1]
                - sum[r1 * (cols + 1) + c0]
        };
        let (w, h) = (cols as i32 * CELL, rows as i32 * CELL);
        let inset = 6;
        let (x_max, y_max) = (
            (w - size.0 - inset).max(inset),
            (h - size.1 - inset).max(inset),
        );
        let mut best = ((u64::MAX, i32::MAX), (inset, inset));
        for x in (inset..=x_max).step_by(CELL as usize) {
            for y in (inset..=y_max).step_by(CELL as usize) {
                let (c0, r0) = ((x / CELL) as usize, (y / CELL) as usize);
                let (c1, r1) = (
                    ((x + size.0) / CELL + 1) as usize,
                    ((y + size.1) / CELL + 1) as usize,
                );
                let covered = cover(c0.min(cols), r0.min(rows), c1, r1);
                let to_corner = (x - inset).min(x_max - x) + (y - inset).min(y_max - y);
                if (covered, to_corner) < best.0 {
                    best = ((covered, to_corner), (x, y));
                }
            }
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `epochs` epochs of a run that learns, its learning rate divided by 10 at each of
    /// `drops`; the first two epochs without validation loss or throughput (as if from an
    /// older checkpoint).
    fn history(epochs: u64, drops: &[u64]) -> Vec<EpochRecord> {
        let mut lr = 0.01f32;
        (1..=epochs)
            .map(|e| {
                if drops.contains(&e) {
                    lr /= 10.0;
                }
                let t = e as f64;
                let steps = drops.iter().filter(|&&d| d <= e).count() as f64;
                let loss = 1.2 + 5.7 * (-t / 6.0).exp() - 0.25 * steps;
                EpochRecord {
                    epoch: e,
                    train_loss: loss as f32,
                    val_top1_err: 0.4 + 0.59 * (-t / 7.0).exp() - 0.04 * steps,
                    val_top5_err: 0.18 + 0.79 * (-t / 6.0).exp() - 0.03 * steps,
                    lr,
                    seconds: 600.0,
                    val_loss: (e > 2).then_some(loss + 0.15 + 0.01 * t),
                    images_per_s: (e > 2).then_some(1500.0 + 40.0 * (t * 1.7).sin()),
                }
            })
            .collect()
    }

    fn written(name: &str, history: &[EpochRecord], classes: usize) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("alexnet-report-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, history, classes).unwrap();
        dir
    }

    /// The texts of the chart, each as drawn.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .map(|t| {
                let inner = &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()];
                inner.trim()
            })
            .collect()
    }

    /// Every tag closed, in order: enough of XML to say the file is not cut short or garbled.
    fn assert_balanced(svg: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').expect("a tag left open") + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name = |t: &str| t.split_whitespace().next().unwrap_or("").to_string();
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(open.pop().map(name), Some(name(closing)), "{svg}");
            } else {
                open.push(tag);
            }
        }
        assert!(open.is_empty(), "unclosed {open:?}");
    }

    #[test]
    fn the_csv_has_a_row_per_epoch_and_leaves_what_was_not_recorded_empty() {
        let h = history(3, &[]);
        let csv = csv(&h);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "epoch,train_loss,val_top1_err,val_top5_err,lr,seconds,val_loss,images_per_s"
        );
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("1,"), "{csv}");
        assert!(lines[1].ends_with(",0.01,600.00,,"), "{csv}");
        let third: Vec<&str> = lines[3].split(',').collect();
        assert_eq!(third.len(), 8);
        assert_eq!(third[6], format!("{:.6}", h[2].val_loss.unwrap()));
        assert_eq!(third[7], format!("{:.1}", h[2].images_per_s.unwrap()));
    }

    #[test]
    fn the_report_is_written_as_csv_svg_and_png() {
        let dir = written("files", &history(30, &[11, 21]), 1000);
        let csv = std::fs::read_to_string(dir.join("report.csv")).unwrap();
        assert_eq!(csv.lines().count(), 31);

        let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_balanced(&svg);
        let texts = texts(&svg);
        for text in [
            // Titles, axes, legends.
            "Loss",
            "Validation error",
            "Throughput",
            "epoch",
            "cross-entropy (log scale)",
            "error",
            "images/s",
            "training loss",
            "validation loss",
            "top-1 error",
            "top-5 error",
            "training images/s",
            // 1000 classes put both chance levels close together: one label.
            "chance top-1 0.999, top-5 0.995",
        ] {
            assert!(texts.contains(&text), "{text} missing from {texts:?}");
        }

        let png = std::fs::read(dir.join("report.png")).unwrap();
        let png = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), SIZE);
        let colours: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 100, "{} colours", colours.len());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn each_drop_of_the_learning_rate_is_marked_on_every_panel() {
        let svg = svg(&history(30, &[11, 21]), 10).unwrap();
        let texts = texts(&svg);
        let count = |t: &str| texts.iter().filter(|&&x| x == t).count();
        assert_eq!(count("lr 0.001"), 3, "{texts:?}");
        assert_eq!(count("lr 0.0001"), 3);
        // The rate the run starts with is no drop.
        assert_eq!(count("lr 0.01"), 0);
        // 10 classes put the chance levels apart: a label each.
        assert_eq!(count("chance top-1 0.900"), 1, "{texts:?}");
        assert_eq!(count("chance top-5 0.500"), 1);
    }

    #[test]
    fn log_ticks_are_round_numbers_apart_from_each_other() {
        let values = |range, px| -> Vec<f64> {
            let (ticks, _) = log_ticks(range, px);
            ticks
                .iter()
                .map(|t| crate::log_fields::rounded(10f64.powf(*t), 9))
                .collect()
        };
        // Under a decade: the digits that fit (0.8 and 0.9 would crowd 0.7 and 1).
        assert_eq!(values((0.66, 3.3), 290), [0.7, 1.0, 2.0, 3.0]);
        // Many decades: powers of ten only.
        let decades: Vec<f64> = (-7..=1).map(|e| 10f64.powi(e)).collect();
        assert_eq!(values((1e-7, 20.0), 290), decades);
    }

    #[test]
    fn no_epoch_one_epoch_and_ninety_epochs_draw() {
        for (h, classes) in [
            (history(0, &[]), 1000),
            (history(1, &[]), 1000),
            (history(3, &[2]), 2),
            (history(90, &[30, 60, 80, 81]), 1000),
        ] {
            let svg = svg(&h, classes).unwrap();
            assert_balanced(&svg);
            let png = image::load_from_memory(&png(&h, classes).unwrap()).unwrap();
            assert_eq!((png.width(), png.height()), SIZE);
        }
        let empty = svg(&[], 10).unwrap();
        assert_eq!(
            texts(&empty)
                .iter()
                .filter(|&&t| t == "no epochs yet")
                .count(),
            3
        );
        // The one epoch has neither validation loss nor throughput, but its markers show.
        let one = svg(&history(1, &[]), 10).unwrap();
        assert!(one.contains("<circle"));
        assert!(texts(&one).contains(&"not recorded"));
        let dir = written("empty", &[], 10);
        assert!(dir.join("report.png").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
