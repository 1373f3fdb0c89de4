//! Power loss, not only kill -9 (issue 9): the simulator's own behaviour, and tdefs on top
//! of it losing nothing that was fsynced.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use common::*;
use rand::{Rng, SeedableRng};

fn sim() -> (tempfile::TempDir, PowerCut) {
    let d = tempfile::Builder::new().prefix("tdefs-pc").tempdir_in("/tmp").unwrap();
    let pc = PowerCut::start(&d.path().join("lower"), &d.path().join("mnt"), &d.path().join("ctl"), &d.path().join("log"));
    (d, pc)
}

#[test]
fn simulator_drops_exactly_what_was_not_synced() {
    let (_d, pc) = sim();
    let p = |n: &str| pc.mnt.join(n);
    // Written without fsync: gone after a cut (the name stays: the directory is fsynced
    // below, which makes every name created before durable; the data is not).
    fs::write(p("unsynced"), b"lost").unwrap();
    // Written and fsynced: kept.
    let mut f = File::create(p("synced")).unwrap();
    f.write_all(b"kept").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Overwritten (and extended) without fsync after a synced version: the old bytes.
    let f = OpenOptions::new().write(true).open(p("synced")).unwrap();
    f.write_all_at(b"KEPT and more", 0).unwrap();
    drop(f);
    // fdatasync keeps; truncation without sync is undone; O_DSYNC writes need no fsync.
    let g = OpenOptions::new().write(true).create(true).open(p("datasync")).unwrap();
    g.write_all_at(&[7u8; 10_000], 0).unwrap();
    g.sync_data().unwrap();
    g.set_len(100).unwrap();
    drop(g);
    let h = OpenOptions::new().write(true).create(true).custom_flags(libc::O_DSYNC).open(p("dsync")).unwrap();
    h.write_all_at(b"durable at once", 0).unwrap();
    drop(h);
    // Punched without sync: the data comes back.
    let k = OpenOptions::new().read(true).write(true).create(true).open(p("punched")).unwrap();
    k.write_all_at(&[9u8; 20_000], 0).unwrap();
    k.sync_all().unwrap();
    let r = unsafe { libc::fallocate(k.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4096, 8192) };
    assert_eq!(r, 0);
    drop(k);
    // An unsynced file that is then deleted: nothing to roll back, no error.
    fs::write(p("deleted"), b"x").unwrap();
    fs::remove_file(p("deleted")).unwrap();
    // A rename is durable once its directory is fsynced.
    fs::write(p("renamed-from"), b"r").unwrap();
    File::open(p("renamed-from")).unwrap().sync_all().unwrap();
    fs::rename(p("renamed-from"), p("renamed-to")).unwrap();
    File::open(pc.mnt.as_path()).unwrap().sync_all().unwrap();

    let rolled = pc.cut();
    assert!(rolled >= 4, "rolled back {rolled} files");
    assert_eq!(fs::read(p("unsynced")).unwrap(), b"");
    assert_eq!(fs::read(p("synced")).unwrap(), b"kept");
    assert_eq!(fs::read(p("datasync")).unwrap(), vec![7u8; 10_000]);
    assert_eq!(fs::read(p("dsync")).unwrap(), b"durable at once");
    assert_eq!(fs::read(p("punched")).unwrap(), vec![9u8; 20_000]);
    assert_eq!(fs::read(p("renamed-to")).unwrap(), b"r");
    assert!(!p("renamed-from").exists() && !p("deleted").exists());
    // After a cut the simulator carries on: a new name never made durable is gone.
    fs::write(p("after"), b"a").unwrap();
    pc.cut();
    assert!(!p("after").exists(), "its directory was never fsynced");
}

