//! docker-compose.yml publishes its ports on the loopback interface only (docs/docker.md, "Ports").
//!
//! Read as text, line by line: the file uses the short `"host:container"` port form throughout,
//! and an entry in any other form fails here rather than pass unread.

/// Every entry under a `ports:` key, as written (quotes removed), with its line number.
fn published_ports(compose: &str) -> Vec<(usize, String)> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut entries = Vec::new();
    // The indentation of the `ports:` key whose list is being read.
    let mut within: Option<usize> = None;
    for (number, line) in compose.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(key_indent) = within {
            if indent(line) > key_indent
                || (trimmed.starts_with("- ") && indent(line) == key_indent)
            {
                let entry = trimmed.strip_prefix("- ").unwrap_or(trimmed);
                entries.push((number + 1, entry.trim_matches('"').to_owned()));
                continue;
            }
            within = None;
        }
        if trimmed == "ports:" {
            within = Some(indent(line));
        }
    }
    entries
}

/// The host port of an entry that reads `127.0.0.1:<host port>:<container port>`, where the host
/// port is a number or `${SWR_COMPOSE_<NAME>_PORT:-<number>}` (moved by a variable, the address
/// never): as (variable, default or number, container port). None for any other form.
fn loopback_entry(entry: &str) -> Option<(Option<&str>, u16, u16)> {
    let rest = entry.strip_prefix("127.0.0.1:")?;
    let (variable, host, container) = match rest.strip_prefix("${") {
        Some(substitution) => {
            let (inside, after) = substitution.split_once('}')?;
            let (name, default) = inside.split_once(":-")?;
            let well_named = name.starts_with("SWR_COMPOSE_")
                && name.ends_with("_PORT")
                && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            if !well_named {
                return None;
            }
            (Some(name), default, after.strip_prefix(':')?)
        }
        None => {
            let (host, container) = rest.split_once(':')?;
            (None, host, container)
        }
    };
    let number = |text: &str| match text.bytes().all(|b| b.is_ascii_digit()) {
        true => text.parse::<u16>().ok(),
        false => None,
    };
    Some((variable, number(host)?, number(container)?))
}

#[test]
fn every_published_port_binds_to_loopback_only() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let compose = std::fs::read_to_string(path).expect("docker-compose.yml is readable");
    let ports = published_ports(&compose);
    // RabbitMQ (AMQP, management), PostgreSQL, the simulator, the worker's telemetry.
    assert_eq!(ports.len(), 5, "published ports: {ports:?}");
    let mut variables = Vec::new();
    for (line, entry) in &ports {
        let parsed = loopback_entry(entry);
        assert!(
            parsed.is_some(),
            "docker-compose.yml line {line}: {entry:?} must read \"127.0.0.1:<host port>:<container port>\", the host port a number or ${{SWR_COMPOSE_<NAME>_PORT:-<number>}} (see docs/docker.md, \"Ports\")"
        );
        let (variable, host, container) = parsed.unwrap();
        // Without the variables, the stack publishes the ports the test suite expects.
        assert_eq!(host, container, "docker-compose.yml line {line}: {entry:?}");
        variables.extend(variable);
    }
    let distinct: std::collections::BTreeSet<_> = variables.iter().collect();
    assert_eq!(
        distinct.len(),
        variables.len(),
        "one variable per port: {variables:?}"
    );
}

#[test]
fn the_port_reader_sees_every_form_it_must_refuse() {
    let compose = "services:\n  a:\n    ports:\n      - \"5672:5672\"\n      - 0.0.0.0:1:1\n    healthcheck:\n      test: x\n  b:\n    ports:\n    - \"127.0.0.1:2:2\"\n    - target: 3\n";
    let entries: Vec<String> = published_ports(compose).into_iter().map(|e| e.1).collect();
    assert_eq!(
        entries,
        ["5672:5672", "0.0.0.0:1:1", "127.0.0.1:2:2", "target: 3"]
    );
}

#[test]
fn only_the_host_port_may_be_a_variable() {
    assert_eq!(
        loopback_entry("127.0.0.1:${SWR_COMPOSE_AMQP_PORT:-5672}:5672"),
        Some((Some("SWR_COMPOSE_AMQP_PORT"), 5672, 5672))
    );
    assert_eq!(
        loopback_entry("127.0.0.1:9464:9464"),
        Some((None, 9464, 9464))
    );
    for refused in [
        "5672:5672",
        "0.0.0.0:5672:5672",
        "${SWR_COMPOSE_HOST:-127.0.0.1}:5672:5672",
        "127.0.0.1:${SWR_COMPOSE_AMQP_PORT}:5672",
        "127.0.0.1:${SWR_COMPOSE_AMQP_PORT-5672}:5672",
        "127.0.0.1:${AMQP_PORT:-5672}:5672",
        "127.0.0.1:${SWR_COMPOSE_AMQP_PORT:-0.0.0.0:5672}:5672",
        "127.0.0.1:${SWR_COMPOSE_AMQP_PORT:-5672}:${SWR_COMPOSE_X_PORT:-5672}",
        "127.0.0.1:5672",
        "127.0.0.1:5672:5672:1",
        "127.0.0.1:5672-5673:5672-5673",
    ] {
        assert_eq!(loopback_entry(refused), None, "{refused}");
    }
}
