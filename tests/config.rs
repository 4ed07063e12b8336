//! The binary's side of configuration: a key it cannot use stops it before it does anything,
//! with exit code 2 and a line naming the key. Needs no broker: nothing is contacted first.

use std::process::Command;

/// Runs `swr-stage-worker run` with only `vars` set; its exit code and stderr.
fn run_with(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_swr-stage-worker"))
        .arg("run")
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .expect("the binary starts");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_log_level_the_subscriber_would_misread_is_a_configuration_error() {
    // "verbose" reads as a target name, "lapin=loud" is not a level: both would hide log lines.
    for level in ["verbose", "lapin=loud"] {
        let (code, stderr) = run_with(&[("SWR_STAGE_WORKER__LOG__LEVEL", level)]);
        assert_eq!(code, Some(2), "log.level = {level:?}: {stderr}");
        assert!(
            stderr.starts_with("swr-stage-worker: configuration key `log.level`: expected a level")
                && stderr.contains(&format!("got {level:?}")),
            "log.level = {level:?}: {stderr}"
        );
    }
}

#[test]
fn a_word_outside_a_keys_set_names_the_key_and_the_words() {
    for (var, word, key, words) in [
        (
            "SWR_STAGE_WORKER__SWR__AUTH__KIND",
            "magic",
            "swr.auth.kind",
            "`static` or `iam_password`",
        ),
        (
            "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND",
            "redis",
            "idempotency.backend",
            "`embedded`, `postgres`, `off`",
        ),
        (
            "SWR_STAGE_WORKER__LOG__FORMAT",
            "xml",
            "log.format",
            "`text` or `json`",
        ),
    ] {
        let (code, stderr) = run_with(&[(var, word)]);
        assert_eq!(code, Some(2), "{var}={word}: {stderr}");
        assert!(
            stderr.contains(&format!("key `{key}`")) && stderr.contains(words),
            "{var}={word}: {stderr}"
        );
    }
}
