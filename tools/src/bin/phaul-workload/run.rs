//! `phaul-workload run`: set-up and the 1 ms tick loop.

use std::fs;

use anyhow::{bail, Context, Result};
use nix::unistd::getpid;

use crate::arena::{Arena, Verification};
use crate::extras::Extras;
use crate::objects::Objects;
use crate::pattern::DirtyRate;
use crate::status::{self, Status};
use crate::tcp_server::TcpServer;
use crate::{signals, sys, RunArgs};

/// Nominal tick length.
const TICK_NS: u64 = 1_000_000;
/// Gaps longer than this are counted in `gaps_over_10ms`.
const LONG_GAP_US: u64 = 10_000;
/// Children are reaped every this many ticks.
const REAP_EVERY_TICKS: u64 = 10;

/// Tick timing statistics.
#[derive(Debug, Default)]
struct Timing {
    /// Ticks so far.
    counter: u64,
    /// Realtime of the previous tick (µs).
    prev_us: u64,
    /// Largest gap since start.
    max_gap_us: u64,
    /// Largest gap since the last report.
    window_max_gap_us: u64,
    /// Gaps above [`LONG_GAP_US`].
    gaps_over_10ms: u64,
    /// Start of the current tick-rate sample: (realtime µs, counter).
    rate_sample: (u64, u64),
    /// Tick rate over the last completed sample (~1 s).
    ticks_per_sec: f64,
}

impl Timing {
    /// Accounts a tick at `now_us`; returns the gap since the previous one.
    fn tick(&mut self, now_us: u64) -> u64 {
        self.counter += 1;
        let gap = now_us.saturating_sub(self.prev_us);
        self.prev_us = now_us;
        self.max_gap_us = self.max_gap_us.max(gap);
        self.window_max_gap_us = self.window_max_gap_us.max(gap);
        if gap > LONG_GAP_US {
            self.gaps_over_10ms += 1;
        }
        let (t0, c0) = self.rate_sample;
        let span = now_us.saturating_sub(t0);
        if span >= 1_000_000 {
            self.ticks_per_sec = (self.counter - c0) as f64 * 1e6 / span as f64;
            self.rate_sample = (now_us, self.counter);
        }
        gap
    }

    /// The last completed ~1 s sample, or the current partial one if none
    /// completed yet.
    fn ticks_per_sec_estimate(&self, now_us: u64) -> f64 {
        let (t0, c0) = self.rate_sample;
        let span = now_us.saturating_sub(t0);
        if self.ticks_per_sec == 0.0 && span > 0 {
            (self.counter - c0) as f64 * 1e6 / span as f64
        } else {
            self.ticks_per_sec
        }
    }

    /// Forgets the time spent outside the loop (verification, start-up), so
    /// that it does not count as a gap nor as dirtying credit.
    fn restart_clock(&mut self) {
        let now = sys::realtime_us();
        self.prev_us = now;
        self.rate_sample = (now, self.counter);
    }
}

/// Everything the running workload owns.
struct Workload {
    args: RunArgs,
    start_us: u64,
    arena: Arena,
    rate: DirtyRate,
    extras: Option<Extras>,
    linger: Option<nix::unistd::Pid>,
    objects: Option<Objects>,
    tcp: Option<TcpServer>,
    timing: Timing,
    report_seq: u64,
}

impl Workload {
    /// Builds the status record.
    fn status(&mut self, verification: Verification, exiting: bool) -> Status {
        let now = sys::realtime_us();
        let mut st = Status {
            report_seq: self.report_seq,
            pid: getpid().as_raw(),
            counter: self.timing.counter,
            ticks_per_sec_estimate: self.timing.ticks_per_sec_estimate(now),
            mem_mib: self.args.mem_mib,
            pages: self.arena.pages(),
            pages_verified: verification.verified,
            pages_bad: verification.bad,
            first_bad_page: verification.first_bad,
            dirtied_total: self.arena.dirtied_total(),
            generation_sum: self.arena.generation_sum(),
            max_gap_us: self.timing.max_gap_us,
            window_max_gap_us: self.timing.window_max_gap_us,
            gaps_over_10ms: self.timing.gaps_over_10ms,
            uptime_ms: now.saturating_sub(self.start_us) / 1000,
            realtime_us: now,
            exiting,
            seed: self.args.seed,
            dirty_pct: self.args.dirty_pct,
            extras_enabled: self.extras.is_some(),
            tcp_enabled: self.tcp.is_some(),
            linger_pid: self.linger.map_or(0, |p| p.as_raw()),
            ..Status::default()
        };
        if let Some(x) = &mut self.extras {
            x.fill_status(&mut st);
        }
        if let Some(o) = &self.objects {
            st.objects = o.results();
        }
        if let Some(t) = &self.tcp {
            st.tcp_requests = t.requests();
            st.tcp_clients = t.clients();
        }
        st
    }

