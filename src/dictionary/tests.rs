//! File dictionary: durability, recovery from torn writes and interrupted compaction,
//! and refusal of damaged or foreign files.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::crypto::{Method, Secret};

const INST: [u8; 16] = [7; 16];

fn seal() -> Arc<SealKeys> {
    Arc::new(SealKeys::new(&Secret::new(vec![0x42; 32]), INST))
}

/// Keeps the mark in a file next to the dictionary (the key dictionary's job in tdefs).
struct FileMarks(std::path::PathBuf);

const MARK_FILE: &str = "test-mark";

impl MarkStore for FileMarks {
    fn store_mark(&self, m: DictMark) -> Result<(), String> {
        std::fs::write(self.0.join(MARK_FILE), format!("{} {} {}", m.gen, m.seq, m.clean)).map_err(|e| e.to_string())
    }
}

fn mark_of(dir: &Path) -> Option<DictMark> {
    let t = std::fs::read_to_string(dir.join(MARK_FILE)).ok()?;
    let v: Vec<&str> = t.split(' ').collect();
    Some(DictMark { gen: v[0].parse().unwrap(), seq: v[1].parse().unwrap(), clean: v[2] == "true" })
}

/// The directory as tdefs holds its metadata directory: by verified descriptor.
fn md(dir: &Path) -> Arc<Dir> {
    let parent = std::fs::File::open(dir.parent().unwrap()).unwrap();
    Arc::new(Dir::open_verified(std::os::fd::AsFd::as_fd(&parent), dir.file_name().unwrap(), dir).unwrap())
}

fn marks(dir: &Path) -> Arc<dyn MarkStore> {
    Arc::new(FileMarks(dir.to_path_buf()))
}

fn load(dir: &Path) -> Result<LoadedDictionary, DictError> {
    FileDict::load(&md(dir), &seal(), &INST, mark_of(dir))
}

fn writable(l: LoadedDictionary, dir: &Path) -> FileDict {
    FileDict::open_writable(l, seal(), &INST, 1_000_000, marks(dir)).unwrap()
}

fn entry(i: u64) -> FileEntry {
    FileEntry { method: Method::Aes256Ctr, key_id: 1 + i % 3, iv: [i as u8; 16] }
}

fn new_dict(dir: &Path) -> FileDict {
    FileDict::create(&md(dir), &seal(), &INST, &Tree::default()).unwrap();
    FileMarks(dir.to_path_buf()).store_mark(DictMark { gen: 1, seq: 0, clean: true }).unwrap();
    open(dir)
}

