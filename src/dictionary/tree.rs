//! The in-memory file dictionary: a trie of path components. A directory rename moves one
//! subtree (O(depth), not O(files below it)); lookups walk the components.

use std::collections::{BTreeMap, HashMap};

use super::record::{FileEntry, Intent, Record};

#[derive(Default)]
pub struct Node {
    entry: Option<FileEntry>,
    children: Option<Box<HashMap<Box<[u8]>, Node>>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.children.is_none()
    }

    fn visit(&self, f: &mut impl FnMut(&FileEntry)) {
        if let Some(e) = &self.entry {
            f(e);
        }
        for c in self.children.iter().flat_map(|c| c.values()) {
            c.visit(f);
        }
    }
}

/// Why a record could not be applied: the log contradicts itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Inconsistent(pub String);

#[derive(Default)]
pub struct Tree {
    root: Node,
    entries: usize,
    /// Data key id -> number of entries using it (decides which keys may be dropped).
    key_refs: HashMap<u64, u64>,
    /// Renames announced but not yet resolved, by intent sequence number.
    intents: BTreeMap<u64, Intent>,
}

fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect()
}

/// `path` re-rooted from `from` to `to` when it is `from` or lies below it.
fn rebase(path: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let rest = path.strip_prefix(from)?;
    if rest.is_empty() || rest[0] == b'/' {
        Some([to, rest].concat())
    } else {
        None
    }
}

impl Tree {
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub fn key_refs(&self) -> &HashMap<u64, u64> {
        &self.key_refs
    }

    pub fn intents(&self) -> impl Iterator<Item = &Intent> {
        self.intents.values()
    }

    /// Whether anything (an entry, or entries below) is recorded at `path`.
    pub fn has_node(&self, path: &[u8]) -> bool {
        let mut n = &self.root;
        for c in components(path) {
            match n.children.as_ref().and_then(|ch| ch.get(c)) {
                Some(c) => n = c,
                None => return false,
            }
        }
        true
    }

    pub fn get(&self, path: &[u8]) -> Option<FileEntry> {
        let mut n = &self.root;
        for c in components(path) {
            n = n.children.as_ref()?.get(c)?;
        }
        n.entry
    }

    fn count(&mut self, e: &FileEntry, add: bool) {
        if add {
            self.entries += 1;
            if e.key_id != 0 {
                *self.key_refs.entry(e.key_id).or_default() += 1;
            }
        } else {
            self.entries -= 1;
            if e.key_id != 0 {
                if let Some(n) = self.key_refs.get_mut(&e.key_id) {
                    *n -= 1;
                    if *n == 0 {
                        self.key_refs.remove(&e.key_id);
                    }
                }
            }
        }
    }

    pub fn put(&mut self, path: &[u8], entry: FileEntry) {
        let comps = components(path);
        if comps.is_empty() {
            return;
        }
        let mut n = &mut self.root;
        for c in comps {
            n = n.children.get_or_insert_with(Default::default).entry(c.into()).or_default();
        }
        let old = n.entry.replace(entry);
        if let Some(old) = old {
            self.count(&old, false);
        }
        self.count(&entry, true);
    }

    /// Remove the entry at `path` (not what lies below it).
    pub fn remove(&mut self, path: &[u8]) -> Option<FileEntry> {
        let comps = components(path);
        let removed = Self::edit(&mut self.root, &comps, &mut |n| n.entry.take())?;
        self.count(&removed, false);
        Some(removed)
    }

    /// Walk to `comps`, run `f` on that node, then prune nodes left empty on the way back.
    fn edit<T>(n: &mut Node, comps: &[&[u8]], f: &mut impl FnMut(&mut Node) -> Option<T>) -> Option<T> {
        let (first, rest) = comps.split_first()?;
        let children = n.children.as_mut()?;
        let child = children.get_mut(*first)?;
        let r = if rest.is_empty() { f(child) } else { Self::edit(child, rest, f) };
        if child.is_empty() {
            children.remove(*first);
            if children.is_empty() {
                n.children = None;
            }
        }
        r
    }

