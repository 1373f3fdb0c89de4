//! The adapter's volume driven directly (no kernel): races that need a forced interleaving.

use std::ffi::OsStr;
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::config::MasterKeyConfig;
use crate::crypto::Method;
use crate::metadir::{MasterKeys, Metadata, OpenOptions};

fn volume_in(dir: &std::path::Path) -> Arc<Volume> {
    let master = MasterKeyConfig::Plaintext;
    let opts = OpenOptions { adopt: false, rewrite_threshold: 1_000_000 };
    let meta = Metadata::open_or_init(dir, &MasterKeys { current: &master, previous: None }, &opts).unwrap();
    let fs = FsOptions {
        method: Method::Aes256Ctr,
        rotation: Duration::from_secs(3600),
        ttl: Duration::from_secs(1),
        noatime: false,
        nodiratime: false,
    };
    Arc::new(Volume::new(&meta, fs).unwrap())
}

/// Housekeeping rotates the data key and collects unused keys in one tick. A create that
/// has taken the current key but not yet queued its record must not lose that key to the
/// collection: after the next mount its file would be EIO forever. The hook stops the
/// create right after it took the key, rotates the key away, and lets key GC run on
/// another thread for as long as GC likes (up to 2 s) before the create goes on.
#[test]
fn a_key_taken_by_a_create_is_never_collected() {
    let d = tempfile::tempdir().unwrap();
    let volume = volume_in(d.path());
    volume.rotate_data_key_if_due().unwrap();
    let first = volume.keys().current().unwrap().id;
    let (gc_done_tx, gc_done_rx) = mpsc::channel();
    let hook_volume = volume.clone();
    let fired = std::sync::atomic::AtomicBool::new(false);
    let _hook = crate::hooks::install(move |name| {
        if name != "entry:key-taken" || fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // The key just taken stops being current...
        hook_volume.keys().key_for_new_file(Method::Aes256Ctr, Duration::ZERO).unwrap();
        // ...and key GC runs now, on another thread.
        let c = hook_volume.clone();
        let tx = gc_done_tx.clone();
        std::thread::spawn(move || tx.send(c.collect_unused_keys().unwrap()).unwrap());
        // Let it finish if it can (before the fix it could, and deleted the key).
        std::thread::sleep(Duration::from_secs(2));
    });
    let (inode, _, fh) = volume.create(1, OsStr::new("f"), 0o644, 0, Caller { uid: 0, gid: 0 }).unwrap();
    volume.release(fh);
    let entry = inode.data.read().entry.unwrap();
    assert_eq!(entry.key_id, first, "the create used the key it took");
    let collected = gc_done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(collected, 0, "no key may be collected: the old one is now referenced by the file");
    assert!(volume.keys().get(entry.key_id).is_some(), "the file's data key survives");
    assert_eq!(volume.dict().get(b"/f").map(|e| e.key_id), Some(first));
}

#[test]
fn unused_keys_spares_referenced_and_current_keys() {
    let used: std::collections::HashSet<u64> = [2, 3].into_iter().collect();
    assert_eq!(rotation::unused_keys(&[1, 2, 3, 4, 5], &used, Some(5)), vec![1, 4]);
    assert_eq!(rotation::unused_keys(&[1], &used, None), vec![1]);
}

/// Keys referenced only by a staged copy of `tdefs encrypt` or by the source of a rename
/// not yet concluded are in the tree, so GC keeps them.
#[test]
fn keys_of_staged_copies_and_pending_renames_are_kept() {
    let d = tempfile::tempdir().unwrap();
    let volume = volume_in(d.path());
    volume.rotate_data_key_if_due().unwrap();
    let k1 = volume.keys().current().unwrap();
    volume.keys().key_for_new_file(Method::Aes256Ctr, Duration::ZERO).unwrap();
    let k2 = volume.keys().current().unwrap();
    volume.keys().key_for_new_file(Method::Aes256Ctr, Duration::ZERO).unwrap(); // k3 current
    let staged = crate::dictionary::FileEntry { method: Method::Aes256Ctr, key_id: k1.id, iv: [1; 16] };
    let renamed = crate::dictionary::FileEntry { method: Method::Aes256Ctr, key_id: k2.id, iv: [2; 16] };
    use crate::dictionary::Record;
    volume.dict().submit(Record::Put { path: b"/.tdefs.convert/0123".to_vec(), entry: staged }).unwrap();
    volume.dict().submit(Record::Put { path: b"/old".to_vec(), entry: renamed }).unwrap();
    volume.dict().submit(Record::RenameIntent { from: b"/old".to_vec(), to: b"/new".to_vec(), from_ino: 7, exchange: false }).unwrap();
    volume.dict().flush().unwrap();
    assert_eq!(volume.collect_unused_keys().unwrap(), 0);
    assert!(volume.keys().get(k1.id).is_some() && volume.keys().get(k2.id).is_some());
}