fn open(dir: &Path) -> FileDict {
    writable(load(dir).unwrap(), dir)
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
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != MARK_FILE)
        .collect();
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
    let mark = std::fs::read(d.path().join(MARK_FILE)).unwrap();
    for cut in before_last as usize..full.len() {
        std::fs::write(&log, &full[..cut]).unwrap();
        std::fs::write(d.path().join(MARK_FILE), &mark).unwrap(); // as the crash left it
        let l = load(d.path()).unwrap();
        assert_eq!(l.tree.len(), 5, "cut at {cut}");
        assert_eq!(l.torn_tail.is_some(), cut > before_last as usize);
        let dict = writable(l, d.path());
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
    match load(dir) {
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
    let other = SealKeys::new(&Secret::new(vec![1; 32]), INST);
    assert!(FileDict::load(&md(d.path()), &other, &INST, None).is_err());
    assert!(matches!(FileDict::load(&md(d.path()), &seal(), &[8; 16], None), Err(DictError::Foreign { .. })));
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
    // (Without the mark: this is about damage to the bytes; rollback has its own tests.)
    if let Ok(l) = FileDict::load(&md(d.path()), &seal(), &INST, None) {
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
        FileDict::create(&md(d.path()), &seal(), &INST, &Tree::default()).unwrap();
        let log = d.path().join(log_file_name(1));
        let mut b = if header_ok { std::fs::read(&log).unwrap() } else { Vec::new() };
        b.extend(&tail);
        std::fs::write(&log, &b).unwrap();
        let _ = FileDict::load(&md(d.path()), &seal(), &INST, None);
        std::fs::write(d.path().join(SNAPSHOT_FILE), &tail).unwrap();
        prop_assert!(FileDict::load(&md(d.path()), &seal(), &INST, None).is_err());
    }
}

/// Every way a dictionary can lose records without damage — a log cut at a record
/// boundary, a deleted newest log, an older snapshot/log set put back — is refused once
/// the mark says more was written; an interrupted compaction is not.
#[test]
fn rolled_back_dictionaries_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let dict = new_dict(dir);
    for i in 0..10 {
        put(&dict, &format!("/f{i}"), i);
    }
    dict.close().unwrap();
    assert_eq!(mark_of(dir), Some(DictMark { gen: 1, seq: 10, clean: true }));
    drop(dict);
    let log1 = dir.join(log_file_name(1));
    let full = std::fs::read(&log1).unwrap();
    // Where each record ends (frame lengths are in the frame headers): cut exactly there.
    let frame_len = |b: &[u8], off: usize| 4 + 4 + 8 + u32::from_le_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize + 4;
    let ends = |b: &[u8]| {
        let mut v = vec![LOG_HEADER_LEN];
        while *v.last().unwrap() < b.len() {
            let o = *v.last().unwrap();
            v.push(o + frame_len(b, o));
        }
        v
    };
    let boundaries = ends(&full)[1..].to_vec();
    assert_eq!(boundaries.len(), 10);
    for &cut in &boundaries[..9] {
        std::fs::write(&log1, &full[..cut]).unwrap();
        let e = load_err(dir);
        assert!(e.contains("older than the key dictionary records") && e.contains("but records up to 10"), "cut at {cut}: {e}");
        assert_eq!(std::fs::read(&log1).unwrap(), &full[..cut], "nothing modified");
    }
    std::fs::write(&log1, &full).unwrap();
    assert_eq!(open(dir).with_tree(|t| t.len()), 10);

    // Crashed (not closed): the checkpoint bounds what may be missing.
    let dict = open(dir);
    for i in 10..20 {
        put(&dict, &format!("/f{i}"), i);
    }
    assert!(dict.checkpoint().unwrap());
    assert!(!dict.checkpoint().unwrap(), "nothing new: no write");
    put(&dict, "/after-checkpoint", 1);
    drop(dict); // a crash: no close
    assert_eq!(mark_of(dir), Some(DictMark { gen: 1, seq: 20, clean: false }));
    let full = std::fs::read(&log1).unwrap();
    let offs = ends(&full); // offs[k]: where record k ends
    assert_eq!(offs.len(), 22);
    std::fs::write(&log1, &full[..offs[20]]).unwrap(); // the record after the checkpoint lost: accepted
    assert!(load(dir).is_ok(), "records after the last checkpoint may be lost to a crash unnoticed");
    std::fs::write(&log1, &full[..offs[19]]).unwrap();
    assert!(load_err(dir).contains("ends at record 19"));
    std::fs::write(&log1, &full).unwrap();

    // An older snapshot/log set put back after a compaction: the newest log is missing.
    let old_snap = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
    let dict = open(dir);
    dict.compact().unwrap();
    put(&dict, "/gen2", 2);
    dict.close().unwrap();
    drop(dict);
    assert_eq!(mark_of(dir).map(|m| (m.gen, m.clean)), Some((2, true)));
    let new_snap = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
    let log2 = std::fs::read(dir.join(log_file_name(2))).unwrap();
    std::fs::remove_file(dir.join(log_file_name(2))).unwrap();
    std::fs::write(dir.join(SNAPSHOT_FILE), &old_snap).unwrap();
    std::fs::write(&log1, &full).unwrap();
    assert!(load_err(dir).contains("log generation 2 is missing"));
    std::fs::write(dir.join(SNAPSHOT_FILE), &new_snap).unwrap();
    std::fs::remove_file(&log1).unwrap();
    std::fs::write(dir.join(log_file_name(2)), &log2).unwrap();
    assert_eq!(open(dir).get(b"/gen2"), Some(entry(2)));

    // Compaction made log 3 and crashed before the key dictionary learnt of it: accepted
    // while log 3 is empty; with a record in it, the mark is the older one.
    let m = mark_of(dir).unwrap();
    let dict = open(dir);
    dict.compact().unwrap();
    put(&dict, "/gen3", 3);
    dict.close().unwrap();
    drop(dict);
    let log3 = std::fs::read(dir.join(log_file_name(3))).unwrap();
    FileMarks(dir.to_path_buf()).store_mark(DictMark { gen: 2, ..m }).unwrap();
    assert!(load_err(dir).contains("newer than the generation 2"));
    std::fs::write(dir.join(log_file_name(3)), &log3[..LOG_HEADER_LEN]).unwrap();
    let l = load(dir).unwrap();
    assert_eq!(l.generation(), 3);
    let dict = writable(l, dir);
    assert_eq!(mark_of(dir).map(|m| m.gen), Some(3), "opening records the generation");
    drop(dict);

    // After a clean close the log may not run past the mark either.
    let dict = open(dir);
    put(&dict, "/x", 4);
    dict.close().unwrap();
    drop(dict);
    let m = mark_of(dir).unwrap();
    FileMarks(dir.to_path_buf()).store_mark(DictMark { seq: m.seq - 1, ..m }).unwrap();
    assert!(load_err(dir).contains("after a clean close"));
}

/// Compaction rebuilds the snapshot from the files, not from the live tree: records are
/// submitted, synced and looked up while it is stopped in the middle.
#[test]
fn compaction_never_blocks_the_live_dictionary() {
    let d = tempfile::tempdir().unwrap();
    let dict = Arc::new(new_dict(d.path()));
    for i in 0..2000 {
        dict.submit(Record::Put { path: format!("/d{}/f{i}", i % 10).into_bytes(), entry: entry(i) }).unwrap();
    }
    dict.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = parking_lot::Mutex::new(go_rx);
    let _hook = crate::hooks::install(move |name| {
        if name == "compact:building" {
            tx.send(()).unwrap();
            go_rx.lock().recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        }
    });
    let c = dict.clone();
    let scope = _hook.scope();
    let t = std::thread::spawn(move || {
        scope.enter();
        c.compact()
    });
    rx.recv().unwrap(); // compaction is stopped in the middle
    for i in 0..100 {
        put(&dict, &format!("/during/{i}"), i);
        assert_eq!(dict.get(format!("/d3/f{}", 3 + 10 * i).as_bytes()), Some(entry(3 + 10 * i)));
    }
    go_tx.send(()).unwrap();
    t.join().unwrap().unwrap();
    drop(_hook);
    dict.close().unwrap();
    let again = open(d.path());
    assert_eq!(again.with_tree(|t| t.len()), 2100);
}
