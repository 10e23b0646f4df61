//! When to stop the live fs-sync passes: P.Haul's restart-mode rules,
//! applied to the statistics of the passes so far. Pure logic.

use super::PassStats;

/// P.Haul restart-mode style stop rules for the live passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStopRules {
    /// Stop when the last pass sent fewer file data bytes than this.
    pub min_bytes: u64,
    /// Stop when the last pass sent more than this percentage above the one before.
    pub max_growth_pct: u32,
    /// Stop after this many passes.
    pub max_passes: u32,
}

impl Default for FsStopRules {
    fn default() -> Self {
        FsStopRules {
            min_bytes: 1 << 20,
            max_growth_pct: 10,
            max_passes: 8,
        }
    }
}

/// After the passes so far: None = do another live pass; Some(reason) =
/// stop (one-line human reason).
pub fn should_stop(rules: &FsStopRules, history: &[PassStats]) -> Option<String> {
    let last = history.last()?;
    if last.bytes_sent < rules.min_bytes {
        return Some(format!(
            "pass {} sent {} bytes of file data (< {}): the trees have converged",
            last.pass, last.bytes_sent, rules.min_bytes
        ));
    }
    if let [.., before, _] = history {
        let limit = u128::from(before.bytes_sent) * (100 + u128::from(rules.max_growth_pct));
        if u128::from(last.bytes_sent) * 100 > limit {
            return Some(format!(
                "file data sent grew from {} to {} bytes (more than {}%): more passes would not converge",
                before.bytes_sent, last.bytes_sent, rules.max_growth_pct
            ));
        }
    }
    if history.len() >= rules.max_passes as usize {
        return Some(format!("reached the limit of {} passes", rules.max_passes));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(bytes: &[u64]) -> Vec<PassStats> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| PassStats {
                pass: i as u32 + 1,
                bytes_sent: b,
                ..PassStats::default()
            })
            .collect()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn nothing_yet_means_go_on() {
        assert_eq!(should_stop(&FsStopRules::default(), &[]), None);
    }

    #[test]
    fn converging_sequence_stops_when_small() {
        let r = FsStopRules::default();
        // A 500 MiB container: full pass, then shrinking deltas.
        let seq = [500 * MIB, 40 * MIB, 8 * MIB, 3 * MIB, MIB / 2];
        for n in 1..seq.len() {
            assert_eq!(
                should_stop(&r, &history(&seq[..n])),
                None,
                "after {n} passes"
            );
        }
        let why = should_stop(&r, &history(&seq)).unwrap();
        assert!(why.contains("converged"), "{why}");
    }

    #[test]
    fn a_tiny_first_pass_stops_at_once() {
        let why = should_stop(&FsStopRules::default(), &history(&[4096])).unwrap();
        assert!(why.contains("4096"), "{why}");
        // Exactly min_bytes is not below it.
        assert_eq!(should_stop(&FsStopRules::default(), &history(&[MIB])), None);
    }

    #[test]
    fn growth_stops() {
        let r = FsStopRules::default();
        // +10% exactly is tolerated, +10% and a byte is not.
        assert_eq!(
            should_stop(&r, &history(&[100 * MIB, 10 * MIB, 11 * MIB])),
            None
        );
        let why = should_stop(&r, &history(&[100 * MIB, 10 * MIB, 11 * MIB + 1])).unwrap();
        assert!(why.contains("grew"), "{why}");
        // A workload rewriting a log faster than it is copied.
        let why = should_stop(&r, &history(&[64 * MIB, 20 * MIB, 30 * MIB])).unwrap();
        assert!(why.contains("grew from 20971520 to 31457280"), "{why}");
    }

    #[test]
    fn pass_limit_stops() {
        let r = FsStopRules {
            max_passes: 4,
            ..FsStopRules::default()
        };
        let seq = [100 * MIB, 50 * MIB, 48 * MIB, 47 * MIB];
        assert_eq!(should_stop(&r, &history(&seq[..3])), None);
        let why = should_stop(&r, &history(&seq)).unwrap();
        assert!(why.contains("limit of 4"), "{why}");
        // Default: 8.
        let steady: Vec<u64> = (0..8).map(|i| 100 * MIB - i * MIB).collect();
        assert_eq!(
            should_stop(&FsStopRules::default(), &history(&steady[..7])),
            None
        );
        assert!(should_stop(&FsStopRules::default(), &history(&steady)).is_some());
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        let r = FsStopRules {
            max_growth_pct: u32::MAX,
            ..FsStopRules::default()
        };
        assert_eq!(should_stop(&r, &history(&[u64::MAX, u64::MAX])), None);
    }
}
