//! Behaviour through a real mount (issue 2): data path for every method, holes, renames,
//! links, O_DIRECT, mmap, remounts, key and adoption errors, the hidden metadata directory,
//! ownership, copy_file_range, concurrency, CLI errors, daemon mode.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};

fn falloc(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Random writes, reads, truncates and fallocates against an in-memory model.
fn model_workload(m: &mut Mount, method: &str, seed: u64) {
    let path = m.path("data.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model: Vec<u8> = Vec::new();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let modes = [0, libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                 libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE];
    for step in 0..300 {
        let near_end = model.len() as u64;
        let off: u64 = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..300_000),
            1 => rng.gen_range(0..75) * 4096,
            2 => near_end.saturating_sub(rng.gen_range(0..5000)),
            _ => near_end + rng.gen_range(0..20_000),
        };
        match rng.gen_range(0..10) {
            0..=4 => {
                let len = if rng.gen_bool(0.3) { 4096 * rng.gen_range(1..16) } else { rng.gen_range(1..70_000) };
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                f.write_all_at(&data, off).unwrap();
                let end = off as usize + data.len();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            5 => {
                let n = rng.gen_range(0..350_000);
                f.set_len(n).unwrap();
                model.resize(n as usize, 0);
            }
            6 => {
                let mode = modes[rng.gen_range(0..modes.len())];
                let len = rng.gen_range(1..60_000);
                falloc(&f, mode, off, len).unwrap_or_else(|e| panic!("fallocate mode {mode:#x}: {e}"));
                let end = (off + len) as usize;
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    let zend = end.min(model.len());
                    if (off as usize) < zend {
                        model[off as usize..zend].fill(0);
                    }
                }
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && model.len() < end {
                    model.resize(end, 0);
                }
            }
            _ => {
                let len = rng.gen_range(1..100_000);
                let mut buf = vec![0u8; len];
                let n = read_fully_at(&f, &mut buf, off);
                let lo = (off as usize).min(model.len());
                let hi = (off as usize + len).min(model.len());
                assert_eq!(&buf[..n], &model[lo..hi], "{method}: read at {off}+{len} differs (step {step})");
            }
        }
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(read_all(&path), model, "{method}: whole file");
    let backing = read_all(&m.bpath("data.bin"));
    assert_eq!(backing.len(), model.len(), "{method}: backing file has the same size");
    if method == "plaintext" {
        assert_eq!(backing, model);
    } else {
        // Every 4 KiB block with data must differ in the backing file.
        for (i, (b, p)) in backing.chunks(4096).zip(model.chunks(4096)).enumerate() {
            if p.iter().any(|&x| x != 0) {
                assert_ne!(b, p, "{method}: block {i} is plaintext in the backing file");
            }
        }
    }
    m.remount();
    assert_eq!(read_all(&path), model, "{method}: after remount");
}

fn read_fully_at(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

#[test]
fn random_io_matches_model_for_every_method() {
    for (i, method) in METHODS.iter().enumerate() {
        let mut m = Mount::new(method);
        model_workload(&mut m, method, 1000 + i as u64);
    }
}

#[test]
fn random_io_matches_model_without_writeback_cache() {
    let mut m = Mount::prepare_with("aes256-ctr", "[mount]\nwriteback-cache = false\n");
    m.start();
    model_workload(&mut m, "aes256-ctr", 77);
}

#[test]
fn holes_and_every_fallocate_mode_read_zeros() {
    let m = Mount::new("aes256-ctr");
    let p = m.path("sparse");
    let f = OpenOptions::new().read(true).write(true).create(true).open(&p).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.set_len(1 << 20).unwrap(); // ftruncate-extend from a partial block
    f.write_all_at(b"tail", 3 << 20).unwrap(); // write far past EOF
    falloc(&f, 0, 5 << 20, 1 << 20).unwrap(); // allocate and extend
    falloc(&f, libc::FALLOC_FL_KEEP_SIZE, 6 << 20, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 6 << 20);
    let mut want = vec![0u8; 6 << 20];
    want[..4].copy_from_slice(b"head");
    want[3 << 20..(3 << 20) + 4].copy_from_slice(b"tail");
    assert_eq!(read_all(&p), want);

    // Punch and zero ranges inside data, unaligned at both ends.
    let q = m.path("punched");
    let g = OpenOptions::new().read(true).write(true).create(true).open(&q).unwrap();
    g.write_all_at(&vec![0xAB; 100_000], 0).unwrap();
    falloc(&g, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 1000, 30_000).unwrap();
    falloc(&g, libc::FALLOC_FL_ZERO_RANGE, 50_001, 20_000).unwrap();
    falloc(&g, libc::FALLOC_FL_ZERO_RANGE, 99_000, 10_000).unwrap(); // extends the file
    let mut w = vec![0xAB; 100_000];
    w[1000..31_000].fill(0);
    w[50_001..70_001].fill(0);
    w[99_000..].fill(0);
    w.resize(109_000, 0);
    assert_eq!(read_all(&q), w);

    // SEEK_DATA / SEEK_HOLE pass through to the backing file.
    let s = File::open(&p).unwrap();
    let hole = unsafe { libc::lseek(s.as_raw_fd(), 0, libc::SEEK_HOLE) };
    let data = unsafe { libc::lseek(s.as_raw_fd(), 2 << 20, libc::SEEK_DATA) };
    let b = File::open(m.bpath("sparse")).unwrap();
    assert_eq!(hole, unsafe { libc::lseek(b.as_raw_fd(), 0, libc::SEEK_HOLE) });
    assert_eq!(data, unsafe { libc::lseek(b.as_raw_fd(), 2 << 20, libc::SEEK_DATA) });
    assert_eq!(hole, 4096, "data then a hole");
    assert!(data >= 3 << 20 && data <= (3 << 20) + 4, "next data is the tail write, got {data}");

    // A large sparse file stays sparse on the backing disk.
    let big = OpenOptions::new().read(true).write(true).create(true).open(m.path("huge")).unwrap();
    big.set_len(1 << 30).unwrap();
    big.write_all_at(b"x", (1 << 30) - 1).unwrap();
    big.sync_all().unwrap();
    assert!(fs::metadata(m.bpath("huge")).unwrap().blocks() < 64, "holes stay holes in the backing file");
    let mut mid = vec![1u8; 65536];
    big.read_exact_at(&mut mid, 1 << 29).unwrap();
    assert!(mid.iter().all(|&x| x == 0));
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> std::io::Result<()> {
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, cpath(a).as_ptr(), libc::AT_FDCWD, cpath(b).as_ptr(), flags) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[test]
fn renames_of_files_and_directories() {
    let mut m = Mount::new("sm4-ctr");
    fs::create_dir_all(m.path("d/sub/deeper")).unwrap();
    fs::write(m.path("d/a"), b"file a").unwrap();
    fs::write(m.path("d/sub/b"), b"file b").unwrap();
    fs::write(m.path("d/sub/deeper/c"), vec![9u8; 70_000]).unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    assert_eq!(read_all(&m.path("e/a")), b"file a");
    assert_eq!(read_all(&m.path("e/sub/b")), b"file b");
    fs::create_dir_all(m.path("f/g")).unwrap();
    fs::rename(m.path("e"), m.path("f/g/h")).unwrap();
    assert_eq!(read_all(&m.path("f/g/h/sub/deeper/c")), vec![9u8; 70_000]);

    fs::write(m.path("x"), b"X contents").unwrap();
    fs::write(m.path("y"), b"Y").unwrap();
    fs::rename(m.path("x"), m.path("y")).unwrap();
    assert_eq!(read_all(&m.path("y")), b"X contents");
    assert!(!m.path("x").exists());

    fs::write(m.path("n1"), b"one").unwrap();
    fs::write(m.path("n2"), b"two").unwrap();
    assert_eq!(errno_of(renameat2(&m.path("n1"), &m.path("n2"), libc::RENAME_NOREPLACE)), libc::EEXIST);
    renameat2(&m.path("n1"), &m.path("n3"), libc::RENAME_NOREPLACE).unwrap();
    renameat2(&m.path("n3"), &m.path("n2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!((read_all(&m.path("n2")), read_all(&m.path("n3"))), (b"one".to_vec(), b"two".to_vec()));
    fs::create_dir(m.path("ex")).unwrap();
    fs::write(m.path("ex/in"), b"inside").unwrap();
    renameat2(&m.path("ex"), &m.path("n2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read_all(&m.path("n2/in")), b"inside");
    assert_eq!(read_all(&m.path("ex")), b"one");

    // A file written into the backing directory behind tdefs' back has no record: its
    // bytes are refused (it could be ciphertext whose record was lost), renamed or not.
    fs::write(m.bpath("stray"), b"who knows").unwrap();
    assert_eq!(errno_of(fs::read(m.path("stray"))), libc::EIO);
    fs::rename(m.path("stray"), m.path("stray2")).unwrap();
    assert_eq!(errno_of(fs::read(m.path("stray2"))), libc::EIO);
    assert_eq!(errno_of(OpenOptions::new().write(true).truncate(true).open(m.path("stray2"))), libc::EIO);
    assert_eq!(fs::read(m.bpath("stray2")).unwrap(), b"who knows", "nothing was overwritten");
    fs::remove_file(m.path("stray2")).unwrap();
    // A file recorded as plaintext (`tdefs adopt`) renamed over an encrypted one.
    m.stop();
    fs::write(m.bpath("legacy"), b"legacy plaintext").unwrap();
    let out = Command::new(TDEFS).args(["adopt", "--config"]).arg(&m.config).arg("legacy").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    m.start();
    fs::rename(m.path("legacy"), m.path("y")).unwrap();
    assert_eq!(read_all(&m.path("y")), b"legacy plaintext");

    m.remount();
    assert_eq!(read_all(&m.path("f/g/h/a")), b"file a");
    assert_eq!(read_all(&m.path("f/g/h/sub/b")), b"file b");
    assert_eq!(read_all(&m.path("y")), b"legacy plaintext");
    assert_eq!(read_all(&m.path("n2/in")), b"inside");
    assert_eq!(read_all(&m.path("n3")), b"two");
    assert_eq!(read_all(&m.path("ex")), b"one");
}

#[test]
fn hard_links_share_contents_and_counts() {
    let mut m = Mount::new("aes128-ctr");
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("a"), b"shared").unwrap();
    fs::hard_link(m.path("a"), m.path("dir/b")).unwrap();
    let (ma, mb) = (fs::metadata(m.path("a")).unwrap(), fs::metadata(m.path("dir/b")).unwrap());
    assert_eq!((ma.nlink(), mb.nlink(), ma.ino()), (2, 2, mb.ino()));
    OpenOptions::new().append(true).open(m.path("dir/b")).unwrap().write_all(b" and more").unwrap();
    assert_eq!(read_all(&m.path("a")), b"shared and more");
    fs::remove_file(m.path("a")).unwrap();
    assert_eq!(fs::metadata(m.path("dir/b")).unwrap().nlink(), 1);
    m.remount();
    assert_eq!(read_all(&m.path("dir/b")), b"shared and more");
    fs::hard_link(m.path("dir/b"), m.path("c")).unwrap();
    assert_eq!(read_all(&m.path("c")), b"shared and more");
    assert_eq!(errno_of(fs::hard_link(m.path("c"), m.path("dir/b"))), libc::EEXIST);
}

struct Aligned(*mut u8, usize);
impl Aligned {
    fn new(len: usize) -> Aligned {
        let l = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        Aligned(unsafe { std::alloc::alloc_zeroed(l) }, len)
    }
    fn buf(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.0, std::alloc::Layout::from_size_align(self.1, 4096).unwrap()) }
    }
}

#[test]
fn o_direct_with_aligned_buffers() {
    let mut m = Mount::new("aes256-ctr");
    let p = m.path("direct.dat");
    let f = OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&p).unwrap();
    let mut a = Aligned::new(65536);
    for (i, b) in a.buf().iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    f.write_all_at(a.buf(), 0).unwrap();
    let mut page = Aligned::new(8192);
    page.buf().fill(0x5A);
    f.write_all_at(page.buf(), 131_072).unwrap();
    let mut r = Aligned::new(8192);
    f.read_exact_at(r.buf(), 131_072).unwrap();
    assert!(r.buf().iter().all(|&x| x == 0x5A));
    drop(f);
    let mut want = a.buf().to_vec();
    want.resize(131_072, 0);
    want.extend(vec![0x5A; 8192]);
    m.remount();
    assert_eq!(read_all(&p), want);
}

#[test]
fn shared_writable_mmap_then_read() {
    let mut m = Mount::new("aes256-ctr");
    let p = m.path("mapped");
    let f = OpenOptions::new().read(true).write(true).create(true).open(&p).unwrap();
    let len = 3 * 4096 + 123;
    f.set_len(len as u64).unwrap();
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(addr, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(addr as *mut u8, len);
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i % 200) as u8 + 1;
        }
        assert_eq!(libc::msync(addr, len, libc::MS_SYNC), 0);
        libc::munmap(addr, len);
    }
    let want: Vec<u8> = (0..len).map(|i| (i % 200) as u8 + 1).collect();
    let mut got = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, want);
    assert_ne!(read_all(&m.bpath("mapped")), want);
    drop(f);
    m.remount();
    assert_eq!(read_all(&p), want);
}

