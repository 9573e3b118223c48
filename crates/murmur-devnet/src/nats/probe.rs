//! A one-request NATS client over the text protocol: enough to ask a server whether
//! JetStream answers (`$JS.API.INFO`), without an async runtime.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Where the reply goes; unique per connection, so one inbox is enough.
const INBOX: &str = "_INBOX.murmur-devnet.probe";

/// What one probe found.
#[derive(Debug)]
pub(crate) enum Probe {
    /// JetStream answered `$JS.API.INFO` without an error.
    Ready,
    /// The server accepted the connection but JetStream did not (yet) answer, or answered
    /// with an error (e.g. no meta leader yet in a cluster).
    NotReady(String),
    /// No connection (nothing listens yet, or it closed on us).
    Unreachable(String),
}

/// Connects to `addr`, sends `$JS.API.INFO` and waits up to `wait` for the reply.
pub(crate) fn jetstream_info(addr: SocketAddr, wait: Duration) -> Probe {
    let stream = match TcpStream::connect_timeout(&addr, wait) {
        Ok(s) => s,
        Err(e) => return Probe::Unreachable(format!("connect to {addr}: {e}")),
    };
    match exchange(stream, wait) {
        Ok(probe) => probe,
        Err(e) => Probe::Unreachable(format!("talk to {addr}: {e}")),
    }
}

fn exchange(stream: TcpStream, wait: Duration) -> std::io::Result<Probe> {
    let deadline = Instant::now() + wait;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("INFO ") {
        return Ok(Probe::NotReady(format!(
            "expected INFO from the server, got {:?}",
            line.trim_end()
        )));
    }
    // no_responders: a request nobody answers gets a 503 status message instead of silence.
    write!(
        writer,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\
         \"protocol\":1,\"name\":\"murmur-devnet probe\"}}\r\n\
         SUB {INBOX} 1\r\nPUB $JS.API.INFO {INBOX} 0\r\n\r\nPING\r\n"
    )?;
    writer.flush()?;

    loop {
        if Instant::now() >= deadline {
            return Ok(Probe::NotReady(format!(
                "no reply to $JS.API.INFO within {wait:?}"
            )));
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Ok(Probe::Unreachable(
                    "the server closed the connection".into(),
                ));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Probe::NotReady(format!(
                    "no reply to $JS.API.INFO within {wait:?}"
                )));
            }
            Err(e) => return Err(e),
        }
        let op = line.trim_end();
        if op == "PING" {
            writer.write_all(b"PONG\r\n")?;
        } else if let Some(err) = op.strip_prefix("-ERR") {
            return Ok(Probe::NotReady(format!("server error:{err}")));
        } else if let Some(args) = op.strip_prefix("MSG ") {
            let payload = read_payload(&mut reader, last_number(args)?)?;
            return Ok(judge(&payload));
        } else if let Some(args) = op.strip_prefix("HMSG ") {
            // HMSG <subject> <sid> [reply] <header bytes> <total bytes>: a bare status
            // (e.g. 503 no responders) or a reply with headers.
            let parts: Vec<&str> = args.split_whitespace().collect();
            let header_len = parts
                .len()
                .checked_sub(2)
                .and_then(|i| parts[i].parse::<usize>().ok())
                .ok_or_else(|| bad_line(op))?;
            let message = read_payload(&mut reader, last_number(args)?)?;
            let (headers, body) = message.split_at(header_len.min(message.len()));
            let status = String::from_utf8_lossy(headers);
            let status = status.lines().next().unwrap_or("").trim();
            if body.is_empty() {
                return Ok(Probe::NotReady(format!("JetStream replied {status:?}")));
            }
            return Ok(judge(body));
        }
        // INFO updates, PONG, +OK: keep reading.
    }
}

/// Whether an `$JS.API.INFO` reply is a success (no `error` member).
fn judge(payload: &[u8]) -> Probe {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(reply) => match reply.get("error") {
            None => Probe::Ready,
            Some(error) => Probe::NotReady(format!("JetStream replied with an error: {error}")),
        },
        Err(e) => Probe::NotReady(format!("JetStream replied with something not JSON: {e}")),
    }
}

fn read_payload(reader: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    if len > 64 << 20 {
        return Err(bad_line(&format!("a {len}-byte message")));
    }
    // The payload is followed by CRLF.
    let mut payload = vec![0; len + 2];
    reader.read_exact(&mut payload)?;
    payload.truncate(len);
    Ok(payload)
}

fn last_number(args: &str) -> std::io::Result<usize> {
    args.split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad_line(args))
}

fn bad_line(line: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected protocol line {line:?}"),
    )
}