#[test]
fn simulator_matches_a_model_of_synced_state() {
    let (_d, pc) = sim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for round in 0..8 {
        let n = 4;
        let mut cur: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut synced: Vec<Vec<u8>> = vec![Vec::new(); n];
        let files: Vec<File> = (0..n)
            .map(|i| OpenOptions::new().read(true).write(true).create(true).truncate(true).open(pc.mnt.join(format!("r{round}-{i}"))).unwrap())
            .collect();
        for f in &files {
            f.sync_all().unwrap();
        }
        File::open(pc.mnt.as_path()).unwrap().sync_all().unwrap(); // the names
        for _ in 0..200 {
            let i = rng.gen_range(0..n);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let off = rng.gen_range(0..60_000u64);
                    let data: Vec<u8> = (0..rng.gen_range(1..9000)).map(|_| rng.gen()).collect();
                    files[i].write_all_at(&data, off).unwrap();
                    let end = off as usize + data.len();
                    if cur[i].len() < end {
                        cur[i].resize(end, 0);
                    }
                    cur[i][off as usize..end].copy_from_slice(&data);
                }
                6 => {
                    let len = rng.gen_range(0..70_000);
                    files[i].set_len(len).unwrap();
                    cur[i].resize(len as usize, 0);
                }
                7 => {
                    files[i].sync_data().unwrap();
                    synced[i] = cur[i].clone();
                }
                _ => {
                    files[i].sync_all().unwrap();
                    synced[i] = cur[i].clone();
                }
            }
        }
        drop(files);
        pc.cut();
        for i in 0..n {
            assert_eq!(fs::read(pc.mnt.join(format!("r{round}-{i}"))).unwrap(), synced[i], "round {round} file {i}");
        }
    }
}

fn write_synced(path: &std::path::Path, data: &[u8]) {
    let f = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
    File::open(path.parent().unwrap()).unwrap().sync_all().unwrap();
}

#[test]
fn first_init_is_durable() {
    // A cut right after the first mount initialised the metadata: it must mount again.
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    c.power_cut();
    c.m.start();
    write_synced(&c.m.path("f"), b"after init");
    c.power_cut();
    c.m.start();
    assert_eq!(fs::read(c.m.path("f")).unwrap(), b"after init");
}

#[test]
fn fsynced_bytes_survive_and_nothing_reads_as_noise() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    fs::create_dir(c.m.path("d")).unwrap();
    File::open(c.m.path("")).unwrap().sync_all().unwrap(); // "d" itself
    let synced: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    write_synced(&c.m.path("d/a"), &synced);
    // Unsynced: a new file's data, and an overwrite of part of the synced one.
    fs::write(c.m.path("d/b"), vec![5u8; 30_000]).unwrap();
    let f = OpenOptions::new().write(true).open(c.m.path("d/a")).unwrap();
    f.write_all_at(&[1u8; 10_000], 4000).unwrap();
    drop(f);
    assert!(c.power_cut() >= 1);
    c.m.start();
    assert_eq!(fs::read(c.m.path("d/a")).unwrap(), synced, "fsynced bytes survive, unsynced overwrite is gone");
    // Its name was never made durable: gone, or (if a later fsync of "d" made it durable)
    // empty/zeros or its data, never noise.
    let b = fs::read(c.m.path("d/b")).unwrap_or_default();
    assert!(b.iter().all(|&x| x == 0 || x == 5), "an unsynced file reads empty/zeros or its data, never noise");
}

#[test]
fn directory_fsync_reaches_the_backing_directory() {
    let c = CutMount::prepare("aes256-ctr");
    let mut c = c;
    c.m.start();
    fs::create_dir(c.m.path("sub")).unwrap();
    let before = c.pc.dir_syncs("sub");
    fs::write(c.m.path("sub/x"), b"x").unwrap();
    File::open(c.m.path("sub")).unwrap().sync_all().unwrap();
    let after_create = c.pc.dir_syncs("sub");
    assert!(after_create > before, "fsync of the directory on the mount fsyncs the backing directory");
    fs::rename(c.m.path("sub/x"), c.m.path("sub/y")).unwrap();
    File::open(c.m.path("sub")).unwrap().sync_all().unwrap();
    fs::remove_file(c.m.path("sub/y")).unwrap();
    File::open(c.m.path("sub")).unwrap().sync_all().unwrap();
    assert!(c.pc.dir_syncs("sub") >= after_create + 2);
}

#[test]
fn cut_right_after_a_data_key_rotation() {
    let mut c = CutMount::prepare("aes128-ctr");
    c.m.set_encryption_extra("aes128-ctr", "data-key-rotation-period = \"1s\"");
    c.m.start();
    write_synced(&c.m.path("old-key"), b"written with the first key");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    write_synced(&c.m.path("new-key"), b"written with a rotated key"); // rotation happens here
    c.power_cut();
    c.m.start();
    assert_eq!(fs::read(c.m.path("old-key")).unwrap(), b"written with the first key");
    assert_eq!(fs::read(c.m.path("new-key")).unwrap(), b"written with a rotated key");
    c.m.stop();
    let (code, text) = c.m.check(&[]);
    assert_eq!(code, 0, "{text}");
    // Two keys for the two files; a third when the remount came more than a second after
    // the rotation (the period is 1 s): timing, not a failure.
    assert!(text.contains("data keys:              2") || text.contains("data keys:              3"), "{text}");
    assert!(!text.contains("MISSING"), "{text}");
}

