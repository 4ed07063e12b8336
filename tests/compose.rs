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

#[test]
fn every_published_port_binds_to_loopback_only() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let compose = std::fs::read_to_string(path).expect("docker-compose.yml is readable");
    let ports = published_ports(&compose);
    // RabbitMQ (AMQP, management), PostgreSQL, the simulator, the worker's telemetry.
    assert_eq!(ports.len(), 5, "published ports: {ports:?}");
    for (line, entry) in &ports {
        let mut parts = entry.split(':');
        let host = parts.next().unwrap_or_default();
        assert!(
            host == "127.0.0.1" && parts.count() == 2,
            "docker-compose.yml line {line}: {entry:?} must read \"127.0.0.1:<host port>:<container port>\" (see docs/docker.md, \"Ports\")"
        );
    }
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
