//! The `log.level` check: the filter's syntax is the subscriber's, so it is checked here, where
//! the subscriber is, and reported as the configuration error it is. Configuration does not
//! know the subscriber; the binary runs this check right after loading the configuration.

use crate::config::{ConfigError, LogConfig};

/// `log.level` as a configuration error naming the key, unless it is a filter that means what it
/// says (see `valid_log_filter`). Checked whatever `RUST_LOG` holds, as every key is.
pub fn check_level(log: &LogConfig) -> Result<(), ConfigError> {
    if valid_log_filter(&log.level) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: "log.level",
        message: format!(
            "expected a level (trace, debug, info, warn, error, off) or filter directives such as \"info,swr_stage_worker=debug\", got {:?}",
            log.level
        ),
    })
}

/// A `log.level` that means what it says: every comma-separated directive is a level (a name or
/// 0..=5), or names a target with a level or a path (`target=level`, `a::b`, `[span]`). A bare
/// word such as "verbose", a typo such as "lapin:debug" or a stray space ("info ") would
/// otherwise be read as a target name and silently hide every other log line.
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let mut directives = filter.split(',').filter(|d| !d.is_empty()).peekable();
    let directives_ok = directives.peek().is_some()
        && directives.all(|directive| {
            let level = LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l))
                || matches!(directive, "0" | "1" | "2" | "3" | "4" | "5");
            let target = (directive.contains(['=', '[']) || directive.contains("::"))
                && !directive.starts_with('=')
                && !directive.replace("::", "").contains(':');
            directive.trim() == directive && (level || target)
        });
    directives_ok && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn log_levels_and_directives_are_accepted_bare_words_are_not() {
        for good in [
            "info",
            "WARN",
            "info,swr_stage_worker=debug",
            "swr_stage_worker::worker=trace",
            "warn,lapin=off",
            "info,",
            "3",
            "swr_stage_worker::worker",
            "[job]=debug",
        ] {
            assert!(valid_log_filter(good), "{good:?} should be accepted");
        }
        for bad in [
            "verbose",
            "",
            " ",
            ",",
            "info,loud",
            "lapin=loud",
            "=debug",
            "info ",
            "warn, info",
            "lapin:debug",
            "swr_stage_worker",
        ] {
            assert!(!valid_log_filter(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_bad_level_is_a_configuration_error_naming_the_key() {
        for level in ["verbose", "", "info,=debug", "swr_stage_worker=loud"] {
            let env = [("SWR_STAGE_WORKER__LOG__LEVEL".to_owned(), level.to_owned())];
            let config = Config::load(None, env).unwrap();
            let err = check_level(&config.log).unwrap_err().to_string();
            assert!(
                err.starts_with("configuration key `log.level`: expected a level")
                    && err.contains(&format!("got {level:?}")),
                "{level:?}: {err}"
            );
        }
        let config = Config::load(None, Vec::new()).unwrap();
        check_level(&config.log).unwrap();
    }
}
