//! Named points where tests step into the code.
//!
//! - [`crash`]: with `TDEFS_FAULT=NAME` in the environment the process aborts at point NAME,
//!   as a crash at that instant would stop it (crash tests across processes). With
//!   `TDEFS_FAULT=panic:NAME` it panics there instead (the request-panic test), and with
//!   `TDEFS_FAULT=stop:NAME` it stops itself (SIGSTOP) so a test can inspect the process.
//!   `TDEFS_FAULT_AFTER=N` lets the first N arrivals at the point pass.
//! - [`point`]: a test in the same process installs a callback ([`install`]) that runs at
//!   every named point, to force an interleaving (pause one thread while another acts).
//!   The callback runs only on the installing thread and on threads that [`Scope::enter`]
//!   its scope: tests run in parallel in one process, and a hook must never stop another
//!   test's compaction or walk. Installs are serialized for the same reason.
//!
//! Unused, a point costs one relaxed atomic load (and `crash` one string comparison).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, MutexGuard, RwLock};

type Hook = Arc<dyn Fn(&str) + Send + Sync>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static HOOK: RwLock<Option<(u64, Hook)>> = RwLock::new(None);
static INSTALLS: Mutex<()> = Mutex::new(());
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The hook scope this thread follows (0: none).
    static SCOPE: Cell<u64> = const { Cell::new(0) };
}

/// Run the installed test callback, if any and if this thread follows its scope, at `name`.
#[inline]
pub fn point(name: &str) {
    if ENABLED.load(Ordering::Relaxed) {
        let hook = HOOK.read().clone();
        if let Some((scope, h)) = hook {
            if SCOPE.with(|s| s.get()) == scope {
                h(name);
            }
        }
    }
}

/// Install `f` to run at every [`point`] reached by this thread (or by threads that enter
/// [`Installed::scope`]) until the returned guard is dropped.
pub fn install(f: impl Fn(&str) + Send + Sync + 'static) -> Installed {
    let serial = INSTALLS.lock();
    let scope = NEXT_SCOPE.fetch_add(1, Ordering::Relaxed);
    SCOPE.with(|s| s.set(scope));
    *HOOK.write() = Some((scope, Arc::new(f)));
    ENABLED.store(true, Ordering::SeqCst);
    Installed { scope, _serial: serial }
}

/// Removes the callback when dropped.
pub struct Installed {
    scope: u64,
    _serial: MutexGuard<'static, ()>,
}

impl Installed {
    /// A handle another thread uses to follow this hook.
    pub fn scope(&self) -> Scope {
        Scope(self.scope)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::SeqCst);
        *HOOK.write() = None;
        SCOPE.with(|s| s.set(0));
    }
}

/// A hook scope, to be entered by a thread the test spawns.
#[derive(Clone, Copy)]
pub struct Scope(u64);

impl Scope {
    /// Make the current thread run the hook of this scope.
    pub fn enter(self) {
        SCOPE.with(|s| s.set(self.0));
    }
}

/// What `TDEFS_FAULT` asks for at one point.
enum Fault {
    Abort,
    Panic,
    Stop,
}

fn wanted(name: &str) -> Option<Fault> {
    static WANT: OnceLock<Option<String>> = OnceLock::new();
    let want = WANT.get_or_init(|| std::env::var("TDEFS_FAULT").ok()).as_deref()?;
    match want.split_once(':') {
        Some(("panic", n)) if n == name => Some(Fault::Panic),
        Some(("stop", n)) if n == name => Some(Fault::Stop),
        _ if want == name => Some(Fault::Abort),
        _ => None,
    }
    .filter(|_| past_skips())
}

/// `TDEFS_FAULT_AFTER=N`: the first N times the point is reached pass (crash in the middle
/// of a loop, not at its first step).
fn past_skips() -> bool {
    static SKIP: OnceLock<u64> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let skip = *SKIP.get_or_init(|| std::env::var("TDEFS_FAULT_AFTER").ok().and_then(|s| s.parse().ok()).unwrap_or(0));
    SEEN.fetch_add(1, Ordering::SeqCst) >= skip
}

/// Crash tests: see the module doc.
pub fn crash(name: &str) {
    match wanted(name) {
        None => {}
        Some(Fault::Abort) => {
            eprintln!("tdefs: TDEFS_FAULT: crashing at {name}");
            std::process::abort();
        }
        Some(Fault::Panic) => panic!("TDEFS_FAULT: panic at {name}"),
        Some(Fault::Stop) => unsafe {
            libc::raise(libc::SIGSTOP);
        },
    }
}
