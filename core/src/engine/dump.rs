//! Driving CRIU's final dump so that the engine runs the hand-over at its
//! own top level, not inside a notification callback:
//! [`FinalDump::until_post_dump`] runs the dump up to CRIU's `post-dump`
//! notification (the tree frozen, every image written) and returns a
//! [`HeldDump`]; the engine does its phases; [`HeldDump::release`] answers
//! CRIU and follows the dump to its end.
//!
//! CRIU's own rules apply at `post-dump`: answering `false` (or the worker
//! losing its RPC peer) resumes the tree and unlocks its network exactly as
//! it was; answering `true` kills the tree.

use std::time::{Duration, Instant};

use super::error::HandOverError;
use crate::criu::rpc::{Opts, ReqType, Resp};
use crate::criu::{Criu, CriuError, Event};

/// What the dump asks of the engine while it runs (driver hooks, progress).
pub trait DumpHooks {
    /// CRIU is about to seize the tree (`pre-dump`).
    fn freezing(&mut self) {}
    /// CRIU asks to lock the tree's network (`network-lock`).
    fn net_lock(&mut self) -> Result<(), crate::Error> {
        Ok(())
    }
    /// CRIU asks to unlock it (`network-unlock`, after a failed dump).
    fn net_unlock(&mut self) {}
}

/// A final dump under way.
pub struct FinalDump {
    criu: Box<dyn Criu>,
    log: String,
    started: Instant,
}

/// A dump held at `post-dump`: the tree is frozen and stays so until
/// [`HeldDump::release`] (or until the worker is dropped, which resumes it).
pub struct HeldDump {
    criu: Box<dyn Criu>,
    log: String,
    /// When CRIU started seizing the tree.
    pub frozen_at: Instant,
    /// How long CRIU took from the request to `post-dump`.
    pub dump_time: Duration,
}

impl FinalDump {
    /// Sends the DUMP request (`opts` must ask for notifications).
    pub fn start(mut criu: Box<dyn Criu>, opts: Opts) -> Result<FinalDump, CriuError> {
        let log = opts.log_file.clone().unwrap_or_else(|| "dump.log".into());
        let started = Instant::now();
        criu.start(ReqType::Dump, opts)?;
        Ok(FinalDump { criu, log, started })
    }

    /// Follows the dump to `post-dump`, answering the notifications before
    /// it. A failure here means CRIU already resumed the tree (or never
    /// froze it). `deadline` bounds the wait.
    pub fn until_post_dump(
        mut self,
        hooks: &mut dyn DumpHooks,
        deadline: Option<Instant>,
    ) -> Result<HeldDump, HandOverError> {
        self.criu.set_deadline(deadline);
        let mut frozen_at = None;
        let mut failure: Option<HandOverError> = None;
        loop {
            match self.criu.next_event(ReqType::Dump)? {
                Event::Notify { script, .. } => {
                    tracing::debug!(%script, "CRIU notification");
                    let ok = match script.as_str() {
                        "pre-dump" => {
                            frozen_at = Some(Instant::now());
                            hooks.freezing();
                            true
                        }
                        "network-lock" => match hooks.net_lock() {
                            Ok(()) => true,
                            Err(e) => {
                                failure.get_or_insert(e.into());
                                false
                            }
                        },
                        "network-unlock" => {
                            hooks.net_unlock();
                            true
                        }
                        "post-dump" if failure.is_none() => {
                            self.criu.set_deadline(None);
                            return Ok(HeldDump {
                                criu: self.criu,
                                log: self.log,
                                frozen_at: frozen_at.unwrap_or(self.started),
                                dump_time: self.started.elapsed(),
                            });
                        }
                        "post-dump" => false,
                        _ => true,
                    };
                    self.criu.answer_notify(ok)?;
                }
                Event::Done(resp) => {
                    if let Some(f) = failure {
                        return Err(f);
                    }
                    self.criu.check_done(ReqType::Dump, &resp, &self.log)?;
                    return Err(HandOverError::Dump(
                        "CRIU finished the dump without a post-dump notification".into(),
                    ));
                }
            }
        }
    }
}

impl HeldDump {
    /// Answers `post-dump` and follows the dump to its end: `true` lets
    /// CRIU kill the source tree, `false` makes it resume the tree. Returns
    /// CRIU's final answer (checked: a failure after `true` is an error).
    pub fn release(
        mut self,
        ok: bool,
        hooks: &mut dyn DumpHooks,
        timeout: Duration,
    ) -> Result<Resp, CriuError> {
        self.criu.answer_notify(ok)?;
        self.criu.set_deadline(Some(Instant::now() + timeout));
        loop {
            match self.criu.next_event(ReqType::Dump)? {
                Event::Notify { script, .. } => {
                    if script == "network-unlock" {
                        hooks.net_unlock();
                    }
                    self.criu.answer_notify(true)?;
                }
                Event::Done(resp) => {
                    // The final dump was the worker's last request.
                    self.criu.wait_exit(Duration::from_secs(5));
                    if ok {
                        self.criu.check_done(ReqType::Dump, &resp, &self.log)?;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Whether CRIU died while holding the tree: then the tree was released
    /// and ran on from the dump, which is stale.
    pub fn criu_exited(&mut self) -> bool {
        self.criu.exited()
    }

    /// The worker's directory (logs, statistics).
    pub fn work_dir(&self) -> &std::path::Path {
        self.criu.work_dir()
    }
}
