//! Named points where tests step into the code.
//!
//! - [`crash`]: with `TDEFS_FAULT=NAME` in the environment the process aborts at point NAME,
//!   as a crash at that instant would stop it (crash tests across processes). With
//!   `TDEFS_FAULT=panic:NAME` it panics there instead (the request-panic test), and with
//!   `TDEFS_FAULT=stop:NAME` it stops itself (SIGSTOP) so a test can inspect the process.
//! - [`point`]: a test in the same process installs a callback ([`install`]) that runs at
//!   every named point, to force an interleaving (pause one thread while another acts).
//!
//! Unused, a point costs one relaxed atomic load (and `crash` one string comparison).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;

type Hook = Arc<dyn Fn(&str) + Send + Sync>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Run the installed test callback, if any, at point `name`.
#[inline]
pub fn point(name: &str) {
    if ENABLED.load(Ordering::Relaxed) {
        let hook = HOOK.read().clone();
        if let Some(h) = hook {
            h(name);
        }
    }
}

/// Install `f` to run at every [`point`] until the returned guard is dropped.
pub fn install(f: impl Fn(&str) + Send + Sync + 'static) -> Installed {
    *HOOK.write() = Some(Arc::new(f));
    ENABLED.store(true, Ordering::SeqCst);
    Installed(())
}

/// Removes the callback when dropped.
pub struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::SeqCst);
        *HOOK.write() = None;
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
