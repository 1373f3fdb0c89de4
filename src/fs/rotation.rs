//! Data-key rotation and garbage collection of data keys no file uses, for the running
//! mount (the key store itself is `keys::store`).

use super::volume::Volume;
use super::errno::Result;

impl Volume {
    /// Make a new data key if the current one is older than the rotation period or has
    /// another method than the configured one (no-op for the plaintext method).
    pub fn rotate_data_key_if_due(&self) -> Result<()> {
        self.keys.key_for_new_file(self.opts.method, self.opts.rotation)?;
        Ok(())
    }

    /// Delete data keys that no dictionary entry and no file in use references (never the
    /// current key). Returns how many were deleted.
    ///
    /// The decision is taken under `key_use` (exclusive): no file is then between "took
    /// the current key" and "its record is queued", so every key a file will ever record is
    /// either referenced already or the current one, which is never deleted. Keys not
    /// current at that moment can never be handed out again, so the deletion itself (a
    /// durable rewrite of the key dictionary) runs after the lock is released. Entries of
    /// staged copies (`.tdefs.convert/`) and of renames not yet concluded are in the tree
    /// like any other, so their keys count as used.
    pub fn collect_unused_keys(&self) -> Result<usize> {
        // Keys of files in memory first, before `key_use` (an inode's data lock comes
        // before it). A file's key changes only to a key taken under `key_use`.
        let mut used = std::collections::HashSet::new();
        self.inodes.for_each(|i| {
            let st = i.data.read();
            used.extend(st.entry.iter().chain(st.conv.as_ref().map(|c| &c.new)).map(|e| e.key_id));
        });
        let unused = {
            let _decide = self.key_use.write();
            crate::hooks::point("gc:deciding");
            let current = self.keys.current().map(|k| k.id);
            used.extend(self.dict.with_tree(|t| t.key_refs().keys().copied().collect::<Vec<_>>()));
            unused_keys(&self.keys.keys().iter().map(|k| k.id).collect::<Vec<_>>(), &used, current)
        };
        if unused.is_empty() {
            return Ok(0);
        }
        let n = self.keys.remove_keys(&unused)?;
        if n > 0 {
            tracing::info!(removed = n, "deleted data keys that no file uses any more");
        }
        Ok(n)
    }
}

/// Proof that `key_use` is held shared (see `new_entry`).
pub(super) type KeyUse<'a> = parking_lot::RwLockReadGuard<'a, ()>;

/// The keys among `all` that key GC may delete: not in `used`, not the current one.
pub(super) fn unused_keys(all: &[u64], used: &std::collections::HashSet<u64>, current: Option<u64>) -> Vec<u64> {
    all.iter().copied().filter(|id| !used.contains(id) && Some(*id) != current).collect()
}
