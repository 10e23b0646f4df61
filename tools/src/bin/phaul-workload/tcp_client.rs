//! `phaul-workload tcp-client`: paced request/response client checking the
//! answers of `run --tcp-listen` across a migration.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// Read timeout per answer: long enough for a server frozen by CRIU.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many error messages are kept in the result.
const MAX_ERRORS: usize = 100;

/// The JSON written to `--out`.
#[derive(Debug, Default, Serialize)]
struct ClientResult {
    /// Requests sent.
    requests: u64,
    /// Correct answers.
    ok: u64,
    /// Answers that were not request + 1.
    wrong_answers: u64,
    /// What went wrong (connection errors, wrong answers), first ones only.
    errors: Vec<String>,
    /// Slowest request/answer round trip.
    max_latency_us: u64,
    /// The connection failed (reset, EOF, timeout) before the end.
    connection_broken: bool,
    /// How long the client ran.
    elapsed_ms: u64,
}

impl ClientResult {
    fn error(&mut self, msg: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(msg);
        }
    }
}

/// Runs the client; returns whether there were no errors.
pub fn run(connect: &str, duration_ms: u64, interval_us: u64, out: &Path) -> Result<bool> {
    let start = Instant::now();
    let mut res = ClientResult::default();
    match TcpStream::connect(connect) {
        Ok(stream) => exchange(&stream, duration_ms, interval_us, &mut res, start),
        Err(e) => {
            res.error(format!("connect to {connect}: {e}"));
            res.connection_broken = true;
        }
    }
    res.elapsed_ms = start.elapsed().as_millis() as u64;
    let mut text = serde_json::to_vec_pretty(&res)?;
    text.push(b'\n');
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(res.errors.is_empty() && res.wrong_answers == 0)
}

/// Sends `"<k>\n"` every `interval_us` and checks each answer is k + 1.
/// Falling behind (e.g. after the server was frozen) restarts the pacing
/// instead of sending a burst.
fn exchange(
    stream: &TcpStream,
    duration_ms: u64,
    interval_us: u64,
    res: &mut ClientResult,
    start: Instant,
) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.set_read_timeout(Some(READ_TIMEOUT)) {
        res.error(format!("setting the read timeout: {e}"));
    }
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let end = start + Duration::from_millis(duration_ms);
    let interval = Duration::from_micros(interval_us);
    let mut next = Instant::now();
    let mut line = String::new();
    let mut k: u64 = 0;
    while Instant::now() < end {
        k += 1;
        let sent = Instant::now();
        if let Err(e) = writer.write_all(format!("{k}\n").as_bytes()) {
            res.error(format!("request {k}: send failed: {e}"));
            res.connection_broken = true;
            return;
        }
        res.requests += 1;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                res.error(format!(
                    "request {k}: connection closed by the server (EOF)"
                ));
                res.connection_broken = true;
                return;
            }
            Ok(_) if !line.ends_with('\n') => {
                res.error(format!(
                    "request {k}: connection closed mid-answer ({line:?})"
                ));
                res.connection_broken = true;
                return;
            }
            Ok(_) => {
                let latency = sent.elapsed().as_micros() as u64;
                res.max_latency_us = res.max_latency_us.max(latency);
                if line.trim().parse::<u64>().ok() == k.checked_add(1) {
                    res.ok += 1;
                } else {
                    res.wrong_answers += 1;
                    res.error(format!("request {k}: wrong answer {:?}", line.trim_end()));
                }
            }
            Err(e) => {
                let what = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    format!("no answer within {} s", READ_TIMEOUT.as_secs())
                } else {
                    e.to_string()
                };
                res.error(format!("request {k}: receive failed: {what}"));
                res.connection_broken = true;
                return;
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}