#[test]
fn wrong_key_is_refused_and_nothing_changes() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("secret"), b"top secret").unwrap();
    m.stop();
    let before = tree_digest(&m.backing);
    let real = fs::read(&m.key).unwrap();
    fs::remove_file(&m.key).unwrap();
    assert!(Command::new(TDEFS).arg("genkey").arg(&m.key).status().unwrap().success());
    let out = m.mount_fails(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open") && err.contains("wrong key"), "{err}");
    assert!(err.contains(&*m.key.to_string_lossy()), "names the key file: {err}");
    assert_eq!(tree_digest(&m.backing), before, "nothing on disk changed");
    fs::remove_file(&m.key).unwrap();
    fs::write(&m.key, real).unwrap();
    fs::set_permissions(&m.key, fs::Permissions::from_mode(0o600)).unwrap();
    m.start();
    assert_eq!(read_all(&m.path("secret")), b"top secret");
}

#[test]
fn non_empty_backing_is_adopted_only_with_init() {
    let mut m = Mount::prepare("aes256-ctr");
    fs::create_dir(m.bpath("old")).unwrap();
    fs::write(m.bpath("old/legacy.txt"), b"old plaintext data").unwrap();
    let before = tree_digest(&m.backing);
    let out = m.mount_fails(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--init") && err.contains("no tdefs metadata"), "{err}");
    assert_eq!(tree_digest(&m.backing), before, "nothing created without --init");
    m.start_with(&["--init"]);
    assert_eq!(read_all(&m.path("old/legacy.txt")), b"old plaintext data");
    fs::write(m.path("old/new.txt"), b"new data, encrypted").unwrap();
    assert_ne!(read_all(&m.bpath("old/new.txt")), b"new data, encrypted");
    assert_eq!(read_all(&m.bpath("old/legacy.txt")), b"old plaintext data", "untouched");
    m.remount();
    assert_eq!(read_all(&m.path("old/legacy.txt")), b"old plaintext data");
    assert_eq!(read_all(&m.path("old/new.txt")), b"new data, encrypted");
}

#[test]
fn metadata_directory_is_invisible_and_untouchable() {
    let m = Mount::new("aes256-ctr");
    assert!(m.bpath(".tdefs/keys").exists());
    let names: Vec<_> = fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n == ".tdefs"), "{names:?}");
    assert_eq!(errno_of(fs::metadata(m.path(".tdefs"))), libc::ENOENT);
    assert_eq!(errno_of(File::open(m.path(".tdefs/keys"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(m.path(".tdefs"))), libc::EPERM);
    assert_eq!(errno_of(File::create(m.path(".tdefs"))), libc::EPERM);
    fs::write(m.path("f"), b"x").unwrap();
    assert_eq!(errno_of(fs::rename(m.path("f"), m.path(".tdefs"))), libc::EPERM);
    assert_eq!(errno_of(std::os::unix::fs::symlink("x", m.path(".tdefs"))), libc::EPERM);
    // The root's link count is that of a directory without it (2 + subdirectories).
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&m.mnt).unwrap().nlink(), 2);
    fs::create_dir(m.path("sub")).unwrap();
    fs::create_dir(m.path("sub/.tdefs")).unwrap(); // reserved only in the root
    assert_eq!(fs::metadata(&m.mnt).unwrap().nlink(), 3);
}