    /// Detach the whole subtree at `path`.
    fn detach(&mut self, path: &[u8]) -> Option<Node> {
        let comps = components(path);
        Self::edit(&mut self.root, &comps, &mut |n| {
            let taken = std::mem::take(n);
            (!taken.is_empty()).then_some(taken)
        })
    }

    /// Drop the subtree at `path`, un-counting its entries.
    fn drop_subtree(&mut self, path: &[u8]) {
        if let Some(old) = self.detach(path) {
            let mut dropped = Vec::new();
            old.visit(&mut |e| dropped.push(*e));
            for e in dropped {
                self.count(&e, false);
            }
        }
    }

    /// Place `node` at `path`, which must hold nothing.
    fn attach(&mut self, path: &[u8], node: Node) {
        let comps = components(path);
        let Some((last, parents)) = comps.split_last() else { return };
        let mut n = &mut self.root;
        for c in parents {
            n = n.children.get_or_insert_with(Default::default).entry((*c).into()).or_default();
        }
        n.children.get_or_insert_with(Default::default).insert((*last).into(), node);
    }

    /// Move everything at and below `from` to `to`, replacing what was there. A source with
    /// no entries (a plaintext file) still clears the destination.
    fn rename(&mut self, from: &[u8], to: &[u8]) {
        if from == to {
            return;
        }
        let moved = self.detach(from);
        self.drop_subtree(to);
        if let Some(n) = moved {
            self.attach(to, n);
        }
        for i in self.intents.values_mut() {
            for p in [&mut i.from, &mut i.to] {
                if let Some(np) = rebase(p, from, to) {
                    *p = np;
                }
            }
        }
    }

    fn exchange(&mut self, a: &[u8], b: &[u8]) {
        if a == b {
            return;
        }
        let na = self.detach(a);
        let nb = self.detach(b);
        if let Some(n) = na {
            self.attach(b, n);
        }
        if let Some(n) = nb {
            self.attach(a, n);
        }
        for i in self.intents.values_mut() {
            for p in [&mut i.from, &mut i.to] {
                if let Some(np) = rebase(p, a, b).or_else(|| rebase(p, b, a)) {
                    *p = np;
                }
            }
        }
    }

    /// Apply the effect of the rename announced by `intent`.
    pub fn complete_rename(&mut self, intent: u64) -> Result<(), Inconsistent> {
        let i = self
            .intents
            .remove(&intent)
            .ok_or_else(|| Inconsistent(format!("rename outcome for unknown intent #{intent}")))?;
        if i.exchange {
            self.exchange(&i.from, &i.to);
        } else {
            self.rename(&i.from, &i.to);
        }
        Ok(())
    }

    pub fn add_intent(&mut self, i: Intent) {
        self.intents.insert(i.seq, i);
    }

    pub fn apply(&mut self, seq: u64, rec: &Record) -> Result<(), Inconsistent> {
        match rec {
            Record::Put { path, entry } => self.put(path, *entry),
            Record::Delete { path } => {
                self.remove(path);
            }
            Record::RenameIntent { from, to, from_ino, exchange } => self.add_intent(Intent {
                seq,
                from: from.clone(),
                to: to.clone(),
                from_ino: *from_ino,
                exchange: *exchange,
            }),
            Record::RenameDone { intent } => self.complete_rename(*intent)?,
            Record::RenameAbort { intent } => {
                self.intents
                    .remove(intent)
                    .ok_or_else(|| Inconsistent(format!("rename abort for unknown intent #{intent}")))?;
            }
        }
        Ok(())
    }

