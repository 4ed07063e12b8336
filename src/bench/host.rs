//! The bench's view of this machine, from /proc: the local RabbitMQ's process, and when it has
//! settled after earlier work. A remote broker is not measured.

use std::time::{Duration, Instant};

use swr_stage_worker::procstat::cpu_seconds;

/// Waits until process `pid` uses under a tenth of a core over half a second (it is done with
/// earlier work), for at most 15 s.
pub(super) async fn settle(pid: u32) {
    const WINDOW: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(15);
    let Some(mut before) = cpu_seconds(pid) else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(WINDOW).await;
        let Some(now) = cpu_seconds(pid) else { return };
        if now - before < WINDOW.as_secs_f64() / 10.0 {
            return;
        }
        before = now;
    }
    println!("(the broker stayed busy for 15 s before a phase; its figures may be low)");
}

/// The RabbitMQ server of `amqp_url` when it runs on this machine: the one Erlang VM started
/// with `-s rabbit boot` (CLI tools such as `rabbitmq-diagnostics` run a `beam.smp` of their own).
/// None for a remote broker, or when there is no such process or more than one.
pub(super) fn local_broker_pid(amqp_url: &str) -> Option<u32> {
    let uri = amqp_url.parse::<lapin::uri::AMQPUri>().ok()?;
    if !matches!(
        uri.authority.host.as_str(),
        "localhost" | "127.0.0.1" | "::1" | "[::1]"
    ) {
        return None;
    }
    let servers = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let server = args
                .windows(3)
                .any(|w| w == [&b"-s"[..], &b"rabbit"[..], &b"boot"[..]]);
            (comm.trim_end() == "beam.smp" && server).then_some(pid)
        });
    let servers: Vec<u32> = servers.collect();
    match servers[..] {
        [pid] => Some(pid),
        // Several nodes on this machine (a second one for RabbitMQ 4.x, say): the one that
        // listens on the URL's port.
        _ => {
            let sockets = listening_sockets(uri.authority.port);
            servers
                .into_iter()
                .find(|pid| owns_any_socket(*pid, &sockets))
        }
    }
}

/// The inodes of the TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net.
fn listening_sockets(port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    let listening = *fields.get(3)? == LISTEN;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| fields.get(9).map(|inode| (*inode).to_owned()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` holds one of the socket `inodes`.
fn owns_any_socket(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_broker_is_the_node_that_listens_on_the_urls_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sockets = listening_sockets(port);
        assert_eq!(sockets.len(), 1, "this process listens on {port}");
        assert!(owns_any_socket(std::process::id(), &sockets));
        assert!(!owns_any_socket(std::process::id(), &["0".to_owned()]));
        drop(listener);
    }

    #[test]
    fn a_remote_broker_has_no_local_process_to_measure() {
        assert_eq!(
            local_broker_pid("amqp://guest:guest@broker.example:5672/%2f"),
            None
        );
        assert_eq!(local_broker_pid("not a url"), None);
    }
}
