//! When to stop pre-copying memory: the decision after each pre-dump pass.
//!
//! P.Haul's rules (stop at <= 64 written pages, at > 10% growth against the
//! previous pass, after 8 passes) are the defaults, plus a bandwidth-aware
//! rule in the spirit of QEMU's: measure each pass's transfer rate and stop
//! as soon as the predicted frozen time — the pages the final dump will
//! still have to send, at the measured rate, plus the last measured restore
//! cost — fits the downtime target. Pure logic, so it is tested on recorded
//! statistics.

use std::time::Duration;

use serde::Serialize;

/// Page size CRIU dumps in.
pub const PAGE_SIZE: u64 = 4096;

/// The configurable stop rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StopRules {
    /// Stop after this many pre-dump passes.
    pub max_iterations: u32,
    /// Stop when a pass wrote at most this many pages.
    pub min_pages: u64,
    /// Stop when a pass wrote more than this percentage above the previous.
    pub max_growth_pct: u32,
    /// Stop when the predicted frozen time is below this.
    pub downtime_target: Duration,
}

impl Default for StopRules {
    fn default() -> Self {
        Self {
            max_iterations: 8,
            min_pages: 64,
            max_growth_pct: 10,
            downtime_target: Duration::from_millis(300),
        }
    }
}

/// What one memory pass did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PassStats {
    /// Pages CRIU wrote in the pass.
    pub pages_written: u64,
    /// Bytes that went over the memory channel.
    pub bytes: u64,
    /// How long the transfer took.
    pub duration: Duration,
}

impl PassStats {
    /// Bytes per second (0 when nothing was timed).
    pub fn rate(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// Why the loop stopped (or why it never ran).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum StopReason {
    /// Pre-dumps were not used (the string says why).
    NoPreDump {
        /// Why.
        why: String,
    },
    /// The last pass wrote few pages.
    FewPages {
        /// Pages written.
        pages: u64,
        /// The threshold.
        min: u64,
    },
    /// The dirty set grew.
    Growing {
        /// Pages in the pass before.
        previous: u64,
        /// Pages in the last pass.
        last: u64,
    },
    /// The pass limit was reached.
    MaxIterations {
        /// The limit.
        max: u32,
    },
    /// The predicted downtime fits the target.
    DowntimeTarget {
        /// The prediction, milliseconds.
        predicted_ms: f64,
        /// The target, milliseconds.
        target_ms: f64,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::NoPreDump { why } => write!(f, "no pre-dumps: {why}"),
            StopReason::FewPages { pages, min } => {
                write!(f, "last pass wrote {pages} pages (<= {min})")
            }
            StopReason::Growing { previous, last } => write!(
                f,
                "dirty memory is growing ({previous} -> {last} pages): more passes would not converge"
            ),
            StopReason::MaxIterations { max } => write!(f, "reached the limit of {max} passes"),
            StopReason::DowntimeTarget {
                predicted_ms,
                target_ms,
            } => write!(
                f,
                "predicted frozen time {predicted_ms:.0} ms fits the {target_ms:.0} ms target"
            ),
        }
    }
}

/// After a pass: go on, or stop and do the final dump.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run another pre-dump pass.
    Continue {
        /// The predicted frozen time if we stopped now, milliseconds.
        predicted_ms: f64,
    },
    /// Do the final dump now.
    Stop(StopReason),
}

/// Predicted frozen time if the final dump started now: what the last pass
/// wrote (roughly what has been dirtied since) at the last pass's rate,
/// plus the restore cost.
pub fn predicted_downtime(last: &PassStats, restore_cost: Duration) -> Option<Duration> {
    let rate = last.rate();
    if rate <= 0.0 {
        return None;
    }
    let send = (last.pages_written * PAGE_SIZE) as f64 / rate;
    Some(Duration::from_secs_f64(send) + restore_cost)
}