#[test]
fn cuts_during_dictionary_compaction() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 5");
    let mut expect = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for round in 0..6 {
        c.m.start();
        for i in 0..rng.gen_range(3..15) {
            let name = format!("r{round}-{i}");
            write_synced(&c.m.path(&name), name.as_bytes());
            expect.push(name);
        }
        // The background compaction runs every second once 5 records accumulated: cut at
        // a random point around it.
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(0..1500)));
        c.power_cut();
    }
    c.m.start();
    for name in &expect {
        assert_eq!(fs::read(c.m.path(name)).unwrap(), name.as_bytes(), "{name}");
    }
}

/// The crash torture with a power cut after every kill (strict simulator): only fsynced
/// bytes and names made durable by a directory fsync survive, and every durable operation
/// must still be there (issues 9 and 21; `scripts/crash-torture.sh --powercut` runs
/// hundreds of cycles). The torture itself enforces its floors: durable operations per
/// cycle, and over the run at least one file's unsynced data rolled back and one namespace
/// operation undone (read with `lastcut` after every cut); the plaintext scan runs at the end.
#[test]
fn crash_torture_with_power_cuts() {
    powercut_torture("aes256-ctr", 24, 21, "lower");
}

/// The same with an XTS method: its data path (whole 16-byte blocks, ciphertext stealing
/// for a tail) under power cuts, and its files checked by the plaintext scan. The simulator
/// gives a gone inode's number (and file handle) to the next new one, whatever the
/// filesystem under /var/tmp would do, so every run meets reused handles (the leak they
/// once caused has its own test: a_reused_backing_inode_number_is_a_new_file).
#[test]
fn crash_torture_with_power_cuts_sm4_xts() {
    powercut_torture("sm4-xts", 12, 22, "reuse");
}

fn powercut_torture(method: &str, cycles: u32, seed: u32, numbers: &str) {
    let tmp = std::path::Path::new("/var/tmp/tdefs-crash-tests");
    fs::create_dir_all(tmp).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tdefs-torture"))
        .args(["run", "--tdefs", TDEFS, "--powercut", POWERCUT, "--method", method])
        .args(["--cycles", &cycles.to_string(), "--seed", &seed.to_string()])
        .env("TMPDIR", tmp)
        .env("POWERCUT_NUMBERS", numbers)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("{cycles} cycles")) && text.contains(&format!("{method}, power cut after each kill (strict)")), "{text}");
    assert!(text.contains("namespace operations in") && text.contains(": 0 leaks"), "{text}");
    if numbers == "reuse" {
        let reused: u64 = text.lines().find_map(|l| l.strip_prefix("simulator: ")?.split(' ').next()?.parse().ok()).unwrap_or(0);
        assert!(reused >= 10, "the simulator reused only {reused} inode numbers: the run proved nothing about reuse\n{text}");
    }
}

