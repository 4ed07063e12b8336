//! Progress of a campaign phase on stderr: indicatif bars on a terminal, one plain line every
//! two seconds otherwise (logs and CI keep a readable record), nothing in library tests.
//!
//! A [`Meter`] only counts and shows; it never decides anything, so callers may drop it at any
//! time. Summaries and errors are printed by the commands, not here.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(2);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Live bars (count, rate, ETA) redrawn in place: for people at a terminal.
    Bar,
    /// A line every [`PLAIN_INTERVAL`] and one at the end: for logs, pipes and CI.
    Lines,
    /// Nothing: for library callers that read the returned reports.
    Hidden,
}

impl ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// Shared state of a meter, read by the plain-line ticker.
struct Counts {
    /// What is being counted (`submitted`, `outcomes`).
    label: &'static str,
    /// Name of each counter; one counter means no breakdown in the plain line.
    names: Vec<&'static str>,
    /// The counters, in `names` order.
    values: Vec<AtomicU64>,
    /// Expected total, when known (for `N/total` and the bars' length).
    total: Option<u64>,
    /// When counting started, for the rate.
    started: Instant,
}

impl Counts {
    fn line(&self) -> String {
        let counts: Vec<(&str, u64)> = self
            .names
            .iter()
            .zip(&self.values)
            .map(|(name, value)| (*name, value.load(Ordering::Relaxed)))
            .collect();
        plain_line(self.label, &counts, self.total, self.started.elapsed())
    }
}

/// Counts one phase and shows it as the mode says.
pub struct Meter {
    /// The counters and what they mean.
    counts: Arc<Counts>,
    /// One bar per counter in [`ProgressMode::Bar`], kept together so they redraw as a block.
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    /// The plain-line printer in [`ProgressMode::Lines`]; stopped by `finish`.
    ticker: Option<tokio::task::JoinHandle<()>>,
    /// Whether `finish` prints a last plain line.
    plain: bool,
}

impl Meter {
    /// A meter for `label` with one counter per name. Must be called inside a tokio runtime
    /// when `mode` is [`ProgressMode::Lines`] (the ticker is a task).
    pub fn new(
        mode: ProgressMode,
        label: &'static str,
        names: &[&'static str],
        total: Option<u64>,
    ) -> Meter {
        let counts = Arc::new(Counts {
            label,
            names: names.to_vec(),
            values: names.iter().map(|_| AtomicU64::new(0)).collect(),
            total,
            started: Instant::now(),
        });
        let mut meter = Meter {
            counts,
            bars: None,
            ticker: None,
            plain: mode == ProgressMode::Lines,
        };
        match mode {
            ProgressMode::Hidden => {}
            ProgressMode::Bar => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                let bars = names
                    .iter()
                    .map(|name| {
                        let prefix = if names.len() == 1 { label } else { name };
                        multi.add(new_bar(prefix, total))
                    })
                    .collect();
                meter.bars = Some((multi, bars));
            }
            ProgressMode::Lines => {
                let counts = Arc::clone(&meter.counts);
                meter.ticker = Some(tokio::spawn(async move {
                    let mut every = tokio::time::interval(PLAIN_INTERVAL);
                    every.tick().await;
                    loop {
                        every.tick().await;
                        eprintln!("{}", counts.line());
                    }
                }));
            }
        }
        meter
    }

    /// Adds `n` to counter `index` (the position of its name in `new`).
    pub fn inc(&self, index: usize, n: u64) {
        self.counts.values[index].fetch_add(n, Ordering::Relaxed);
        if let Some((_, bars)) = &self.bars {
            bars[index].inc(n);
        }
    }

    /// Sum of all counters.
    pub fn done(&self) -> u64 {
        self.counts
            .values
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .sum()
    }

    /// Prints a line above the bars (or plainly), so messages do not tear the bars.
    pub fn println(&self, line: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Stops the display and prints the final state once.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if let Some((_, bars)) = self.bars.take() {
            for bar in bars {
                // Not `finish`, which fills the bar: a bar per status must keep its own count.
                bar.abandon();
            }
        }
        if std::mem::take(&mut self.plain) {
            eprintln!("{}", self.counts.line());
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // An error path that drops the meter still leaves the last count on screen.
        self.stop();
    }
}

fn new_bar(prefix: &'static str, total: Option<u64>) -> ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{prefix:>10} [{bar:40}] {pos}/{len} ({rate}, ETA {eta})",
        ),
        None => (ProgressBar::no_length(), "{prefix:>10} {pos} ({rate})"),
    };
    let style = ProgressStyle::with_template(template)
        .expect("the bar templates are valid")
        .progress_chars("=> ")
        // Whole messages per second, as in the plain lines (indicatif's own shows 4 decimals).
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        );
    bar.set_style(style);
    bar.set_prefix(prefix);
    bar
}

/// One plain progress line: `submitted 12000/100000 (8500/s)`, or with a breakdown
/// `outcomes 120/500 (95/s): succeeded 100, failed 15, rejected 5`.
pub fn plain_line(
    label: &str,
    counts: &[(&str, u64)],
    total: Option<u64>,
    elapsed: Duration,
) -> String {
    let done: u64 = counts.iter().map(|(_, n)| n).sum();
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        (done as f64 / secs).round() as u64
    } else {
        0
    };
    let mut line = match total {
        Some(total) => format!("{label} {done}/{total} ({rate}/s)"),
        None => format!("{label} {done} ({rate}/s)"),
    };
    if counts.len() > 1 {
        let parts: Vec<String> = counts.iter().map(|(n, c)| format!("{n} {c}")).collect();
        line.push_str(": ");
        line.push_str(&parts.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_show_count_total_and_rate() {
        assert_eq!(
            plain_line(
                "submitted",
                &[("submitted", 12000)],
                Some(100_000),
                Duration::from_millis(1500)
            ),
            "submitted 12000/100000 (8000/s)"
        );
        assert_eq!(
            plain_line(
                "outcomes",
                &[("succeeded", 100), ("failed", 15), ("rejected", 5)],
                None,
                Duration::from_secs(2)
            ),
            "outcomes 120 (60/s): succeeded 100, failed 15, rejected 5"
        );
        assert_eq!(
            plain_line("submitted", &[("submitted", 0)], Some(3), Duration::ZERO),
            "submitted 0/3 (0/s)"
        );
    }
}
