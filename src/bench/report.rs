//! What `bench` prints: a line per round, then the medians as a Markdown table, each worker
//! store against the store-off worker, and the endpoint's headroom.

use super::phases::PhaseResult;

/// One round's figures on one line.
pub(super) fn round_line(round: usize, phases: &[PhaseResult]) {
    let line: Vec<String> = phases
        .iter()
        .map(|p| {
            format!(
                "{} {:.0}/s ({} µs CPU/job, broker {})",
                p.name,
                p.jobs_per_sec,
                micros(p.cpu_us_per_job),
                micros(p.broker_cpu_us_per_job)
            )
        })
        .collect();
    println!("round {round}: {}", line.join(", "));
}

/// The table of `results` (medians; the first is the bare loop) over `rounds`, then the
/// store ratios and the endpoint's headroom over the fastest phase (`endpoint`: requests/s).
pub(super) fn table(rounds: &[Vec<PhaseResult>], results: &[PhaseResult], endpoint: f64) {
    let bare = &results[0];
    println!();
    println!("medians over {} round(s):", rounds.len());
    println!(
        "| phase | jobs/s | vs bare | CPU µs/job | broker µs/job | peak RSS | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let (p50, p99) = r.latency_ms.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{a:.1}"), format!("{b:.1}"))
        });
        println!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {p50} | {p99} |",
            r.name,
            r.jobs_per_sec,
            r.jobs_per_sec / bare.jobs_per_sec,
            micros(r.cpu_us_per_job),
            micros(r.broker_cpu_us_per_job),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
        );
    }
    store_ratios(rounds, results);
    let fastest = results.iter().map(|r| r.jobs_per_sec).fold(0.0, f64::max);
    println!(
        "endpoint headroom: {:.1}x the fastest phase{}",
        endpoint / fastest,
        if endpoint < 2.0 * fastest {
            " (WARNING: the endpoint may be the bottleneck)"
        } else {
            ""
        }
    );
}

/// Each worker store's median against the store-off worker's, with the range over the rounds.
fn store_ratios(rounds: &[Vec<PhaseResult>], results: &[PhaseResult]) {
    let Some(off) = results.iter().position(|r| r.name == "worker, store off") else {
        return;
    };
    for (i, r) in results.iter().enumerate() {
        if !r.name.starts_with("worker, store") || i == off {
            continue;
        }
        let (low, high) = ratio_range(rounds, i, off);
        println!(
            "{} / store off: {:.2} (rounds {low:.2}-{high:.2})",
            r.name,
            r.jobs_per_sec / results[off].jobs_per_sec
        );
    }
}

/// A figure in whole microseconds, or "-" when it was not measured.
fn micros(us: Option<f64>) -> String {
    us.map_or("-".into(), |us| format!("{us:.0}"))
}

/// The lowest and highest ratio of phase `i` to phase `base` within one round: how far a
/// single round can stray from the medians.
fn ratio_range(rounds: &[Vec<PhaseResult>], i: usize, base: usize) -> (f64, f64) {
    rounds
        .iter()
        .map(|round| round[i].jobs_per_sec / round[base].jobs_per_sec)
        .fold((f64::INFINITY, 0.0), |(low, high), r| {
            (low.min(r), high.max(r))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(jobs_per_sec: f64) -> PhaseResult {
        PhaseResult {
            jobs_per_sec,
            ..PhaseResult::default()
        }
    }

    #[test]
    fn the_ratio_range_is_taken_within_each_round() {
        // Phase 2 against phase 1, round by round: 0.5, 0.9 and 0.8.
        let rounds = vec![
            vec![phase(100.0), phase(200.0), phase(100.0)],
            vec![phase(100.0), phase(100.0), phase(90.0)],
            vec![phase(100.0), phase(150.0), phase(120.0)],
        ];
        let (low, high) = ratio_range(&rounds, 2, 1);
        assert!(
            (low - 0.5).abs() < 1e-9 && (high - 0.9).abs() < 1e-9,
            "{low} {high}"
        );
    }

    #[test]
    fn a_figure_not_measured_is_a_dash() {
        assert_eq!(micros(None), "-");
        assert_eq!(micros(Some(1234.4)), "1234");
    }
}
