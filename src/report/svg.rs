//! Inline SVG bar charts with interval whiskers.

use std::fmt::Write as _;

use super::escape;

/// One bar: a value with its interval.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
    /// Drawn in the guide CLIP's colour (else the held-out probe CLIP's).
    pub guide: bool,
}

/// A horizontal bar chart centred on zero, one row per bar, whiskers for the interval.
pub fn bar_chart(bars: &[Bar]) -> String {
    let (row, left, width) = (22.0, 320.0, 360.0);
    let extent = bars
        .iter()
        .flat_map(|b| [b.value.abs(), b.low.abs(), b.high.abs()])
        .filter(|v| v.is_finite())
        .fold(0.05f64, f64::max);
    let x = |v: f64| left + width / 2.0 + v / extent * (width / 2.0);
    let height = row * bars.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg width=\"{}\" height=\"{height}\" role=\"img\" font-size=\"12\" font-family=\"sans-serif\">",
        left + width + 20.0
    );
    for (i, b) in bars.iter().enumerate() {
        let y = 10.0 + i as f64 * row;
        let (x0, x1) = (x(0.0).min(x(b.value)), x(0.0).max(x(b.value)));
        let colour = if b.guide { "#d98c3f" } else { "#3f7fd9" };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"><title>{:.4} [{:.4}, {:.4}]</title></rect><line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>",
            left - 6.0,
            y + 12.0,
            escape(&b.label),
            (x1 - x0).max(0.5),
            row - 6.0,
            b.value,
            b.low,
            b.high,
            x(b.low),
            x(b.high),
            y + (row - 6.0) / 2.0,
            y + (row - 6.0) / 2.0
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"5\" y2=\"{1:.1}\" stroke=\"#888\"/><text x=\"{2:.1}\" y=\"{3:.1}\">-{4:.2}</text><text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">0</text><text x=\"{5:.1}\" y=\"{3:.1}\" text-anchor=\"end\">+{4:.2}</text>\n</svg>",
        x(0.0),
        height - 18.0,
        left,
        height - 4.0,
        extent,
        left + width
    );
    s
}