#[test]
fn files_created_by_another_user_belong_to_that_user() {
    let m = Mount::new("aes256-ctr");
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o1777)).unwrap();
    let script = format!(
        "set -e; cd {:?}; echo hello > userfile; mkdir userdir; ln -s userfile userlink; cat userfile",
        m.mnt
    );
    let out = Command::new("sh").arg("-c").arg(&script).uid(65534).gid(65534).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello\n");
    for name in ["userfile", "userdir", "userlink"] {
        for base in [&m.mnt, &m.backing] {
            let md = fs::symlink_metadata(base.join(name)).unwrap();
            assert_eq!((md.uid(), md.gid()), (65534, 65534), "{}", base.join(name).display());
        }
    }
    // Permissions are the kernel's to check: another user cannot write a root 0644 file.
    fs::write(m.path("rootfile"), b"root").unwrap();
    fs::set_permissions(m.path("rootfile"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("sh").arg("-c").arg(format!("echo x >> {:?}", m.path("rootfile"))).uid(65534).gid(65534).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(read_all(&m.path("rootfile")), b"root");
}

#[test]
fn copy_file_range_goes_through_the_ciphers() {
    let m = Mount::new("aes256-ctr");
    let data: Vec<u8> = (0..300_001u32).map(|i| (i * 31 % 253) as u8).collect();
    fs::write(m.path("src"), &data).unwrap();
    let src = File::open(m.path("src")).unwrap();
    let dst = OpenOptions::new().write(true).create(true).open(m.path("dst")).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (0, 0);
    let mut left = data.len();
    while left > 0 {
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, left, 0) };
        assert!(n > 0, "copy_file_range: {}", std::io::Error::last_os_error());
        left -= n as usize;
    }
    drop(dst);
    assert_eq!(read_all(&m.path("dst")), data);
    let (bs, bd) = (read_all(&m.bpath("src")), read_all(&m.bpath("dst")));
    assert_ne!(bs, bd, "each file has its own IV");
    assert_ne!(bd, data);
}

