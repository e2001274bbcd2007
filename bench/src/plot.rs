//! Line charts as SVG (plotters' SVG backend: no fonts or system libraries needed), one
//! line per system, so that Tern and its peers sit on one chart.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// One line of a chart.
pub(crate) struct Series {
    /// The legend.
    pub(crate) label: String,
    /// The points, in x order.
    pub(crate) points: Vec<(f64, f64)>,
}

/// How the x axis is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XScale {
    /// Linear from 0.
    Linear,
    /// Logarithmic (for latencies spanning decades).
    Log,
}

/// Colours of the lines, in series order (Tern first).
const COLOURS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// Draws `series` into an SVG at `path`. Series without points are left out; nothing is
/// written when none has any.
pub(crate) fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    x_scale: XScale,
    series: &[Series],
) -> anyhow::Result<bool> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    if points().next().is_none() {
        return Ok(false);
    }
    let finite = |v: f64| v.is_finite();
    let x_max = points()
        .map(|p| p.0)
        .filter(|v| finite(*v))
        .fold(0.0, f64::max);
    let y_max = points()
        .map(|p| p.1)
        .filter(|v| finite(*v))
        .fold(0.0, f64::max);
    let y_range = 0.0..(y_max * 1.05).max(1e-9);
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        match x_scale {
            XScale::Linear => {
                let mut chart =
                    builder.build_cartesian_2d(0.0..(x_max * 1.02).max(1e-9), y_range)?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()?;
                for (i, s) in series.iter().enumerate() {
                    let colour = COLOURS[i % COLOURS.len()];
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().copied(),
                            colour.stroke_width(2),
                        ))?
                        .label(s.label.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()?;
            }
            XScale::Log => {
                let x_min = points()
                    .map(|p| p.0)
                    .filter(|v| finite(*v) && *v > 0.0)
                    .fold(f64::INFINITY, f64::min);
                let x_min = if x_min.is_finite() { x_min * 0.9 } else { 1.0 };
                let mut chart = builder.build_cartesian_2d(
                    (x_min..(x_max * 1.1).max(x_min * 10.0)).log_scale(),
                    y_range,
                )?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()?;
                for (i, s) in series.iter().enumerate() {
                    let colour = COLOURS[i % COLOURS.len()];
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().copied().filter(|p| p.0 > 0.0),
                            colour.stroke_width(2),
                        ))?
                        .label(s.label.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::LowerRight)
                    .draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("draw {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::{Series, XScale, line_chart};

    #[test]
    fn charts_hold_every_series_and_skip_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let series = [
            Series {
                label: "tern".to_owned(),
                points: vec![(0.0, 10.0), (1.0, 5.0), (2.0, 0.0)],
            },
            Series {
                label: "qemu-background".to_owned(),
                points: vec![(0.0, 10.0), (3.0, 0.0)],
            },
        ];
        assert!(line_chart(&path, "remaining", "s", "MiB", XScale::Linear, &series).unwrap());
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("tern") && svg.contains("qemu-background"));
        assert!(line_chart(&path, "latency", "µs", "fraction", XScale::Log, &series).unwrap());
        let empty = dir.path().join("empty.svg");
        let none = [Series {
            label: "x".to_owned(),
            points: Vec::new(),
        }];
        assert!(!line_chart(&empty, "t", "x", "y", XScale::Linear, &none).unwrap());
        assert!(!empty.exists());
    }
}
