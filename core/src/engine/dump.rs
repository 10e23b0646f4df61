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
    /// A driver's own dump was answered: wait for its tooling, running
    /// `meanwhile` every so often (it answers the notifications the
    /// tooling's CRIU still sends, such as `network-unlock` on a rollback).
    fn own_dump_finished(&mut self, _meanwhile: &mut dyn FnMut()) -> Result<(), crate::Error> {
        Ok(())
    }
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

/// A final dump run by a driver's own tooling (`Capabilities::OWN_DUMP`),
/// followed through phaul's action script ([`super::hold`]).
pub struct ScriptDump {
    hold: super::hold::ActionHold,
    /// When CRIU started seizing the tree.
    pub frozen_at: Instant,
    /// How long from the hook's start to `post-dump`.
    pub dump_time: Duration,
}

impl ScriptDump {
    /// Follows a dump the driver's tooling runs (its CRIU running `hold`'s
    /// script) to `post-dump`; `freezing` hears about the freeze.
    pub fn until_post_dump(
        mut hold: super::hold::ActionHold,
        freezing: &mut dyn FnMut(),
        deadline: Instant,
    ) -> Result<ScriptDump, HandOverError> {
        let started = Instant::now();
        let mut frozen_at = None;
        let io = |source| HandOverError::Io {
            what: "the action script's channel".into(),
            source,
        };
        loop {
            let Some((action, _pid)) = hold.next(deadline).map_err(io)? else {
                return Err(HandOverError::Dump(
                    "the driver's dump did not reach CRIU's post-dump notification before \
                     --freeze-timeout (is its CRIU run with the action script of the dump \
                     context?)"
                        .into(),
                ));
            };
            tracing::debug!(%action, "CRIU notification (driver's dump)");
            match action.as_str() {
                "pre-dump" => {
                    frozen_at = Some(Instant::now());
                    freezing();
                }
                "post-dump" => {
                    return Ok(ScriptDump {
                        hold,
                        frozen_at: frozen_at.unwrap_or(started),
                        dump_time: started.elapsed(),
                    })
                }
                _ => {}
            }
            hold.verdict(true).map_err(io)?;
        }
    }
}

/// The frozen tree, held at `post-dump` by phaul's own CRIU (RPC) or by a
/// driver's (action script).
pub enum Hold {
    /// phaul's CRIU worker.
    Criu(HeldDump),
    /// A driver's tooling.
    Script(Box<ScriptDump>),
}

impl Hold {
    /// When CRIU started seizing the tree.
    pub fn frozen_at(&self) -> Instant {
        match self {
            Hold::Criu(h) => h.frozen_at,
            Hold::Script(s) => s.frozen_at,
        }
    }

    /// How long CRIU took up to `post-dump`.
    pub fn dump_time(&self) -> Duration {
        match self {
            Hold::Criu(h) => h.dump_time,
            Hold::Script(s) => s.dump_time,
        }
    }

    /// Whether phaul's CRIU went away while it held the tree (the tree
    /// then ran on and the dump is stale). A driver's tooling is not
    /// watched this way: its CRIU dying fails its script, which resumes
    /// nothing by itself (CRIU does), and `dump_wait` reports it.
    pub fn criu_exited(&mut self) -> bool {
        match self {
            Hold::Criu(h) => h.criu_exited(),
            Hold::Script(_) => false,
        }
    }

    /// CRIU's log directory, when phaul ran it (statistics).
    pub fn work_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            Hold::Criu(h) => Some(h.work_dir().to_path_buf()),
            Hold::Script(_) => None,
        }
    }

    /// Answers `post-dump` (`true`: CRIU kills the tree; `false`: it
    /// resumes it) and follows the dump to its end (for a driver's
    /// tooling: its `dump_wait`).
    pub fn release(
        self,
        ok: bool,
        hooks: &mut dyn DumpHooks,
        timeout: Duration,
    ) -> Result<(), HandOverError> {
        match self {
            Hold::Criu(h) => h.release(ok, hooks, timeout).map(drop).map_err(Into::into),
            Hold::Script(mut s) => {
                s.hold.verdict(ok).map_err(|source| HandOverError::Io {
                    what: "the action script's channel".into(),
                    source,
                })?;
                // The tooling's CRIU still reports what follows the
                // verdict (network-unlock when it resumes the tree): let it
                // through, and tell the driver once the tooling is done.
                let mut unlocked = false;
                let r = hooks.own_dump_finished(&mut || {
                    unlocked |= s
                        .hold
                        .answer_pending(true)
                        .iter()
                        .any(|a| a == "network-unlock");
                });
                if unlocked {
                    hooks.net_unlock();
                }
                match (ok, r) {
                    (true, Err(e)) => Err(e.into()),
                    _ => Ok(()),
                }
            }
        }
    }
}