#[test]
fn xattrs_and_symlinks_pass_through() {
    let m = Mount::new("aes256-ctr");
    fs::write(m.path("f"), b"x").unwrap();
    let p = cpath(&m.path("f"));
    let (name, val) = (c"user.tdefs-test", b"value\0with nul");
    unsafe {
        assert_eq!(libc::setxattr(p.as_ptr(), name.as_ptr(), val.as_ptr().cast(), val.len(), 0), 0);
        let mut buf = [0u8; 64];
        let n = libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert_eq!(&buf[..n as usize], val);
        assert_eq!(libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0), val.len() as isize);
        let n = libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert!(buf[..n as usize].windows(15).any(|w| w == b"user.tdefs-test"));
        assert_eq!(libc::removexattr(p.as_ptr(), name.as_ptr()), 0);
        assert_eq!(libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()), -1);
    }
    // Symlink targets pass through byte for byte, including non-UTF-8.
    let target = std::ffi::OsStr::from_bytes(b"../some/\xffwhere");
    std::os::unix::fs::symlink(target, m.path("link")).unwrap();
    assert_eq!(fs::read_link(m.path("link")).unwrap().as_os_str(), target);
    assert_eq!(fs::read_link(m.bpath("link")).unwrap().as_os_str(), target);
    assert!(fs::symlink_metadata(m.path("link")).unwrap().file_type().is_symlink());
}