/// The floor on what the cuts undo: a run whose cuts roll nothing back (here the simulator
/// is told to make everything durable before each cut, as a simulator that failed to model
/// power loss would) proves nothing about power loss, and fails.
#[test]
fn crash_torture_fails_when_no_cut_rolls_anything_back() {
    let tmp = tempfile::Builder::new().prefix("tdefs-torture-test").tempdir_in("/var/tmp").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tdefs-torture"))
        .args(["run", "--tdefs", TDEFS, "--powercut", POWERCUT, "--cycles", "3", "--seed", "5", "--sync-before-cut"])
        .arg("--workdir")
        .arg(tmp.path().join("work"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no power cut rolled back any file's data") && text.contains("no power cut undid any namespace operation"), "{text}");
}

/// `tdefs encrypt` stopped at each of its steps (and after finishing), then the power cut:
/// every file still reads as its plaintext through the mount, and a second run finishes.
#[test]
fn power_cuts_during_tdefs_encrypt() {
    for point in ["convert:after-put", "convert:after-copy", "convert:after-intent", "convert:after-rename", "finished"] {
        let mut c = CutMount::prepare("aes256-ctr");
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        fs::create_dir(c.m.bpath("db")).unwrap();
        let mut files = Vec::new();
        for i in 0..4 {
            let mut data = vec![0u8; rng.gen_range(1000..300_000)];
            rng.fill(&mut data[..]);
            data[..9].copy_from_slice(b"PLAINTEXT");
            write_synced(&c.m.bpath(&format!("db/f{i}")), &data);
            files.push((format!("db/f{i}"), data));
        }
        let cfg = c.m.config.to_str().unwrap().to_string();
        let backing = c.m.backing.to_str().unwrap().to_string();
        let mut cmd = std::process::Command::new(TDEFS);
        cmd.args(["encrypt", "--init", "--config", &cfg, &backing]);
        if point != "finished" {
            cmd.env("TDEFS_FAULT", point);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.success(), point == "finished", "{point}: {}", String::from_utf8_lossy(&out.stderr));
        c.pc.cut();
        let check = |c: &mut CutMount, when: &str| {
            let (code, text) = c.m.check(&[]);
            assert_eq!(code, 0, "{when}: {text}");
            c.m.start();
            for (p, d) in &files {
                assert!(fs::read(c.m.path(p)).unwrap() == *d, "{when}: {p} does not read as its plaintext");
            }
            c.m.stop();
        };
        check(&mut c, &format!("a cut at {point}"));
        let out = std::process::Command::new(TDEFS).args(["encrypt", "--config", &cfg, &backing]).output().unwrap();
        assert!(out.status.success(), "{point}: {}", String::from_utf8_lossy(&out.stderr));
        c.pc.cut();
        check(&mut c, &format!("a second run after {point}, and another cut"));
        for (p, _) in &files {
            let on_disk = fs::read(c.pc.lower.join(p)).unwrap();
            assert!(!on_disk.windows(9).any(|w| w == b"PLAINTEXT"), "{point}: {p} is still plaintext on disk");
        }
    }
}

/// A backing filesystem may give a removed file's inode number, and on a FUSE backing such
/// as the simulator (generation 0) its very file handle, to the next file created, while
/// the kernel above still holds the removed one. The new file is a new inode, encrypted
/// under its own record: found in the crash torture over io_uring, where FORGETs come late,
/// as a directory's stale inode taken for a new file (EISDIR, and its data written in the
/// clear through the directory's state).
#[test]
fn a_reused_backing_inode_number_is_a_new_file() {
    use std::os::unix::fs::MetadataExt;
    // The simulator's own numbers: ext4 below it reuses a freed number often, tmpfs never.
    let mut c = CutMount::prepare_reusing_numbers("aes256-ctr");
    c.m.start();
    let root = |c: &CutMount| File::open(c.m.path("")).unwrap().sync_all().unwrap();
    let mut reused = Vec::new();
    let mut made = Vec::new();
    for round in 0..40 {
        let dir = round % 2 == 0;
        let old = format!("old{round}");
        if dir {
            fs::create_dir(c.m.path(&old)).unwrap();
            root(&c);
        } else {
            write_synced(&c.m.path(&old), b"old contents");
        }
        let ino = fs::metadata(c.m.backing.join(&old)).unwrap().ino();
        // The kernel keeps the inode (no FORGET) while this descriptor lives; tdefs is not
        // asked to open anything.
        let pin = OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(c.m.path(&old)).unwrap();
        if dir { fs::remove_dir(c.m.path(&old)).unwrap() } else { fs::remove_file(c.m.path(&old)).unwrap() }
        root(&c); // the removal is durable: the simulator deletes the name, the number is free
        let new = format!("new{round}");
        let data: Vec<u8> = format!("TDEFS-MARKER-reuse-{round} ").into_bytes().repeat(300);
        write_synced(&c.m.path(&new), &data);
        if fs::metadata(c.m.backing.join(&new)).unwrap().ino() == ino {
            reused.push(new.clone());
        }
        let on_disk = fs::read(c.pc.lower.join(&new)).unwrap();
        assert!(!on_disk.windows(13).any(|w| w == b"TDEFS-MARKER-"), "{new}: plaintext on disk");
        assert!(fs::metadata(c.m.path(&new)).unwrap().is_file(), "{new} is a file");
        OpenOptions::new().write(true).open(c.m.path(&new)).unwrap().set_len(data.len() as u64).unwrap();
        assert_eq!(fs::read(c.m.path(&new)).unwrap(), data, "{new}");
        drop(pin);
        made.push((new, data));
    }
    println!("inode numbers reused for: {reused:?}");
    assert!(reused.len() >= 2, "the backing reused an inode number only {} times: this proves nothing", reused.len());
    c.m.stop();
    let (code, text) = c.m.check(&[]);
    assert_eq!(code, 0, "{text}");
    c.m.start();
    for (new, data) in &made {
        assert_eq!(&fs::read(c.m.path(new)).unwrap(), data, "{new} after a remount");
    }
}
