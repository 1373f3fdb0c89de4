//! File dictionary: durability, recovery from torn writes and interrupted compaction,
//! and refusal of damaged or foreign files.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::crypto::{Method, Secret};

const INST: [u8; 16] = [7; 16];

fn seal() -> SealKey {
    SealKey::new(&Secret::new(vec![0x42; 32]))
}

fn entry(i: u64) -> FileEntry {
    FileEntry { method: Method::Aes256Ctr, key_id: 1 + i % 3, iv: [i as u8; 16] }
}

fn new_dict(dir: &Path) -> FileDict {
    FileDict::create(dir, &seal(), &INST).unwrap();
    open(dir)
}

fn open(dir: &Path) -> FileDict {
    let l = FileDict::load(dir, &seal(), &INST).unwrap();
    FileDict::open_writable(l, &seal(), &INST, 1_000_000).unwrap()
}

fn put(d: &FileDict, path: &str, i: u64) {
    let seq = d.submit(Record::Put { path: path.into(), entry: entry(i) }).unwrap();
    d.sync(seq).unwrap();
}

fn snapshot_of(d: &FileDict) -> Vec<(Vec<u8>, FileEntry)> {
    let mut v = Vec::new();
    d.with_tree(|t| t.for_each(|p, e| v.push((p.to_vec(), *e))));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn round_trip_with_renames_and_deletes() {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    put(&dict, "/a/x", 1);
    put(&dict, "/a/y", 2);
    put(&dict, "/b", 3);
    let i = dict.submit(Record::RenameIntent { from: b"/a".to_vec(), to: b"/c".to_vec(), from_ino: 9, exchange: false }).unwrap();
    dict.submit(Record::RenameDone { intent: i }).unwrap();
    dict.submit(Record::Delete { path: b"/b".to_vec() }).unwrap();
    dict.flush().unwrap();
    let before = snapshot_of(&dict);
    drop(dict);
    let again = open(d.path());
    assert_eq!(snapshot_of(&again), before);
    assert_eq!(again.get(b"/c/x"), Some(entry(1)));
    assert_eq!(again.get(b"/a/x"), None);
    assert_eq!(again.get(b"/b"), None);
}

#[test]
fn group_commit_from_many_threads() {
    let d = tempfile::tempdir().unwrap();
    let dict = Arc::new(new_dict(d.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dict = dict.clone();
            std::thread::spawn(move || {
                for i in 0..150 {
                    put(&dict, &format!("/t{t}/f{i}"), i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(dict);
    let again = open(d.path());
    assert_eq!(again.with_tree(|t| t.len()), 1200);
}

#[test]
fn unsynced_records_are_written_by_flush() {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    dict.submit(Record::Put { path: b"/lazy".to_vec(), entry: entry(1) }).unwrap();
    assert!(dict.has_pending());
    dict.flush().unwrap();
    drop(dict);
    assert_eq!(open(d.path()).get(b"/lazy"), Some(entry(1)));
}

/// Cut the log inside its last record at every byte offset: the dictionary comes back with
/// every earlier record, cuts the torn bytes off, and keeps working.
#[test]
fn torn_last_record_at_every_offset() {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    for i in 0..5 {
        put(&dict, &format!("/f{i}"), i);
    }
    let log = d.path().join(log_file_name(1));
    let before_last = std::fs::metadata(&log).unwrap().len();
    put(&dict, "/last", 99);
    drop(dict);
    let full = std::fs::read(&log).unwrap();
    for cut in before_last as usize..full.len() {
        std::fs::write(&log, &full[..cut]).unwrap();
        let l = FileDict::load(d.path(), &seal(), &INST).unwrap();
        assert_eq!(l.tree.len(), 5, "cut at {cut}");
        assert_eq!(l.torn_tail.is_some(), cut > before_last as usize);
        let dict = FileDict::open_writable(l, &seal(), &INST, 1_000_000).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), before_last, "torn bytes cut off");
        put(&dict, "/after", 7);
        drop(dict);
        let again = open(d.path());
        assert_eq!((again.with_tree(|t| t.len()), again.get(b"/after")), (6, Some(entry(7))));
        assert_eq!(again.get(b"/last"), None);
    }
}

#[test]
fn compaction_and_each_crash_point_during_it() {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    for i in 0..300 {
        put(&dict, &format!("/d{}/f{i}", i % 5), i);
    }
    let i = dict.submit(Record::RenameIntent { from: b"/d1".to_vec(), to: b"/e1".to_vec(), from_ino: 5, exchange: false }).unwrap();
    dict.sync(i).unwrap();
    let want = snapshot_of(&dict);
    let old_snap = std::fs::read(d.path().join(SNAPSHOT_FILE)).unwrap();
    let old_log = std::fs::read(d.path().join(log_file_name(1))).unwrap();
    dict.compact().unwrap();
    assert_eq!(files(d.path()), vec![log_file_name(2), SNAPSHOT_FILE.to_string()]);
    put(&dict, "/post", 1);
    drop(dict);
    let new_snap = std::fs::read(d.path().join(SNAPSHOT_FILE)).unwrap();
    let new_log = std::fs::read(d.path().join(log_file_name(2))).unwrap();

    let check = |label: &str, state: &[(&str, &[u8])], expect_post: bool| {
        let t = tempfile::tempdir().unwrap();
        for (name, bytes) in state {
            std::fs::write(t.path().join(name), bytes).unwrap();
        }
        let dict = open(t.path());
        let mut got = snapshot_of(&dict);
        got.retain(|(p, _)| p != b"/post");
        assert_eq!(got, want, "{label}");
        assert_eq!(dict.get(b"/post").is_some(), expect_post, "{label}");
        assert_eq!(dict.pending_intents().len(), 1, "{label}: the unresolved rename survives");
        assert!(!files(t.path()).iter().any(|f| f.ends_with(".tmp")), "{label}: leftovers removed");
    };
    let log1 = log_file_name(1);
    let log2 = log_file_name(2);
    let empty_log2 = log::encode_header(2, &INST);
    check("new log created, snapshot not yet written", &[(SNAPSHOT_FILE, &old_snap), (&log1, &old_log), (&log2, &empty_log2)], false);
    check(
        "snapshot written to its temp file, not renamed",
        &[(SNAPSHOT_FILE, &old_snap), ("files.snap.tmp", &new_snap), (&log1, &old_log), (&log2, &new_log)],
        true,
    );
    check("snapshot renamed, old log not deleted", &[(SNAPSHOT_FILE, &new_snap), (&log1, &old_log), (&log2, &new_log)], true);
    check("complete", &[(SNAPSHOT_FILE, &new_snap), (&log2, &new_log)], true);
}

fn load_err(dir: &Path) -> String {
    match FileDict::load(dir, &seal(), &INST) {
        Ok(_) => panic!("damaged dictionary accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damage_is_refused_with_the_file_named_and_nothing_changed() {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    for i in 0..50 {
        put(&dict, &format!("/f{i}"), i);
    }
    dict.compact().unwrap();
    for i in 0..20 {
        put(&dict, &format!("/g{i}"), i);
    }
    drop(dict);
    let snap = d.path().join(SNAPSHOT_FILE);
    let log = d.path().join(log_file_name(2));
    let (s0, l0) = (std::fs::read(&snap).unwrap(), std::fs::read(&log).unwrap());

    // A flipped bit anywhere in the snapshot.
    for i in (0..s0.len()).step_by(7) {
        let mut t = s0.clone();
        t[i] ^= 0x04;
        std::fs::write(&snap, &t).unwrap();
        let e = load_err(d.path());
        assert!(e.contains("files.snap"), "flip at {i}: {e}");
        assert_eq!(std::fs::read(&snap).unwrap(), t, "unchanged");
    }
    std::fs::write(&snap, &s0).unwrap();

    // A flipped bit in a record that is not the last one.
    let cut = l0.len() - 200;
    for i in (LOG_HEADER_LEN..cut).step_by(3) {
        let mut t = l0.clone();
        t[i] ^= 0x80;
        std::fs::write(&log, &t).unwrap();
        let e = load_err(d.path());
        assert!(e.contains(&log_file_name(2)) && e.contains("damaged"), "flip at {i}: {e}");
        assert_eq!(std::fs::read(&log).unwrap(), t, "unchanged");
    }
    std::fs::write(&log, &l0).unwrap();

    // A file from a newer tdefs.
    let mut t = l0.clone();
    t[8] = 9;
    std::fs::write(&log, &t).unwrap();
    assert!(load_err(d.path()).contains("newer tdefs"));
    std::fs::write(&log, &l0).unwrap();

    // A missing log or snapshot.
    std::fs::rename(&log, d.path().join("aside")).unwrap();
    assert!(load_err(d.path()).contains("incomplete"));
    std::fs::rename(d.path().join("aside"), &log).unwrap();
    std::fs::rename(&snap, d.path().join("aside")).unwrap();
    assert!(load_err(d.path()).contains("files.snap is missing"));
    std::fs::rename(d.path().join("aside"), &snap).unwrap();

    // Another key, another instance.
    let other = SealKey::new(&Secret::new(vec![1; 32]));
    assert!(FileDict::load(d.path(), &other, &INST).is_err());
    assert!(matches!(FileDict::load(d.path(), &seal(), &[8; 16]), Err(DictError::Foreign { .. })));
    assert_eq!(open(d.path()).with_tree(|t| t.len()), 70);
}

/// Replay `n` records of `recs` into a fresh tree.
fn tree_of(recs: &[Record], n: usize) -> Vec<(Vec<u8>, FileEntry)> {
    let mut t = Tree::default();
    for (i, r) in recs[..n].iter().enumerate() {
        t.apply(i as u64 + 1, r).unwrap();
    }
    let mut v = Vec::new();
    t.for_each(|p, e| v.push((p.to_vec(), *e)));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn mutated_log_case(recs: &[Record], mutation: (u8, usize, u8)) {
    let d = tempfile::tempdir().unwrap();
    let dict = new_dict(d.path());
    for r in recs {
        dict.submit(r.clone()).unwrap();
    }
    dict.flush().unwrap();
    drop(dict);
    let log = d.path().join(log_file_name(1));
    let mut b = std::fs::read(&log).unwrap();
    let (kind, pos, val) = mutation;
    let pos = pos % (b.len() + 1);
    match kind % 4 {
        0 if pos < b.len() => b[pos] ^= val | 1,
        1 => b.truncate(pos),
        2 => b.insert(pos, val),
        _ => b.extend(std::iter::repeat(val).take(pos % 300)),
    }
    std::fs::write(&log, &b).unwrap();
    // Never a panic; either an error, or exactly some prefix of the history.
    if let Ok(l) = FileDict::load(d.path(), &seal(), &INST) {
        let n = l.records as usize;
        assert!(n <= recs.len());
        let mut got = Vec::new();
        l.tree.for_each(|p, e| got.push((p.to_vec(), *e)));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, tree_of(recs, n), "loaded state is not a prefix of the history");
    }
}

fn record_strategy() -> impl Strategy<Value = Record> {
    let path = "/[a-c]{1,2}(/[a-c]{1,2}){0,2}";
    prop_oneof![
        (path, any::<u64>()).prop_map(|(p, i)| Record::Put { path: p.into_bytes(), entry: entry(i) }),
        path.prop_map(|p| Record::Delete { path: p.into_bytes() }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_mutations_of_a_valid_log(recs in proptest::collection::vec(record_strategy(), 1..12),
                                          mutation in (any::<u8>(), any::<usize>(), any::<u8>())) {
        mutated_log_case(&recs, mutation);
    }

    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..600), header_ok in any::<bool>()) {
        let d = tempfile::tempdir().unwrap();
        FileDict::create(d.path(), &seal(), &INST).unwrap();
        let log = d.path().join(log_file_name(1));
        let mut b = if header_ok { std::fs::read(&log).unwrap() } else { Vec::new() };
        b.extend(&tail);
        std::fs::write(&log, &b).unwrap();
        let _ = FileDict::load(d.path(), &seal(), &INST);
        std::fs::write(d.path().join(SNAPSHOT_FILE), &tail).unwrap();
        prop_assert!(FileDict::load(d.path(), &seal(), &INST).is_err());
    }
}
