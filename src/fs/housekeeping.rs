//! Background upkeep while mounted: dictionary records queued lazily reach the disk within
//! a second, the dictionary is compacted when due, the data key rotates when its period is
//! up (not only when a file is next created), data keys no file uses are deleted, and the
//! key dictionary learns how far the file dictionary is durable (a checkpoint of its mark).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::volume::Volume;

pub struct Housekeeping {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Seconds between data-key rotation checks, unused-key collections and checkpoints of
/// the dictionary's mark (each a rewrite of the small key dictionary when it has changed).
const ROTATION_CHECK: u64 = 10;
const KEY_GC: u64 = 60;
const CHECKPOINT: u64 = 30;

impl Housekeeping {
    pub fn start(volume: Arc<Volume>) -> Housekeeping {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tdefs-housekeeping".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut tick: u64 = 0;
                let mut stopped = lock.lock();
                while !*stopped {
                    cv.wait_for(&mut stopped, Duration::from_secs(1));
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    tick += 1;
                    let dict = volume.dict();
                    if dict.has_pending() {
                        if let Err(e) = dict.flush() {
                            tracing::warn!(error = %e, "background dictionary flush failed");
                        }
                    }
                    if dict.compaction_due() {
                        if let Err(e) = dict.compact() {
                            tracing::warn!(error = %e, "dictionary compaction failed; will retry");
                        }
                    }
                    if tick % ROTATION_CHECK == 0 {
                        if let Err(e) = volume.rotate_data_key_if_due() {
                            tracing::warn!(error = %e, "data key rotation failed; will retry");
                        }
                    }
                    if tick % CHECKPOINT == 0 {
                        if let Err(e) = dict.checkpoint() {
                            tracing::warn!(error = %e, "recording the dictionary's position failed; will retry");
                        }
                    }
                    if tick % KEY_GC == 0 {
                        if let Err(e) = volume.collect_unused_keys() {
                            tracing::warn!(error = %e, "deleting unused data keys failed; will retry");
                        }
                    }
                    stopped = lock.lock();
                }
            })
            .expect("spawn the housekeeping thread");
        Housekeeping { stop, thread: Some(thread) }
    }
}

impl Drop for Housekeeping {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