/// Decides after pass `history.len()` (history holds every pass so far).
pub fn decide(rules: &StopRules, history: &[PassStats], restore_cost: Duration) -> Decision {
    let Some(last) = history.last() else {
        return Decision::Continue {
            predicted_ms: f64::INFINITY,
        };
    };
    if last.pages_written <= rules.min_pages {
        return Decision::Stop(StopReason::FewPages {
            pages: last.pages_written,
            min: rules.min_pages,
        });
    }
    let predicted = predicted_downtime(last, restore_cost);
    if let Some(p) = predicted {
        if p < rules.downtime_target && history.len() > 1 {
            return Decision::Stop(StopReason::DowntimeTarget {
                predicted_ms: p.as_secs_f64() * 1e3,
                target_ms: rules.downtime_target.as_secs_f64() * 1e3,
            });
        }
    }
    if history.len() >= 2 {
        let previous = history[history.len() - 2].pages_written;
        if last.pages_written * 100 > previous * (100 + rules.max_growth_pct as u64) {
            return Decision::Stop(StopReason::Growing {
                previous,
                last: last.pages_written,
            });
        }
    }
    if history.len() as u32 >= rules.max_iterations {
        return Decision::Stop(StopReason::MaxIterations {
            max: rules.max_iterations,
        });
    }
    Decision::Continue {
        predicted_ms: predicted.map_or(f64::INFINITY, |p| p.as_secs_f64() * 1e3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pass(pages: u64, mib_per_s: u64) -> PassStats {
        let bytes = pages * PAGE_SIZE;
        PassStats {
            pages_written: pages,
            bytes,
            duration: Duration::from_secs_f64(bytes as f64 / (mib_per_s * MIB) as f64),
        }
    }

    fn run(rules: &StopRules, seq: &[PassStats]) -> (usize, Decision) {
        let restore = Duration::from_millis(50);
        for i in 1..=seq.len() {
            let d = decide(rules, &seq[..i], restore);
            if let Decision::Stop(_) = d {
                return (i, d);
            }
        }
        (seq.len(), decide(rules, seq, restore))
    }

    #[test]
    fn converging_workload_stops_when_the_downtime_fits() {
        // 1 GiB first, then the dirty set shrinks; 1 GiB/s link.
        let seq = [
            pass(262_144, 1024),
            pass(70_000, 1024),
            pass(20_000, 1024),
            pass(5_000, 1024),
        ];
        let (at, d) = run(&StopRules::default(), &seq);
        // Pass 2: 273 MiB -> 267 ms + 50 ms restore > 300 ms: continue.
        // Pass 3: 78 MiB -> 76 ms + 50 ms < 300 ms: stop.
        assert_eq!(at, 3);
        assert!(
            matches!(d, Decision::Stop(StopReason::DowntimeTarget { .. })),
            "{d:?}"
        );
    }

    #[test]
    fn few_pages_stops_at_once() {
        let seq = [pass(10_000, 100), pass(60, 100)];
        let (at, d) = run(&StopRules::default(), &seq);
        assert_eq!(at, 2);
        assert_eq!(
            d,
            Decision::Stop(StopReason::FewPages { pages: 60, min: 64 })
        );
    }

    #[test]
    fn growing_dirty_set_stops() {
        // A slow link (10 MiB/s) so the downtime rule never fires.
        let seq = [
            pass(100_000, 10),
            pass(50_000, 10),
            pass(56_000, 10),
            pass(90_000, 10),
        ];
        let (at, d) = run(&StopRules::default(), &seq);
        assert_eq!(at, 3, "{d:?}");
        assert_eq!(
            d,
            Decision::Stop(StopReason::Growing {
                previous: 50_000,
                last: 56_000
            })
        );
    }

    #[test]
    fn never_converging_hits_the_pass_limit() {
        // Steady dirtying on a slow link: neither shrinking nor growing.
        let seq: Vec<PassStats> = (0..12).map(|_| pass(50_000, 10)).collect();
        let (at, d) = run(&StopRules::default(), &seq);
        assert_eq!(at, 8);
        assert_eq!(d, Decision::Stop(StopReason::MaxIterations { max: 8 }));
    }

    #[test]
    fn the_downtime_target_is_configurable() {
        let rules = StopRules {
            downtime_target: Duration::from_millis(2000),
            ..StopRules::default()
        };
        let seq = [pass(262_144, 1024), pass(65_536, 1024)];
        let (at, d) = run(&rules, &seq);
        assert_eq!(at, 2);
        assert!(matches!(
            d,
            Decision::Stop(StopReason::DowntimeTarget { .. })
        ));
        // A pass without timing never predicts.
        assert!(predicted_downtime(
            &PassStats {
                pages_written: 1,
                bytes: 1,
                duration: Duration::ZERO
            },
            Duration::ZERO
        )
        .is_none());
    }
}
