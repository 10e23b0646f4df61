//! The source's side of post-copy: after the switch its copy of the
//! workload is stopped (never to run again) and this server reads the
//! pages the destination asks for straight out of the stopped tasks
//! (`process_vm_readv`), urgent requests (a thread waiting on a fault)
//! first, until the destination says every page has arrived.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::wire::{read_frame, write_frame, Frame};
use crate::conn::Conn;
use crate::journal::Task;

/// How the page transfer ended on the source.
#[derive(Debug)]
pub enum Served {
    /// The destination has every page.
    AllIn {
        /// Pages it placed.
        pages: u64,
    },
    /// The transfer broke: the connection failed or went silent.
    Broken(String),
}

/// Pages served so far (read while the transfer runs, for progress).
#[derive(Debug, Default)]
pub struct ServeCounts {
    /// Every page sent.
    pub pages: AtomicU64,
    /// Pages a thread on the destination was blocked on.
    pub urgent: AtomicU64,
}

#[derive(Default)]
struct Queue {
    urgent: VecDeque<Frame>,
    background: VecDeque<Frame>,
    end: Option<Result<u64, String>>,
    last_heard: Option<Instant>,
}

/// Maps the workload's own pids (as CRIU's images name them) to this
/// host's.
pub fn vpid_map(tasks: &[Task]) -> HashMap<i32, i32> {
    tasks
        .iter()
        .filter_map(|t| Some((*crate::proc::ns_pids(t.pid).last()?, t.pid)))
        .collect()
}

fn read_pages(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
    match crate::proc::read_memory(pid, addr, buf) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(_) => Err(libc::EFAULT),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Tells the destination the source's copy is gone (after
/// [`Served::AllIn`]).
pub fn released(conn: &Conn) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    write_frame(&mut w, &Frame::Released, &[])?;
    w.flush()
}

/// Serves page requests on `conn` from the stopped tasks (`pids`: the
/// workload's pid -> this host's) until every page has arrived, the
/// connection breaks, or no request came for `stall`. `urgent` counts the
/// pages served to threads waiting on a fault, `all` every page served.
pub fn serve(
    conn: &Conn,
    pids: &HashMap<i32, i32>,
    stall: Duration,
    counts: &ServeCounts,
) -> Served {
    let mut reader = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => return Served::Broken(format!("the memory channel: {e}")),
    };
    let mut writer = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => return Served::Broken(format!("the memory channel: {e}")),
    };
    // A peer that stops reading must not hold this side forever.
    let _ = writer.set_write_timeout(Some(stall));
    let q = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let q2 = q.clone();
    let rt = std::thread::Builder::new()
        .name("postcopy-requests".into())
        .spawn(move || {
            let (lock, cv) = &*q2;
            loop {
                let f = read_frame(&mut reader);
                let mut g = lock.lock().expect("queue");
                g.last_heard = Some(Instant::now());
                match f {
                    Ok(f @ Frame::Get { urgent: true, .. }) => g.urgent.push_back(f),
                    Ok(f @ Frame::Get { .. }) => g.background.push_back(f),
                    Ok(Frame::AllIn { pages }) => {
                        g.end = Some(Ok(pages));
                        cv.notify_all();
                        return;
                    }
                    Ok(other) => {
                        g.end = Some(Err(format!(
                            "the destination sent {other:?} during the page transfer"
                        )));
                        cv.notify_all();
                        return;
                    }
                    Err(e) => {
                        g.end = Some(Err(format!(
                            "the memory channel broke during the page transfer: {e}"
                        )));
                        cv.notify_all();
                        return;
                    }
                }
                cv.notify_all();
            }
        });
    if let Err(e) = rt {
        return Served::Broken(format!("cannot start the request reader: {e}"));
    }
    let mut buf = vec![0u8; (super::wire::MAX_PAGES as u64 * super::uffd::PAGE) as usize];
    let (lock, cv) = &*q;
    loop {
        let next = {
            let mut g = lock.lock().expect("queue");
            loop {
                if let Some(f) = g.urgent.pop_front().or_else(|| g.background.pop_front()) {
                    break Some(f);
                }
                if g.end.is_some() {
                    break None;
                }
                // Counted from the first request: before the switch the
                // destination asks only for what its restorer touches
                // (often nothing); a destination that dies before asking
                // anything breaks the control connection instead.
                if g.last_heard.is_some_and(|h| h.elapsed() >= stall) {
                    conn.shutdown();
                    return Served::Broken(format!(
                        "the destination asked for no page for {} s: the transfer stalled",
                        stall.as_secs()
                    ));
                }
                g = cv
                    .wait_timeout(g, Duration::from_millis(200))
                    .expect("queue")
                    .0;
            }
        };
        let Some(Frame::Get {
            id,
            vpid,
            addr,
            pages,
            urgent,
        }) = next
        else {
            break;
        };
        let len = (pages as u64 * super::uffd::PAGE) as usize;
        let r = match pids.get(&vpid) {
            Some(&pid) => read_pages(pid, addr, &mut buf[..len]),
            None => Err(libc::ESRCH),
        };
        if r.is_ok() {
            let n = pages as u64;
            counts.pages.fetch_add(n, Ordering::Relaxed);
            if urgent {
                counts.urgent.fetch_add(n, Ordering::Relaxed);
            }
        }
        let w = match r {
            Ok(()) => write_frame(&mut writer, &Frame::Pages { id, pages }, &buf[..len]),
            Err(errno) => {
                tracing::warn!(vpid, addr, pages, errno, "cannot read requested pages");
                write_frame(&mut writer, &Frame::Fail { id, errno }, &[])
            }
        };
        if let Err(e) = w {
            conn.shutdown();
            return Served::Broken(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "the destination took no page for {} s: the transfer stalled",
                    stall.as_secs()
                ),
                _ => format!("the memory channel broke during the page transfer: {e}"),
            });
        }
    }
    let end = lock.lock().expect("queue").end.take();
    match end {
        Some(Ok(pages)) => Served::AllIn { pages },
        Some(Err(e)) => Served::Broken(e),
        None => Served::Broken("the page transfer ended without a word".into()),
    }
}