    /// Writes `status`, reporting (not failing on) errors: the workload
    /// keeps running even if its state directory disappears.
    fn publish(&self, status: &Status) {
        if let Err(e) = status::write_atomic(&self.args.state_dir, status) {
            eprintln!("phaul-workload: {e:#}");
        }
    }

    /// SIGUSR1: verify, write the report, reset the window.
    fn report(&mut self) {
        let verification = self.arena.verify();
        if let Some(o) = &mut self.objects {
            o.verify();
        }
        self.report_seq += 1;
        let st = self.status(verification, false);
        self.publish(&st);
        self.timing.window_max_gap_us = 0;
        self.timing.restart_clock();
    }

    /// One tick's work after the sleep.
    fn tick(&mut self) {
        let gap = self.timing.tick(sys::realtime_us());
        let due = self.rate.due(gap);
        self.arena.dirty(due);
        if let Some(x) = &mut self.extras {
            x.tick(self.timing.counter);
        }
        if let Some(o) = &mut self.objects {
            o.tick(self.timing.counter);
        }
        if let Some(t) = &mut self.tcp {
            t.service();
        }
        if self.timing.counter % REAP_EVERY_TICKS == 0 {
            let reaped = sys::reap_children();
            if let Some(x) = &mut self.extras {
                x.reaped(&reaped);
            }
        }
    }
}

/// Runs the workload until SIGTERM / SIGINT.
pub fn run(args: &RunArgs) -> Result<()> {
    let start_us = sys::realtime_us();
    if !(args.dirty_pct.is_finite() && args.dirty_pct >= 0.0) {
        bail!("--dirty-pct must be a non-negative number");
    }
    fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    signals::install()?;
    // Spawned through /proc/self/exe the command name would be "exe".
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"phaul-workload".as_ptr(), 0, 0, 0) };
    // The children are forked before the big memory area exists.
    let linger = if args.linger_child {
        Some(crate::linger::start()?)
    } else {
        None
    };
    let extras = if args.extras {
        Some(Extras::start(&args.state_dir)?)
    } else {
        None
    };
    let objects = if args.objects.is_empty() {
        None
    } else {
        Some(Objects::start(&args.state_dir, &args.objects)?)
    };
    let mut arena = Arena::new(args.mem_mib, args.seed)?;
    if args.dirty_scattered {
        arena.scatter();
    }
    let tcp = match args.tcp_listen {
        Some(addr) => Some(TcpServer::bind(addr)?),
        None => None,
    };
    let mut w = Workload {
        args: args.clone(),
        start_us,
        rate: DirtyRate::new(arena.pages(), args.dirty_pct),
        arena,
        extras,
        linger,
        objects,
        tcp,
        timing: Timing::default(),
        report_seq: 0,
    };
    let ready = w.status(Verification::NONE, false);
    status::write_atomic(&args.state_dir, &ready).context("writing the ready status")?;
    w.timing.restart_clock();

    while !signals::exit_requested() {
        sys::sleep_ns(TICK_NS);
        w.tick();
        if signals::exit_requested() {
            break;
        }
        if signals::take_report_request() {
            w.report();
        }
    }

    if let Some(x) = &mut w.extras {
        x.shutdown();
    }
    if let Some(o) = &mut w.objects {
        o.shutdown();
    }
    let last = w.status(Verification::NONE, true);
    status::write_atomic(&args.state_dir, &last).context("writing the final status")
}
