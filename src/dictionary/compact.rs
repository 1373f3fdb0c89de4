//! Compaction: a new log generation, a snapshot covering the older ones, their deletion;
//! a crash at any step leaves a loadable set of files.

use std::sync::Arc;
use std::time::Instant;


use super::*;
use crate::error::io_err;

impl FileDict {
    /// Whether enough records accumulated since the last snapshot to compact.
    pub fn compaction_due(&self) -> bool {
        self.log.lock().records_since_snapshot >= self.rewrite_threshold.min(MAX_RECORDS_PER_GENERATION)
    }

    pub fn last_compaction(&self) -> Option<Instant> {
        *self.last_compaction.lock()
    }

    /// Start a new log generation, write a snapshot covering the older ones, delete them.
    ///
    /// The snapshot is rebuilt from the files of the generations it covers (immutable once
    /// the new generation has started), not from the live tree: creates, lookups and
    /// renames never wait for it, however large the dictionary. It costs a second copy of
    /// the tree in memory while it runs.
    pub fn compact(&self) -> Result<(), DictError> {
        let _one = self.compact_lock.lock();
        let mut st = self.log.lock();
        // Everything queued goes into the old generation first.
        loop {
            if let Some(f) = &st.failed {
                return Err(DictError::Failed(f.clone()));
            }
            if st.syncing {
                self.log_cv.wait(&mut st);
            } else if !st.pending.is_empty() || st.durable_seq < st.next_seq - 1 {
                self.write_pending(&mut st);
                if st.batch_error.is_some() {
                    return Err(DictError::NoSpace);
                }
            } else {
                break;
            }
        }
        let info = SnapshotInfo { covers_gen: st.gen, last_seq: st.next_seq - 1 };
        let new_gen = st.gen + 1;
        let name = log_file_name(new_gen);
        let new_path = self.dir.join(&name);
        self.dir.write_durably(&name, &log::encode_header(new_gen, &self.instance)).map_err(io_err("create", &new_path))?;
        let file = self.dir.open(&name, libc::O_RDWR).map_err(io_err("open", &new_path))?;
        // The key dictionary learns the new generation before any record goes into it.
        self.store_mark(DictMark { gen: new_gen, seq: info.last_seq, clean: false })?;
        st.file = Arc::new(file);
        st.gen = new_gen;
        st.version = crate::codec::FORMAT_VERSION;
        st.seal = self.keys.log(new_gen);
        st.written = LOG_HEADER_LEN as u64;
        st.preallocated = 0;
        st.records_since_snapshot = 0;
        drop(st);
        crate::hooks::point("compact:building");
        let old = Self::replay(&self.dir, &self.keys, &self.instance, Some(info.covers_gen))?;
        if old.last_seq() != info.last_seq {
            return Err(DictError::Inconsistent(format!(
                "the logs up to generation {} end at record {}, expected {}",
                info.covers_gen,
                old.last_seq(),
                info.last_seq
            )));
        }
        let bytes = snapshot::encode(&old.tree, &self.keys, &self.instance, info);
        drop(old);
        let snap_path = self.dir.join(SNAPSHOT_FILE);
        self.dir.write_durably(SNAPSHOT_FILE, &bytes).map_err(io_err("write", &snap_path))?;
        for g in 1..=info.covers_gen {
            self.dir.remove_if_exists(&log_file_name(g)).map_err(io_err("remove", &self.log_path(g)))?;
        }
        self.dir.sync().map_err(io_err("fsync", self.dir.path()))?;
        *self.last_compaction.lock() = Some(Instant::now());
        crate::metrics::dictionary_compacted();
        tracing::info!(entries = self.tree.read().len(), generation = new_gen, "file dictionary compacted");
        Ok(())
    }
}
