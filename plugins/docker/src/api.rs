//! The Docker Engine API over its unix socket: HTTP/1.1 by hand (one
//! connection per request, `Connection: close`), JSON bodies with serde,
//! chunked or sized responses, and file-to-socket streaming for image
//! save/load. API version 1.41 (Docker 20.10; later engines still serve
//! it).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phaul_plugin_api::DriverError;
use serde_json::Value;

/// The API version every path is prefixed with.
pub const API_VERSION: &str = "v1.41";

/// The default engine socket (`DOCKER_HOST` unset).
pub const DEFAULT_SOCKET: &str = "/run/docker.sock";

/// One engine, by its API socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// The unix socket path.
    pub socket: PathBuf,
    /// How long one request may take.
    pub timeout: Duration,
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The engine's error message (`{"message": ...}`), or the raw body.
    pub fn message(&self) -> String {
        match self.json().get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => String::from_utf8_lossy(&self.body).trim().to_string(),
        }
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `unix:///path` (as in `DOCKER_HOST`) or a plain path, to a socket path.
pub fn socket_from_host(host: &str) -> Result<PathBuf, DriverError> {
    if let Some(p) = host.strip_prefix("unix://") {
        return Ok(PathBuf::from(p));
    }
    if host.starts_with('/') {
        return Ok(PathBuf::from(host));
    }
    Err(DriverError::invalid(format!(
        "docker: engine address {host:?}: only unix sockets are supported (unix:///run/docker.sock)"
    )))
}

/// Percent-encodes a query value or path segment.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Engine {
    /// The engine at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Engine {
        Engine {
            socket: socket.into(),
            timeout: Duration::from_secs(120),
        }
    }

    fn connect(&self) -> Result<UnixStream, DriverError> {
        let s = UnixStream::connect(&self.socket).map_err(|e| {
            DriverError::failed(format!(
                "docker: cannot reach the engine at {}: {e} (is dockerd running? set DOCKER_HOST \
                 or -o socket=PATH)",
                self.socket.display()
            ))
        })?;
        s.set_read_timeout(Some(self.timeout)).ok();
        s.set_write_timeout(Some(self.timeout)).ok();
        Ok(s)
    }

    /// Whether the engine's socket takes a connection (no request: a
    /// check cheap enough for every start of phaul).
    pub fn reachable(&self) -> Result<(), DriverError> {
        self.connect().map(drop)
    }

    /// A request's head: `Connection: close`, the body's type and length.
    fn head(method: &str, path: &str, body: Option<(&str, u64)>) -> String {
        let (kind, len) = body.unwrap_or(("", 0));
        format!(
            "{method} /{API_VERSION}{path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\
             User-Agent: phaul-docker/{}\r\n{}Content-Length: {len}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            if kind.is_empty() {
                String::new()
            } else {
                format!("Content-Type: {kind}\r\n")
            },
        )
    }

    fn io(&self, what: &str, path: &str, e: std::io::Error) -> DriverError {
        DriverError::failed(format!(
            "docker: {what} {path} on {}: {e}",
            self.socket.display()
        ))
    }

    /// `METHOD /v1.41PATH` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, DriverError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let mut s = self.connect()?;
        let head = Self::head(
            method,
            path,
            body.as_ref().map(|b| ("application/json", b.len() as u64)),
        );
        s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body.as_deref().unwrap_or_default()))
            .map_err(|e| self.io("sending", path, e))?;
        read_response(BufReader::new(s), &mut Vec::new()).map_err(|e| self.io("reading", path, e))
    }

    /// `GET PATH` whose body is streamed into the file `to` (image save).
    pub fn download(&self, path: &str, to: &Path) -> Result<Response, DriverError> {
        let mut s = self.connect()?;
        let head = Self::head("GET", path, None);
        s.write_all(head.as_bytes())
            .map_err(|e| self.io("sending", path, e))?;
        let mut file = std::fs::File::create(to).map_err(|e| self.io("creating", path, e))?;
        let mut r = read_head(BufReader::new(s)).map_err(|e| self.io("reading", path, e))?;
        if !(200..300).contains(&r.0) {
            let mut body = Vec::new();
            r.1.read_to_end(&mut body).ok();
            return Ok(Response { status: r.0, body });
        }
        copy_body(&mut r.1, r.2, &mut file).map_err(|e| self.io("reading", path, e))?;
        Ok(Response {
            status: r.0,
            body: Vec::new(),
        })
    }

    /// `POST PATH` with the file `from` as its body (image load).
    pub fn upload(&self, path: &str, from: &Path) -> Result<Response, DriverError> {
        let mut file = std::fs::File::open(from).map_err(|e| self.io("opening", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| self.io("opening", path, e))?
            .len();
        let mut s = self.connect()?;
        let head = Self::head("POST", path, Some(("application/x-tar", len)));
        s.write_all(head.as_bytes())
            .and_then(|()| std::io::copy(&mut file, &mut s).map(drop))
            .map_err(|e| self.io("sending", path, e))?;
        read_response(BufReader::new(s), &mut Vec::new()).map_err(|e| self.io("reading", path, e))
    }
}