#[test]
fn concurrent_writers_and_creators() {
    let m = Mount::new("aes256-ctr");
    let shared = m.path("shared");
    File::create(&shared).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let shared = shared.clone();
            let dir = m.mnt.clone();
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&shared).unwrap();
                let base = t as u64 * 262_144;
                // Aligned pages and odd-sized pieces into this thread's region.
                for i in 0..64u64 {
                    let (off, len) = if i % 2 == 0 { (base + i * 4096, 4096) } else { (base + i * 4096 + 17, 4000) };
                    f.write_all_at(&vec![t + 1; len], off).unwrap();
                }
                for i in 0..50 {
                    fs::write(dir.join(format!("t{t}-{i}")), format!("{t}/{i}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = read_all(&shared);
    for t in 0..8u8 {
        for i in 0..64u64 {
            let off = (t as u64 * 262_144 + i * 4096) as usize;
            let region = &data[off..(off + 4096).min(data.len())];
            if i % 2 == 0 {
                assert!(region.iter().all(|&x| x == t + 1), "thread {t} page {i}");
            } else {
                assert!(region[17..17 + 4000].iter().all(|&x| x == t + 1), "thread {t} piece {i}");
            }
        }
        for i in 0..50 {
            assert_eq!(fs::read_to_string(m.path(&format!("t{t}-{i}"))).unwrap(), format!("{t}/{i}"));
        }
    }
}

#[test]
fn truncate_to_zero_gives_a_fresh_keystream() {
    let mut m = Mount::new("aes256-ctr");
    let p = m.path("journal");
    fs::write(&p, vec![0u8; 8192]).unwrap();
    let first = read_all(&m.bpath("journal"));
    fs::write(&p, vec![0u8; 8192]).unwrap(); // O_TRUNC and rewrite the same bytes
    let second = read_all(&m.bpath("journal"));
    assert_ne!(first, second, "rewriting after O_TRUNC must not reuse the keystream");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(0).unwrap();
    f.write_all_at(&[0u8; 8192], 0).unwrap();
    drop(f);
    assert_ne!(read_all(&m.bpath("journal")), second, "ftruncate(0) too");
    m.remount();
    assert_eq!(read_all(&p), vec![0u8; 8192]);
}

#[test]
fn version_names_the_commit_and_the_crypto_in_use() {
    let out = Command::new(TDEFS).arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = v.lines().collect();
    assert_eq!(lines[0], format!("tdefs {}", env!("CARGO_PKG_VERSION")), "{v}");
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    if let Some(h) = head.ok().filter(|h| h.status.success()) {
        let commit = String::from_utf8_lossy(&h.stdout).trim().to_string();
        assert!(lines.iter().any(|l| l.starts_with(&format!("commit: {commit}"))), "{v}");
    } else {
        assert!(lines.iter().any(|l| l.starts_with("commit: unknown")), "{v}");
    }
    let cpu_aes = fs::read_to_string("/proc/cpuinfo").unwrap().lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "aes"));
    let aes = lines.iter().find(|l| l.starts_with("crypto: AES: RustCrypto aes 0.")).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(aes.ends_with(", AES-NI"), cpu_aes, "{v}");
    for want in ["fuse: fuser 0.18", "crypto: XTS:", "crypto: SM4:", "crypto: metadata: AES-256-GCM"] {
        assert!(lines.iter().any(|l| l.starts_with(want)), "{want} in {v}");
    }
    let short = Command::new(TDEFS).arg("-V").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&short.stdout).trim(), lines[0]);
}

