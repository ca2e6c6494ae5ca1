//! Samples per target and repetition, their medians and ranges, and the
//! Markdown table.

/// Columns of the table, in order.
pub const DIRECT: usize = 0;
pub const PORTCULLIS: usize = 1;
pub const HAPROXY: usize = 2;
pub const SPLICE: usize = 3;
pub const TARGETS: usize = 4;
pub const NAMES: [&str; TARGETS] = ["direct", "portcullis", "HAProxy", "HAProxy splice"];

/// Median, minimum and maximum of some repetitions.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    /// `median (min–max)`, or the value alone for one sample.
    pub fn show(&self) -> String {
        if self.n == 1 || fmt(self.min) == fmt(self.max) {
            fmt(self.median)
        } else {
            format!("{} ({}–{})", fmt(self.median), fmt(self.min), fmt(self.max))
        }
    }
}

/// Three significant digits or so, without exponent notation.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let rounded = v.round() as i64;
        // Thousands separated by commas, for readability.
        let digits = rounded.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if rounded < 0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One measured value per target per repetition; missing where a target
/// does not apply, is not installed, or its run failed.
#[derive(Debug, Clone, Default)]
pub struct Series {
    reps: Vec<[Option<f64>; TARGETS]>,
}

impl Series {
    pub fn push(&mut self, rep: usize, target: usize, value: f64) {
        while self.reps.len() <= rep {
            self.reps.push([None; TARGETS]);
        }
        self.reps[rep][target] = Some(value);
    }

    pub fn values(&self, target: usize) -> Vec<f64> {
        self.reps.iter().filter_map(|r| r[target]).collect()
    }

    pub fn summary(&self, target: usize) -> Option<Summary> {
        Summary::of(&self.values(target))
    }

    /// `a / b`, repetition by repetition (runs of one repetition are
    /// adjacent in time, so drift cancels), summarised.
    pub fn ratio(&self, a: usize, b: usize) -> Option<Summary> {
        let v: Vec<f64> = self.reps.iter().filter_map(|r| Some(r[a]? / r[b]?)).collect();
        Summary::of(&v)
    }

    /// `a - b`, repetition by repetition, summarised.
    pub fn diff(&self, a: usize, b: usize) -> Option<Summary> {
        let v: Vec<f64> = self.reps.iter().filter_map(|r| Some(r[a]? - r[b]?)).collect();
        Summary::of(&v)
    }

    /// The table cells, one per target; `absent` where there is no value.
    pub fn cells(&self, absent: &[&str; TARGETS]) -> [String; TARGETS] {
        std::array::from_fn(|t| match self.summary(t) {
            Some(s) => s.show(),
            None => absent[t].to_string(),
        })
    }
}

/// Whether a row meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// No target, or nothing to judge.
    Unjudged,
}

impl Verdict {
    pub fn from(ok: Option<bool>) -> Verdict {
        match ok {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::Missed,
            None => Verdict::Unjudged,
        }
    }

    /// Met only when every part is met.
    pub fn all(parts: &[Option<bool>]) -> Verdict {
        if parts.contains(&Some(false)) {
            Verdict::Missed
        } else if parts.iter().any(|p| p.is_some()) {
            Verdict::Met
        } else {
            Verdict::Unjudged
        }
    }

    fn mark(self) -> &'static str {
        match self {
            Verdict::Met => "✅",
            Verdict::Missed => "❌",
            Verdict::Unjudged => "",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub cells: [String; TARGETS],
    pub relative: String,
    pub target: String,
    pub verdict: Verdict,
}

/// A latency row: portcullis's p50 / p99 of `samples` (µs) against
/// `p99 < limit_us`, with `extra` after the sample count; a p99 over a
/// second is a gross regression, added to `failures`.
pub fn latency_row(what: &str, samples: &[u64], limit_us: u64, extra: &str, failures: &mut Vec<String>) -> Row {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let (p50, p99) = (percentile(&v, 50.0), percentile(&v, 99.0));
    let mut cells: [String; TARGETS] = Default::default();
    if !v.is_empty() {
        cells[PORTCULLIS] = format!("{p50} / {p99}");
    }
    if p99 > 1_000_000 {
        failures.push(format!("gross regression: {what}: p99 {p99} µs (ceiling 1 s)"));
    }
    Row {
        what: what.into(),
        cells,
        relative: if v.is_empty() {
            String::new()
        } else {
            format!("{} samples{extra}", v.len())
        },
        target: format!("p99 < {limit_us} µs"),
        verdict: Verdict::from((!v.is_empty()).then_some(p99 < limit_us)),
    }
}

/// The Markdown table: a header list, the rows, then notes.
pub fn render(title: &str, header: &[String], rows: &[Row], notes: &[String]) -> String {
    let mut out = format!("## {title}\n\n");
    for h in header {
        out.push_str(&format!("- {h}\n"));
    }
    out.push('\n');
    out.push_str("| measurement | ");
    out.push_str(&NAMES.join(" | "));
    out.push_str(" | portcullis relative | target | |\n");
    out.push_str("|---|");
    out.push_str(&"---:|".repeat(TARGETS));
    out.push_str("---|---|:-:|\n");
    for r in rows {
        let cells: Vec<&str> = r
            .cells
            .iter()
            .map(|c| if c.is_empty() { "–" } else { c.as_str() })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.what,
            cells.join(" | "),
            if r.relative.is_empty() { "–" } else { &r.relative },
            if r.target.is_empty() { "–" } else { &r.target },
            r.verdict.mark()
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&format!("- {n}\n"));
        }
    }
    out
}
