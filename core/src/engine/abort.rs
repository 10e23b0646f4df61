//! [`Abort`]: how Ctrl-C (or an embedder) stops a migration from another
//! thread. Triggering it breaks the connections the engine is blocked on,
//! so every wait ends at once and the engine rolls back — unless the
//! migration has already committed, when aborting is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::conn::Conn;

/// A shared abort switch for one migration.
#[derive(Debug, Default)]
pub struct Abort {
    reason: Mutex<Option<String>>,
    committed: AtomicBool,
    watched: Mutex<Vec<Conn>>,
}

impl Abort {
    /// A new, untriggered switch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests an abort. Returns `false` (and does nothing) once the
    /// migration has committed: from then on only the destination can fail
    /// it, and the source must not resume on its own.
    pub fn trigger(&self, reason: &str) -> bool {
        if self.committed.load(Ordering::SeqCst) {
            return false;
        }
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        drop(r);
        for c in self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            c.shutdown();
        }
        true
    }

    /// The abort reason, if triggered.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

    /// Marks the commit point; later triggers are refused. Returns `false`
    /// if an abort came first.
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
