//! What the process knows about the machine it runs on, for names it gives itself. Reads the
//! system, never configuration.

/// This machine's host name: the kernel's, else `$HOSTNAME`, else `"unknown-host"` (a worker
/// must still be able to name itself in a container without either).
pub fn name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_name_is_never_empty_and_has_no_line_break() {
        let name = super::name();
        assert!(!name.is_empty());
        assert_eq!(name.trim(), name);
    }
}