/// A live `tdefs status` walks the whole backing tree; it looks dictionary entries up one
/// at a time, so creates and lookups go on while it is stopped in the middle of its walk
/// (before, it held the dictionary's lock for the whole walk).
#[test]
fn status_never_blocks_creates() {
    let d = tempfile::tempdir().unwrap();
    let volume = volume_in(d.path());
    for i in 0..50 {
        let (_, _, fh) = volume.create(1, OsStr::new(&format!("f{i}")), 0o644, 0, Caller { uid: 0, gid: 0 }).unwrap();
        volume.release(fh);
    }
    let (paused_tx, paused_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = parking_lot::Mutex::new(go_rx);
    let fired = std::sync::atomic::AtomicBool::new(false);
    let _hook = crate::hooks::install(move |name| {
        if name == "status:walking" && !fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            paused_tx.send(()).unwrap();
            go_rx.lock().recv_timeout(Duration::from_secs(30)).unwrap();
        }
    });
    let c = volume.clone();
    let backing = d.path().to_path_buf();
    let scope = _hook.scope();
    let t = std::thread::spawn(move || {
        scope.enter();
        crate::metadir::status::collect(&backing, c.keys(), c.dict().as_ref(), Method::Aes256Ctr, true)
    });
    paused_rx.recv().unwrap();
    for i in 0..20 {
        let (_, _, fh) = volume.create(1, OsStr::new(&format!("during{i}")), 0o644, 0, Caller { uid: 0, gid: 0 }).unwrap();
        volume.release(fh);
        assert!(volume.dict().get(format!("/f{i}").as_bytes()).is_some());
    }
    go_tx.send(()).unwrap();
    let st = t.join().unwrap();
    assert!(st.files_by_method.get("aes256-ctr").copied().unwrap_or(0) >= 50);
}

/// A file whose kernel inode was forgotten once (its times recorded in `trusted.tdefs.times`)
/// is chmodded: the kernel's new ctime and the backing file's are the same instant. When the
/// kernel forgets it again, the record must be brought up to date, not removed: removing an
/// xattr moves the backing ctime, and the next inode got the time of the removal (generic/021
/// under load, where other tests' cache drops evicted the inode between write and chmod).
#[test]
fn a_times_record_is_never_removed_when_the_ctimes_meet() {
    let d = tempfile::tempdir().unwrap();
    let volume = volume_in(d.path());
    let sys_time = |t: (i64, i64)| std::time::UNIX_EPOCH + Duration::new(t.0 as u64, t.1 as u32);
    let ctime = |st: &crate::sys::Stat| (st.st_ctime, st.st_ctime_nsec);
    let (inode, mut st, fh) = volume.create(1, OsStr::new("f"), 0o644, 0, Caller { uid: 0, gid: 0 }).unwrap();
    volume.release(fh);
    volume.report_times(&inode, &mut st);
    // The kernel's ctime is older than the backing file's (it wrote later, say).
    let kernel_c = (st.st_ctime - 5, st.st_ctime_nsec);
    volume.setattr_times(&inode, &mut st.clone(), None, Some(sys_time(kernel_c)));
    if let Err(e) = volume.persist_times(&inode) {
        eprintln!("skipped: no trusted.* xattrs here ({e})");
        return;
    }
    volume.forget(inode.nodeid, 1);
    let root = volume.inode(1).unwrap();
    let (i2, mut st2) = volume.lookup(&root, OsStr::new("f")).unwrap();
    volume.report_times(&i2, &mut st2);
    assert_eq!(ctime(&st2), kernel_c, "the recorded ctime after the first forget");
    // chmod: the backing ctime and the kernel's are the same instant.
    std::thread::sleep(Duration::from_millis(20));
    let mut st3 = volume.setattr(i2.nodeid, Some(0o600), None, None, None, None, None, None, None).unwrap();
    let chmod_c = ctime(&st3);
    volume.setattr_times(&i2, &mut st3, None, Some(sys_time(chmod_c)));
    std::thread::sleep(Duration::from_millis(20));
    volume.persist_times(&i2).unwrap();
    volume.forget(i2.nodeid, 1);
    let (i3, mut st4) = volume.lookup(&root, OsStr::new("f")).unwrap();
    volume.report_times(&i3, &mut st4);
    assert_eq!(ctime(&st4), chmod_c, "the chmod's ctime after the second forget");
    volume.forget(i3.nodeid, 1);
}
