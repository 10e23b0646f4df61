//! [`Abort`]: how Ctrl-C (or an embedder) stops a migration from another
//! thread. Triggering it breaks the connections the engine is blocked on,
//! so every wait ends at once. Before the commit the engine then rolls
//! back; after it, the engine stops waiting for the destination's answer
//! and resolves the outcome by asking the destination on a new connection
//! (a second trigger stops that too, leaving the source copy stopped for
//! `phaul recover`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::conn::Conn;

/// What a trigger does, given where the migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    /// Before the commit: the migration rolls back.
    RollingBack,
    /// After the commit: the engine asks the destination what became of
    /// the migration instead of waiting for its answer.
    Resolving,
    /// A further trigger after the commit: stop asking; the source copy
    /// stays stopped and `phaul recover` decides later.
    GivingUp,
}

/// A shared abort switch for one migration.
#[derive(Debug, Default)]
pub struct Abort {
    reason: Mutex<Option<String>>,
    committed: AtomicBool,
    after_commit: AtomicU32,
    triggered: Arc<AtomicBool>,
    watched: Mutex<Vec<Conn>>,
}

impl Abort {
    /// A new, untriggered switch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests an abort (see [`Triggered`] for what it does when).
    pub fn trigger(&self, reason: &str) -> Triggered {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let what = if self.committed.load(Ordering::SeqCst) {
            match self.after_commit.fetch_add(1, Ordering::SeqCst) {
                0 => Triggered::Resolving,
                _ => Triggered::GivingUp,
            }
        } else {
            Triggered::RollingBack
        };
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        drop(r);
        self.triggered.store(true, Ordering::SeqCst);
        for c in self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            c.shutdown();
        }
        what
    }

    /// A flag set when the switch is triggered (driver hooks under way are
    /// abandoned on it).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.triggered.clone()
    }

    /// The abort reason, if triggered.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether resolving after the commit should stop (triggered twice
    /// after it).
    pub fn giving_up(&self) -> bool {
        self.after_commit.load(Ordering::SeqCst) >= 2
    }

    /// Breaks `conn` when the abort is triggered (and at once if it
    /// already was).
    pub fn watch(&self, conn: &Conn) {
        if let Ok(c) = conn.try_clone() {
            if self.reason().is_some() {
                c.shutdown();
            }
            self.watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }

    /// Marks the commit point. Returns `false` if an abort came first (the
    /// migration must roll back instead).
    pub fn commit(&self) -> bool {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_some() {
            return false;
        }
        self.committed.store(true, Ordering::SeqCst);
        true
    }

    /// Whether the migration has committed.
    pub fn committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_roll_back_before_the_commit_and_resolve_after_it() {
        let a = Abort::new();
        assert_eq!(a.trigger("first"), Triggered::RollingBack);
        assert!(!a.commit(), "an abort before the commit wins");
        let b = Abort::new();
        assert!(b.commit());
        assert_eq!(b.trigger("ctrl-c"), Triggered::Resolving);
        assert!(!b.giving_up());
        assert_eq!(b.trigger("ctrl-c again"), Triggered::GivingUp);
        assert!(b.giving_up());
        assert_eq!(b.reason().as_deref(), Some("ctrl-c"));
    }
}