/// How a response body is delimited.
enum Framing {
    Length(u64),
    Chunked,
    Eof,
}

type Head<R> = (u16, BufReader<R>, Framing);

fn read_head<R: Read>(mut r: BufReader<R>) -> std::io::Result<Head<R>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("not an HTTP response: {:?}", line.trim())))?;
    let mut framing = Framing::Eof;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the engine closed the connection in the headers".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                framing = Framing::Length(v.parse().map_err(|_| bad(format!("length {v:?}")))?);
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                framing = Framing::Chunked;
            }
        }
    }
    // 204/304 and 1xx have no body whatever the headers say.
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok((status, r, framing))
}

fn copy_body<R: Read>(
    r: &mut BufReader<R>,
    framing: Framing,
    out: &mut impl Write,
) -> std::io::Result<()> {
    match framing {
        Framing::Length(n) => {
            let got = std::io::copy(&mut r.take(n), out)?;
            if got != n {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("body cut short: {got} of {n} bytes"),
                ));
            }
        }
        Framing::Eof => {
            std::io::copy(r, out)?;
        }
        Framing::Chunked => {
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let size = line.trim().split(';').next().unwrap_or_default();
                let n = u64::from_str_radix(size, 16).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("chunk size {size:?}"),
                    )
                })?;
                if n == 0 {
                    break;
                }
                std::io::copy(&mut r.take(n), out)?;
                line.clear();
                r.read_line(&mut line)?;
            }
        }
    }
    Ok(())
}

fn read_response<R: Read>(r: BufReader<R>, body: &mut Vec<u8>) -> std::io::Result<Response> {
    let (status, mut r, framing) = read_head(r)?;
    copy_body(&mut r, framing, body)?;
    Ok(Response {
        status,
        body: std::mem::take(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Response {
        read_response(BufReader::new(raw.as_bytes()), &mut Vec::new()).unwrap()
    }

    #[test]
    fn sized_chunked_and_empty_bodies() {
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}");
        assert_eq!((r.status, r.json()["a"].as_i64()), (200, Some(1)));
        let r = parse(
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
             c\r\n{\"message\":\"\r\n8\r\nno such\"\r\n1\r\n}\r\n0\r\n\r\n",
        );
        assert_eq!((r.status, r.message().as_str()), (404, "no such"));
        assert!(!r.ok());
        let r = parse("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
        assert!(r.ok() && r.body.is_empty());
    }

    #[test]
    fn a_cut_body_and_garbage_are_errors_not_panics() {
        let cut = "HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\nshort";
        assert!(read_response(BufReader::new(cut.as_bytes()), &mut Vec::new()).is_err());
        for raw in [
            "",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(read_response(BufReader::new(raw.as_bytes()), &mut Vec::new()).is_err());
        }
    }

    #[test]
    fn hosts_and_encoding() {
        assert_eq!(
            socket_from_host("unix:///run/d.sock").unwrap(),
            PathBuf::from("/run/d.sock")
        );
        assert!(socket_from_host("tcp://1.2.3.4:2375").is_err());
        assert_eq!(encode("a b/c:1"), "a%20b%2Fc%3A1");
    }
}