    /// Every entry with its full path, depth first.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &FileEntry)) {
        fn walk(n: &Node, path: &mut Vec<u8>, f: &mut impl FnMut(&[u8], &FileEntry)) {
            if let Some(e) = &n.entry {
                f(path, e);
            }
            for (name, c) in n.children.iter().flat_map(|c| c.iter()) {
                let len = path.len();
                path.push(b'/');
                path.extend_from_slice(name);
                walk(c, path, f);
                path.truncate(len);
            }
        }
        walk(&self.root, &mut Vec::new(), &mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Method;

    fn e(k: u64) -> FileEntry {
        FileEntry { method: Method::Aes256Ctr, key_id: k, iv: [k as u8; 16] }
    }

    fn all(t: &Tree) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        t.for_each(|p, e| v.push((String::from_utf8_lossy(p).into_owned(), e.key_id)));
        v.sort();
        v
    }

    #[test]
    fn put_get_remove_prunes() {
        let mut t = Tree::default();
        t.put(b"/a/b/c", e(1));
        t.put(b"/a/b", e(2));
        assert_eq!(t.get(b"/a/b/c"), Some(e(1)));
        assert_eq!(t.get(b"/a/b"), Some(e(2)));
        assert_eq!(t.get(b"/a"), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove(b"/a/b/c"), Some(e(1)));
        assert_eq!(t.remove(b"/a/b/c"), None);
        assert_eq!(t.remove(b"/a/b"), Some(e(2)));
        assert!(t.root.is_empty(), "empty nodes pruned");
        assert!(t.key_refs.is_empty());
    }

    #[test]
    fn directory_rename_moves_subtree_and_replaces_target() {
        let mut t = Tree::default();
        t.put(b"/d/x", e(1));
        t.put(b"/d/sub/y", e(2));
        t.put(b"/dd/z", e(3)); // shares a prefix string, not a path prefix
        t.put(b"/e/stale", e(4));
        t.apply(10, &Record::RenameIntent { from: b"/d".to_vec(), to: b"/e".to_vec(), from_ino: 5, exchange: false }).unwrap();
        t.apply(11, &Record::RenameDone { intent: 10 }).unwrap();
        assert_eq!(all(&t), vec![("/dd/z".into(), 3), ("/e/sub/y".into(), 2), ("/e/x".into(), 1)]);
        assert_eq!(t.key_refs.get(&4), None);
        assert!(t.apply(12, &Record::RenameDone { intent: 10 }).is_err(), "done twice");
    }

    #[test]
    fn rename_of_plaintext_file_clears_destination() {
        let mut t = Tree::default();
        t.put(b"/old", e(1));
        t.add_intent(Intent { seq: 1, from: b"/plain".to_vec(), to: b"/old".to_vec(), from_ino: 9, exchange: false });
        t.complete_rename(1).unwrap();
        assert_eq!(t.get(b"/old"), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn exchange_swaps() {
        let mut t = Tree::default();
        t.put(b"/a/f", e(1));
        t.put(b"/b", e(2));
        t.add_intent(Intent { seq: 1, from: b"/a".to_vec(), to: b"/b".to_vec(), from_ino: 9, exchange: true });
        t.complete_rename(1).unwrap();
        assert_eq!(all(&t), vec![("/a".into(), 2), ("/b/f".into(), 1)]);
    }

    #[test]
    fn pending_intents_follow_directory_renames() {
        let mut t = Tree::default();
        t.put(b"/d/f", e(1));
        t.add_intent(Intent { seq: 1, from: b"/d/f".to_vec(), to: b"/d/g".to_vec(), from_ino: 9, exchange: false });
        t.add_intent(Intent { seq: 2, from: b"/d".to_vec(), to: b"/e".to_vec(), from_ino: 8, exchange: false });
        t.complete_rename(2).unwrap();
        let i = t.intents().next().unwrap();
        assert_eq!((&i.from[..], &i.to[..]), (&b"/e/f"[..], &b"/e/g"[..]));
        t.complete_rename(1).unwrap();
        assert_eq!(all(&t), vec![("/e/g".into(), 1)]);
    }
}
