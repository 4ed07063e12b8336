//! What Linux's /proc says about a process: the CPU time it has used and its peak memory. The
//! `bench` command reports both per job; tests and the store benchmark use the CPU time to
//! bound what an idle or failing path costs. Nothing here is on a job's path.

/// CPU time (user + system) a process has used so far, in seconds (10 ms steps), from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Clock ticks of USER_HZ, which Linux fixes at 100 for user space.
    Some(ticks as f64 / 100.0)
}

/// Peak resident set (VmHWM) of a process in KiB, from /proc.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time_and_a_peak_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(peak_rss_kib(pid).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn a_process_that_does_not_exist_has_no_figures() {
        // Above the kernel's largest pid (2^22).
        let gone = 1 << 23;
        assert_eq!(cpu_seconds(gone), None);
        assert_eq!(peak_rss_kib(gone), None);
    }
}