#[test]
fn cli_errors_name_the_problem() {
    let m = Mount::prepare("aes256-ctr");
    let run = |args: &[&str]| Command::new(TDEFS).args(args).output().unwrap();
    let cfg = m.config.to_str().unwrap();

    fs::set_permissions(&m.key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["mount", "--config", cfg]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("chmod 600") && e.contains(&*m.key.to_string_lossy()), "{e}");
    assert!(!m.bpath(".tdefs").exists(), "nothing initialised");
    fs::set_permissions(&m.key, fs::Permissions::from_mode(0o600)).unwrap();

    let text = fs::read_to_string(&m.config).unwrap();
    for (bad, expect) in [
        (text.replace("aes256-ctr", "aes256-gcm"), vec!["aes256-gcm", "sm4-ctr", "data-encryption-method"]),
        (text.replace("[security.encryption]", "[security.encryption]\ndata-key-rotation-period = \"weekly\""), vec!["weekly", "168h"]),
        (text.replace("[security.encryption]", "[security.encryption]\nenable-encryption = true"), vec!["enable-encryption"]),
        (text.replace("type = \"file\"", "type = \"hsm\""), vec!["hsm", "vault", "kmip", "plaintext"]),
    ] {
        fs::write(&m.config, &bad).unwrap();
        let out = run(&["mount", "--config", cfg]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(e.contains(cfg), "names the config file: {e}");
        for x in expect {
            assert!(e.contains(x), "expected {x:?} in: {e}");
        }
    }
    let out = run(&["mount", "--config", "/nonexistent/tdefs.toml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tdefs.toml"));
    fs::write(&m.key, b"0011\n").unwrap();
    let out = run(&["genkey", m.key.to_str().unwrap()]);
    assert!(!out.status.success(), "genkey refuses to overwrite");
    assert_eq!(fs::read(&m.key).unwrap(), b"0011\n");
}

#[test]
fn daemon_mode_returns_when_ready_and_sigterm_unmounts() {
    let m = Mount::prepare("aes256-ctr");
    let out = Command::new(TDEFS)
        .args(["mount", "--daemon", "--log-file"])
        .arg(m.dir.path().join("daemon.log"))
        .arg("--config")
        .arg(&m.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&m.mnt), "mounted when --daemon returns");
    let err = String::from_utf8_lossy(&out.stderr);
    let pid: i32 = err.split("daemon pid ").nth(1).and_then(|s| s.split(')').next()).and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {err}"));
    fs::write(m.path("f"), b"data").unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = std::time::Instant::now();
    while is_mounted(&m.mnt) || Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed().as_secs() < 20, "daemon did not unmount on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(fs::read_to_string(m.dir.path().join("daemon.log")).unwrap().contains("unmounted cleanly"));
}

/// Regression (found by the crash torture): after `link f g; unlink g` the kernel's last
/// name for the inode is gone while `f` remains; emptying `f` then must not re-key it in
/// memory only, or its new contents read as noise after a remount.
#[test]
fn emptying_a_file_whose_last_used_name_was_unlinked() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("f"), vec![1u8; 10_000]).unwrap();
    fs::hard_link(m.path("f"), m.path("g")).unwrap();
    fs::remove_file(m.path("g")).unwrap();
    fs::write(m.path("f"), vec![2u8; 9000]).unwrap(); // O_TRUNC: emptied, then rewritten
    m.remount();
    assert_eq!(read_all(&m.path("f")), vec![2u8; 9000]);
}

