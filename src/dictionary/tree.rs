//! The in-memory file dictionary: a trie of path components. A directory rename moves one
//! subtree (O(depth), not O(files below it)); lookups walk the components.
//!
//! Nothing here recurses per path component: any user of the mount can create a tree tens
//! of thousands of directories deep, and one stack frame per level would overflow a
//! request thread's stack on unlink, compaction or drop. Walks keep explicit stacks, and
//! `Node`'s drop takes its subtree apart iteratively.

use std::collections::{BTreeMap, HashMap};

use super::record::{Conversion, FileEntry, Intent, Job, Record};
use crate::crypto::Method;

#[derive(Default)]
pub struct Node {
    entry: Option<FileEntry>,
    children: Option<Box<HashMap<Box<[u8]>, Node>>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.children.is_none()
    }

    /// Every entry at or below this node, in no particular order.
    fn visit(&self, mut f: impl FnMut(&FileEntry)) {
        let mut stack = vec![self];
        while let Some(n) = stack.pop() {
            if let Some(e) = &n.entry {
                f(e);
            }
            stack.extend(n.children.iter().flat_map(|c| c.values()));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Detach every descendant onto a heap stack first, so each node is dropped with no
        // children left: the default drop would recurse once per level.
        let Some(children) = self.children.take() else { return };
        let mut stack: Vec<Node> = children.into_values().collect();
        while let Some(mut n) = stack.pop() {
            if let Some(c) = n.children.take() {
                stack.extend(c.into_values());
            }
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
    /// Entries per method, kept as entries come and go so that metrics and status never
    /// walk the tree for them.
    by_method: BTreeMap<Method, u64>,
    /// Renames announced but not yet resolved, by intent sequence number.
    intents: BTreeMap<u64, Intent>,
    /// Files in online conversion, by id. Few at a time (the converter does one file after
    /// another), so a path's conversion is found by scanning them.
    convs: BTreeMap<u64, Conversion>,
    job: Option<Job>,
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
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

    pub fn conversions(&self) -> impl Iterator<Item = &Conversion> {
        self.convs.values()
    }

    /// The conversion the file at `path` is in, if any.
    pub fn conversion_at(&self, path: &[u8]) -> Option<&Conversion> {
        self.convs.values().find(|c| c.paths.iter().any(|p| p == path))
    }

    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }

    pub fn set_job(&mut self, job: Option<Job>) {
        self.job = job;
    }

    /// Restore a conversion (snapshot load): its paths hold their old entries already.
    pub fn add_conversion(&mut self, c: Conversion) {
        self.count_key(c.new.key_id, true);
        self.convs.insert(c.id, c);
    }

    /// The conversion's new key is in use from its start to its end, whatever the paths.
    fn count_key(&mut self, key_id: u64, add: bool) {
        if key_id == 0 {
            return;
        }
        if add {
            *self.key_refs.entry(key_id).or_default() += 1;
        } else if let Some(n) = self.key_refs.get_mut(&key_id) {
            *n -= 1;
            if *n == 0 {
                self.key_refs.remove(&key_id);
            }
        }
    }

    /// Paths at or below `path` leave their conversions (the file was unlinked, replaced or
    /// re-keyed); a conversion left without paths is over (its file has no name).
    fn leave_conversions(&mut self, path: &[u8]) {
        let mut orphaned = Vec::new();
        for c in self.convs.values_mut() {
            c.paths.retain(|p| rebase(p, path, path).is_none());
            if c.paths.is_empty() {
                orphaned.push(c.id);
            }
        }
        for id in orphaned {
            let c = self.convs.remove(&id).expect("found above");
            self.count_key(c.new.key_id, false);
        }
    }

    /// Conversion paths follow a rename of `from` to `to` (or an exchange of the two).
    fn move_conversions(&mut self, from: &[u8], to: &[u8], exchange: bool) {
        for c in self.convs.values_mut() {
            for p in c.paths.iter_mut() {
                let moved = if exchange { rebase(p, from, to).or_else(|| rebase(p, to, from)) } else { rebase(p, from, to) };
                if let Some(np) = moved {
                    *p = np;
                }
            }
        }
    }

    /// Whether anything (an entry, or entries below) is recorded at `path`.
    pub fn has_node(&self, path: &[u8]) -> bool {
        self.node(&components(path)).is_some()
    }

    pub fn get(&self, path: &[u8]) -> Option<FileEntry> {
        self.node(&components(path))?.entry
    }

    /// Entries per method (methods without entries are absent).
    pub fn by_method(&self) -> &BTreeMap<Method, u64> {
        &self.by_method
    }

    fn count(&mut self, e: &FileEntry, add: bool) {
        let decrement = |m: &mut u64| {
            *m -= 1;
            *m == 0
        };
        if add {
            self.entries += 1;
            *self.by_method.entry(e.method).or_default() += 1;
            if e.key_id != 0 {
                *self.key_refs.entry(e.key_id).or_default() += 1;
            }
        } else {
            self.entries -= 1;
            if self.by_method.get_mut(&e.method).is_some_and(decrement) {
                self.by_method.remove(&e.method);
            }
            if e.key_id != 0 && self.key_refs.get_mut(&e.key_id).is_some_and(decrement) {
                self.key_refs.remove(&e.key_id);
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
        let removed = self.take(&comps, false)?.entry?;
        self.count(&removed, false);
        Some(removed)
    }

    /// Detach the whole subtree at `path`.
    fn detach(&mut self, path: &[u8]) -> Option<Node> {
        let comps = components(path);
        self.take(&comps, true).filter(|n| !n.is_empty())
    }

    fn node(&self, comps: &[&[u8]]) -> Option<&Node> {
        let mut n = &self.root;
        for c in comps {
            n = n.children.as_ref()?.get(*c)?;
        }
        Some(n)
    }

    fn node_mut(&mut self, comps: &[&[u8]]) -> Option<&mut Node> {
        let mut n = &mut self.root;
        for c in comps {
            n = n.children.as_mut()?.get_mut(*c)?;
        }
        Some(n)
    }

    /// Take the node at `comps` out of the tree: the whole subtree (`whole`), or only its
    /// entry (the returned node then has no children). Ancestors left empty are pruned.
    /// Iterative: one pass down to find how far up the pruning reaches, then one cut.
    fn take(&mut self, comps: &[&[u8]], whole: bool) -> Option<Node> {
        if comps.is_empty() {
            return None;
        }
        // `single[j]`: the node at comps[..j] holds nothing but the child comps[j], so it
        // becomes empty when that child does.
        let mut single = Vec::with_capacity(comps.len());
        let mut n = &self.root;
        for c in comps {
            let ch = n.children.as_ref()?;
            single.push(n.entry.is_none() && ch.len() == 1);
            n = ch.get(*c)?;
        }
        if !whole && n.children.is_some() {
            // The target keeps its children: take the entry only, nothing to prune.
            let entry = self.node_mut(comps)?.entry.take();
            return Some(Node { entry, children: None });
        }
        // Cut below the deepest ancestor that keeps something (never the root itself).
        let mut cut = comps.len() - 1;
        while cut > 0 && single[cut] {
            cut -= 1;
        }
        let parent = self.node_mut(&comps[..cut]).expect("walked above");
        let children = parent.children.as_mut().expect("walked above");
        let mut chain = children.remove(comps[cut]).expect("walked above");
        if children.is_empty() {
            parent.children = None;
        }
        // Down the detached chain of otherwise empty nodes to the target.
        for c in &comps[cut + 1..] {
            let mut ch = chain.children.take().expect("a chain node has its one child");
            chain = ch.remove(*c).expect("walked above");
        }
        if whole {
            Some(chain)
        } else {
            Some(Node { entry: chain.entry.take(), children: None })
        }
    }

    /// Drop the subtree at `path`, un-counting its entries.
    fn drop_subtree(&mut self, path: &[u8]) {
        if let Some(old) = self.detach(path) {
            let mut dropped = Vec::new();
            old.visit(|e| dropped.push(*e));
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
        self.leave_conversions(to);
        self.move_conversions(from, to, false);
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
        self.move_conversions(a, b, true);
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
            Record::Put { path, entry } => {
                self.leave_conversions_exact(path);
                self.put(path, *entry)
            }
            Record::Delete { path } => {
                self.leave_conversions_exact(path);
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
            Record::ConvertStart { path, new } => {
                let old = self.get(path).ok_or_else(|| Inconsistent(format!("conversion of {} without an entry", show(path))))?;
                if self.conversion_at(path).is_some() {
                    return Err(Inconsistent(format!("second conversion of {}", show(path))));
                }
                self.add_conversion(Conversion { id: seq, old, new: *new, mark: 0, paths: vec![path.clone()] });
            }
            // A conversion whose file lost all its names is over: later records of it (the
            // converter may not know yet) change nothing.
            Record::ConvertMark { id, mark } => {
                if let Some(c) = self.convs.get_mut(id) {
                    c.mark = *mark;
                }
            }
            Record::ConvertLink { id, path } => {
                let c = self.convs.get(id).ok_or_else(|| Inconsistent(format!("link {} joins unknown conversion #{id}", show(path))))?;
                let old = c.old;
                self.leave_conversions_exact(path);
                self.put(path, old);
                self.convs.get_mut(id).expect("checked").paths.push(path.clone());
            }
            Record::ConvertDone { id } => {
                if let Some(c) = self.convs.remove(id) {
                    for p in &c.paths {
                        self.put(p, c.new);
                    }
                    self.count_key(c.new.key_id, false);
                }
            }
            Record::SetJob { job } => self.job = job.clone(),
        }
        Ok(())
    }

    /// `path` (a file) leaves its conversion, if it is in one.
    fn leave_conversions_exact(&mut self, path: &[u8]) {
        if self.conversion_at(path).is_some() {
            self.leave_conversions(path);
        }
    }

    /// Every entry with its full path, depth first (an explicit stack: see the module doc).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &FileEntry)) {
        let mut path: Vec<u8> = Vec::new();
        // (length of the parent's path, name, node)
        let mut stack: Vec<(usize, &[u8], &Node)> = Vec::new();
        if let Some(e) = &self.root.entry {
            f(&path, e);
        }
        stack.extend(self.root.children.iter().flat_map(|c| c.iter()).map(|(k, n)| (0, &k[..], n)));
        while let Some((parent_len, name, n)) = stack.pop() {
            path.truncate(parent_len);
            path.push(b'/');
            path.extend_from_slice(name);
            if let Some(e) = &n.entry {
                f(&path, e);
            }
            let here = path.len();
            stack.extend(n.children.iter().flat_map(|c| c.iter()).map(|(k, c)| (here, &k[..], c)));
        }
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

    /// A tree 100,000 directories deep (any user of the mount can make one): every
    /// operation, and dropping it, runs on a thread with a 256 KiB stack, where one frame
    /// per level would overflow.
    #[test]
    fn hundred_thousand_levels_need_no_stack() {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let deep: Vec<u8> = (0..100_000).flat_map(|_| *b"/d").collect();
                let mut t = Tree::default();
                let file = [&deep[..], b"/f"].concat();
                t.put(&file, e(1));
                t.put(b"/top", e(2));
                assert_eq!(t.get(&file), Some(e(1)));
                assert!(t.has_node(&deep));
                let mut seen = 0;
                t.for_each(|p, _| seen += p.len());
                assert_eq!(seen, file.len() + 4);
                // A directory rename near the top moves the whole chain.
                t.apply(1, &Record::RenameIntent { from: b"/d".to_vec(), to: b"/e".to_vec(), from_ino: 1, exchange: false }).unwrap();
                t.apply(2, &Record::RenameDone { intent: 1 }).unwrap();
                let moved = [b"/e".as_slice(), &file[2..]].concat();
                assert_eq!(t.get(&moved), Some(e(1)));
                assert_eq!(t.remove(&moved), Some(e(1)));
                assert!(!t.has_node(b"/e"), "the emptied chain is pruned");
                t.put(&moved, e(3));
                t.put(&[&moved[..], b"/under"].concat(), e(4));
                assert_eq!(t.remove(&moved), Some(e(3)), "an entry with children below it");
                assert_eq!(t.len(), 2);
                assert_eq!(t.by_method().get(&Method::Aes256Ctr), Some(&2));
                drop(t);
                let mut t = Tree::default();
                t.put(&file, e(5));
                t.apply(3, &Record::RenameIntent { from: b"/x".to_vec(), to: b"/d".to_vec(), from_ino: 1, exchange: false }).unwrap();
                t.apply(4, &Record::RenameDone { intent: 3 }).unwrap(); // replaces the deep chain
                assert!(t.is_empty());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn counts_per_method_follow_puts_and_removes() {
        let mut t = Tree::default();
        let sm4 = FileEntry { method: Method::Sm4Ctr, key_id: 9, iv: [0; 16] };
        t.put(b"/a", e(1));
        t.put(b"/b", sm4);
        t.put(b"/c", FileEntry::plaintext());
        t.put(b"/a", sm4); // replaced
        assert_eq!(t.by_method().get(&Method::Sm4Ctr), Some(&2));
        assert_eq!(t.by_method().get(&Method::Aes256Ctr), None);
        assert_eq!(t.by_method().get(&Method::Plaintext), Some(&1));
        t.remove(b"/b");
        t.remove(b"/c");
        assert_eq!(t.by_method().iter().collect::<Vec<_>>(), vec![(&Method::Sm4Ctr, &1)]);
    }


    /// A conversion's paths follow renames, exchanges and links; unlinks and re-keying take
    /// paths out of it; `ConvertDone` puts the new entry at every path it still has; the new
    /// key counts as used from start to end.
    #[test]
    fn conversions_follow_the_namespace() {
        let mut t = Tree::default();
        let (old, new) = (e(1), e(2));
        t.put(b"/d/a", old);
        t.put(b"/x", e(3));
        let conv = |t: &Tree| t.conversions().next().map(|c| (c.mark, c.paths.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>()));
        t.apply(10, &Record::ConvertStart { path: b"/d/a".to_vec(), new }).unwrap();
        assert!(t.apply(11, &Record::ConvertStart { path: b"/d/a".to_vec(), new }).is_err(), "one conversion per file");
        assert!(t.apply(11, &Record::ConvertStart { path: b"/none".to_vec(), new }).is_err(), "only recorded files");
        assert_eq!(t.key_refs().get(&2), Some(&1));
        t.apply(12, &Record::ConvertMark { id: 10, mark: 1 << 20 }).unwrap();
        t.apply(13, &Record::ConvertLink { id: 10, path: b"/l".to_vec() }).unwrap();
        assert_eq!(t.get(b"/l"), Some(old), "a new link records the old entry");
        assert!(t.apply(14, &Record::ConvertLink { id: 99, path: b"/m".to_vec() }).is_err());
        // A directory rename moves the path; an exchange swaps it.
        t.apply(15, &Record::RenameIntent { from: b"/d".to_vec(), to: b"/e".to_vec(), from_ino: 5, exchange: false }).unwrap();
        t.apply(16, &Record::RenameDone { intent: 15 }).unwrap();
        assert_eq!(conv(&t), Some((1 << 20, vec!["/e/a".into(), "/l".into()])));
        t.apply(17, &Record::RenameIntent { from: b"/e/a".to_vec(), to: b"/x".to_vec(), from_ino: 6, exchange: true }).unwrap();
        t.apply(18, &Record::RenameDone { intent: 17 }).unwrap();
        assert_eq!(conv(&t), Some((1 << 20, vec!["/x".into(), "/l".into()])));
        assert_eq!(t.conversion_at(b"/x").map(|c| c.id), Some(10));
        assert_eq!(t.conversion_at(b"/e/a"), None);
        // A rename onto a path of the conversion replaces that file.
        t.apply(19, &Record::RenameIntent { from: b"/e/a".to_vec(), to: b"/l".to_vec(), from_ino: 7, exchange: false }).unwrap();
        t.apply(20, &Record::RenameDone { intent: 19 }).unwrap();
        assert_eq!(conv(&t), Some((1 << 20, vec!["/x".into()])));
        // Done: the new entry everywhere; the old key is no longer used by it.
        t.apply(21, &Record::ConvertLink { id: 10, path: b"/l2".to_vec() }).unwrap();
        t.apply(22, &Record::ConvertDone { id: 10 }).unwrap();
        assert_eq!((t.get(b"/x"), t.get(b"/l2")), (Some(new), Some(new)));
        assert_eq!(t.conversions().count(), 0);
        assert_eq!(t.key_refs().get(&2), Some(&2), "one per path, none for the finished conversion");
        // Unlinking every path ends a conversion; its later records change nothing.
        t.put(b"/y", old);
        t.apply(30, &Record::ConvertStart { path: b"/y".to_vec(), new }).unwrap();
        t.apply(31, &Record::Delete { path: b"/y".to_vec() }).unwrap();
        assert_eq!(t.conversions().count(), 0);
        t.apply(32, &Record::ConvertMark { id: 30, mark: 4096 }).unwrap();
        t.apply(33, &Record::ConvertDone { id: 30 }).unwrap();
        assert_eq!(t.get(b"/y"), None);
        // Re-keying (a Put) takes the file out of its conversion.
        t.put(b"/z", old);
        t.apply(40, &Record::ConvertStart { path: b"/z".to_vec(), new }).unwrap();
        t.apply(41, &Record::Put { path: b"/z".to_vec(), entry: e(4) }).unwrap();
        assert_eq!(t.conversions().count(), 0);
        assert_eq!(t.key_refs().get(&2), Some(&2));
    }
}