/// More files than the daemon may hold descriptors: inodes are reopened by file handle
/// from a bounded descriptor cache (the daemon runs with a 1024-descriptor limit here).
#[test]
fn more_files_than_the_descriptor_limit() {
    let mut m = Mount::prepare("aes256-ctr");
    m.start_limited(&[], Some(1024));
    let n = 3000;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = m.path(&format!("d{t}"));
            std::thread::spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..n / 4 {
                    fs::write(dir.join(format!("f{i}")), format!("{t}:{i}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let check = |m: &Mount| {
        for t in 0..4 {
            let mut count = 0;
            for e in fs::read_dir(m.path(&format!("d{t}"))).unwrap() {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                assert!(md.is_file() && md.len() > 2);
                count += 1;
            }
            assert_eq!(count, n / 4);
            for i in (0..n / 4).step_by(7) {
                assert_eq!(fs::read_to_string(m.path(&format!("d{t}/f{i}"))).unwrap(), format!("{t}:{i}"));
            }
        }
    };
    check(&m);
    fs::rename(m.path("d1"), m.path("moved")).unwrap();
    fs::rename(m.path("moved"), m.path("d1")).unwrap();
    fs::hard_link(m.path("d0/f5"), m.path("link")).unwrap();
    assert_eq!(fs::read_to_string(m.path("link")).unwrap(), "0:5");
    m.stop();
    m.start_limited(&[], Some(1024));
    check(&m);
}

/// As on ext4 (pjdfstest chown/00.t): chown(path, -1, -1) updates ctime, for every type.
#[test]
fn chown_to_no_change_updates_ctime() {
    let m = Mount::new("aes256-ctr");
    fs::write(m.path("file"), b"x").unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    std::os::unix::fs::symlink("file", m.path("link")).unwrap();
    let fifo = cpath(&m.path("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let names = ["file", "dir", "link", "fifo"];
    let before: Vec<i64> = names.iter().map(|n| fs::symlink_metadata(m.path(n)).unwrap().ctime_nsec() + 1_000_000_000 * fs::symlink_metadata(m.path(n)).unwrap().ctime()).collect();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for n in names {
        std::os::unix::fs::lchown(m.path(n), None, None).unwrap();
    }
    // Attributes may be cached for up to a second; read them fresh.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for (n, b) in names.iter().zip(before) {
        let md = fs::symlink_metadata(m.path(n)).unwrap();
        let after = md.ctime_nsec() + 1_000_000_000 * md.ctime();
        assert!(after > b, "{n}: ctime not updated by chown(-1, -1)");
        let bmd = fs::symlink_metadata(m.bpath(n)).unwrap();
        assert!(bmd.ctime() * 1_000_000_000 + bmd.ctime_nsec() > b, "{n}: backing ctime");
    }
}

#[test]
fn deleted_files_with_cached_times_do_not_fail_syncfs() {
    // With the writeback cache the kernel flushes a file's times (SETATTR) after it was
    // closed, even after its name was removed. tdefs must not answer ESTALE for a backing
    // inode that is gone: the kernel records the error and `syncfs` reports it to whoever
    // syncs next (found by untarring over a just-removed tree in the benchmark).
    let mut m = Mount::prepare("aes256-ctr");
    m.env.push(("RUST_LOG".into(), "tdefs=debug".into()));
    m.start_limited(&[], Some(512)); // few cached descriptors: inodes are reopened by handle
    for round in 0..3 {
        let d = m.path("tree");
        fs::create_dir(&d).unwrap();
        for i in 0..1500 {
            fs::write(d.join(format!("f{i}")), format!("round {round} file {i}")).unwrap();
        }
        fs::remove_dir_all(&d).unwrap();
        let dir = File::open(&m.mnt).unwrap();
        let r = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
        assert_eq!(r, 0, "round {round}: syncfs failed: {}\n{}", std::io::Error::last_os_error(),
            m.log_text().lines().filter(|l| l.contains("request failed") && !l.contains("errno=2 ") && !l.contains("errno=61 ")).take(5).collect::<Vec<_>>().join("\n"));
    }
}

#[test]
fn writes_and_truncates_by_other_users_drop_set_id_bits_as_on_ext4() {
    // tdefs takes over this job from the kernel (FUSE_HANDLE_KILLPRIV_V2, so that the kernel
    // stops asking for security.capability before every write); the results must stay
    // those of ext4: set-uid always dropped, set-gid only with group execute, only for
    // callers without CAP_FSETID; root keeps them.
    let m = Mount::new("aes256-ctr");
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let cases = [(0o6777, 0o777), (0o6767, 0o2767), (0o4755, 0o755), (0o2775, 0o775)];
    let as_nobody = |cmd: &str| {
        let st = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c", cmd])
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (before, after) in cases {
        for (what, cmd) in [("write", "echo data >> {}"), ("truncate", "truncate -s 1 {}"), ("O_TRUNC", ": > {}")] {
            let p = m.path(&format!("{what}-{before:o}"));
            fs::write(&p, b"abc").unwrap();
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
            as_nobody(&cmd.replace("{}", p.to_str().unwrap()));
            assert_eq!(mode(&p), after, "{what} by the owner (not root) of a {before:o} file");
        }
        // Not in the file's group: set-gid goes even without group execute (kernel >= 6.2).
        for (what, cmd) in [("write", "echo data >> {}"), ("truncate", "truncate -s 1 {}"), ("O_TRUNC", ": > {}")] {
            let p = m.path(&format!("{what}-othergroup-{before:o}"));
            fs::write(&p, b"abc").unwrap();
            std::os::unix::fs::chown(&p, Some(65534), Some(0)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
            as_nobody(&cmd.replace("{}", p.to_str().unwrap()));
            assert_eq!(mode(&p), before & 0o777, "{what} by a non-member of the group of a {before:o} file");
        }
        let p = m.path(&format!("root-{before:o}"));
        fs::write(&p, b"abc").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
        fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"more").unwrap();
        assert_eq!(mode(&p), before, "root keeps the set-id bits of a {before:o} file");
    }
}

/// Any user of the mount can build a tree 100,000 directories deep. A file created and
/// unlinked at the bottom, compaction, a live `tdefs status`, unmount, `tdefs check` and a
/// second mount must all work: nothing in tdefs recurses per level (before, the unlink's
/// dictionary edit overflowed a request thread's stack and killed the daemon).
#[test]
fn a_tree_100000_directories_deep() {
    let mut m = Mount::prepare("aes256-ctr");
    m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 10");
    m.start();
    let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let open_at = |fd: i32, name: &std::ffi::CStr| {
        let r = unsafe { libc::openat(fd, name.as_ptr(), dir_flags) };
        assert!(r >= 0, "openat: {}", std::io::Error::last_os_error());
        r
    };
    let root = cpath(&m.mnt);
    let mut fd = unsafe { libc::open(root.as_ptr(), dir_flags) };
    let d = c"d";
    for _ in 0..100_000 {
        assert_eq!(unsafe { libc::mkdirat(fd, d.as_ptr(), 0o755) }, 0, "{}", std::io::Error::last_os_error());
        let next = open_at(fd, d);
        unsafe { libc::close(fd) };
        fd = next;
    }
    let f = unsafe { libc::openat(fd, c"bottom".as_ptr(), libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC, 0o644) };
    assert!(f >= 0, "{}", std::io::Error::last_os_error());
    let data = b"at the bottom TDEFS-MARKER-deep";
    assert_eq!(unsafe { libc::pwrite(f, data.as_ptr().cast(), data.len(), 0) }, data.len() as isize);
    let mut back = [0u8; 31];
    assert_eq!(unsafe { libc::pread(f, back.as_mut_ptr().cast(), back.len(), 0) }, 31);
    assert_eq!(&back, data);
    unsafe { libc::close(f) };
    for i in 0..12 {
        fs::write(m.path(&format!("top{i}")), b"x").unwrap(); // compaction is due
    }
    let st = Command::new(TDEFS).arg("status").arg("--json").arg(&m.mnt).output().unwrap();
    assert!(st.status.success(), "{st:?}");
    std::thread::sleep(std::time::Duration::from_millis(2500)); // housekeeping compacts
    assert_eq!(unsafe { libc::unlinkat(fd, c"bottom".as_ptr(), 0) }, 0, "{}", std::io::Error::last_os_error());
    let g = unsafe { libc::openat(fd, c"second".as_ptr(), libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC, 0o644) };
    assert!(g >= 0);
    unsafe { libc::close(g) };
    unsafe { libc::close(fd) };
    m.stop();
    assert!(m.log_text().contains("file dictionary compacted"), "{}", m.log_text());
    let (code, text) = m.check(&[]);
    assert_eq!(code, 0, "{text}");
    m.start();
    assert_eq!(fs::read(m.path("top3")).unwrap(), b"x");
    m.stop();
    // std's remove_dir_all recurses: leave the tree to rm.
    Command::new("rm").arg("-rf").arg(&m.backing).status().unwrap();
}

fn access(p: &Path, mode: i32) -> i32 {
    let r = unsafe { libc::access(cpath(p).as_ptr(), mode) };
    if r == 0 { 0 } else { std::io::Error::last_os_error().raw_os_error().unwrap() }
}

/// Without default_permissions the kernel asks tdefs (FUSE_ACCESS), and tdefs answers from
/// the mode bits as ext4 would (before, it said yes to everything). With allow-other, that
/// configuration is refused: tdefs leaves permission checks to the kernel.
#[test]
fn access_without_default_permissions_checks_the_mode() {
    let mut m = Mount::prepare_with("aes256-ctr", "[mount]\ndefault-permissions = false\nallow-other = false");
    m.start();
    fs::write(m.path("plain"), b"x").unwrap();
    fs::set_permissions(m.path("plain"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(m.path("prog"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(m.path("prog"), fs::Permissions::from_mode(0o744)).unwrap();
    assert_eq!(access(&m.path("plain"), libc::R_OK | libc::W_OK), 0);
    assert_eq!(access(&m.path("plain"), libc::X_OK), libc::EACCES, "root needs an execute bit, as on ext4");
    assert_eq!(access(&m.path("prog"), libc::X_OK), 0);
    assert_eq!(access(&m.path(""), libc::X_OK), 0);
    assert_eq!(access(&m.path("missing"), libc::F_OK), libc::ENOENT);
    m.stop();
    let cfg = fs::read_to_string(&m.config).unwrap().replace("allow-other = false", "allow-other = true");
    fs::write(&m.config, cfg).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("default-permissions = true"), "{err}");
}
