//! Benchmark helpers for tdefs (not timed tests): dictionary scale and create rate.
//!
//! `tdefs-bench dict-load --entries N --workdir D --tdefs BIN`: writes a dictionary of N
//! entries directly (through the library), then times a real `tdefs mount` of it until the
//! mount is live and reports the daemon's peak RSS.
//! `tdefs-bench create-rate --dir MNT --threads T --files N`: T threads create+write+close
//! N small files in all through a mount; reports files/s.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tdefs::config::MasterKeyConfig;
use tdefs::crypto::{random_iv, Method};
use tdefs::dictionary::{FileEntry, Record};
use tdefs::metadir::{MasterKeys, Metadata, OpenOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    DictLoad {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        #[arg(long)]
        workdir: PathBuf,
        #[arg(long)]
        tdefs: PathBuf,
    },
    CreateRate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        threads: u64,
        #[arg(long, default_value_t = 40_000)]
        files: u64,
    },
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4) == Some(want))
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dict_load(entries: u64, work: &Path, tdefs: &Path) -> ExitCode {
    let (backing, mnt) = (work.join("backing"), work.join("mnt"));
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let key = work.join("master.key");
    tdefs::keys::generate_key_file(&key).unwrap();
    let master = MasterKeyConfig::File { path: key.clone() };
    let t = Instant::now();
    {
        let meta = Metadata::open_or_init(&backing, &MasterKeys { current: &master, previous: None }, &OpenOptions { adopt: false, rewrite_threshold: u64::MAX }).unwrap();
        let k = meta.keys.key_for_new_file(Method::Aes256Ctr, Duration::from_secs(86400)).unwrap().unwrap();
        for i in 0..entries {
            // A database-like tree: 1000 directories, 40-byte paths.
            let path = format!("/base/{:05}/relfile-{:09}", i % 1000, i).into_bytes();
            meta.dict.submit(Record::Put { path, entry: FileEntry { method: k.method, key_id: k.id, iv: random_iv() } }).unwrap();
        }
        meta.dict.flush().unwrap();
        meta.dict.compact().unwrap();
        println!("wrote a {entries}-entry dictionary ({:.1} MiB on disk) in {:.1} s", meta.dict.disk_size() as f64 / 1048576.0, t.elapsed().as_secs_f64());
    }
    let config = work.join("tdefs.toml");
    std::fs::write(&config, format!(
        "backing-dir = {backing:?}\nmountpoint = {mnt:?}\n[security.encryption]\n[security.encryption.master-key]\ntype = \"file\"\npath = {key:?}\n"
    )).unwrap();
    let mut best = f64::MAX;
    let mut peak = 0;
    for _ in 0..3 {
        // Cold-ish: drop the page cache so the snapshot is read from disk.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        let t = Instant::now();
        let mut child = Command::new(tdefs).args(["mount", "--config"]).arg(&config)
            .stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        while !is_mounted(&mnt) {
            assert!(child.try_wait().unwrap().is_none(), "tdefs exited");
            std::thread::sleep(Duration::from_millis(2));
        }
        let secs = t.elapsed().as_secs_f64();
        best = best.min(secs);
        peak = peak.max(status_kb(child.id(), "VmHWM:"));
        let rss = status_kb(child.id(), "VmRSS:");
        println!("mount of {entries} entries: live after {secs:.2} s; daemon RSS {:.0} MiB (peak {:.0} MiB)", rss as f64 / 1024.0, status_kb(child.id(), "VmHWM:") as f64 / 1024.0);
        Command::new("fusermount3").arg("-u").arg(&mnt).status().unwrap();
        child.wait().unwrap();
    }
    println!("dict-load: entries={entries} mount_s={best:.2} peak_rss_mib={:.0}", peak as f64 / 1024.0);
    ExitCode::SUCCESS
}

fn create_rate(dir: &Path, threads: u64, files: u64) -> ExitCode {
    let per = files / threads;
    let t = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|th| {
            let d = dir.join(format!("creators-{th}"));
            std::fs::create_dir_all(&d).unwrap();
            std::thread::spawn(move || {
                for i in 0..per {
                    std::fs::write(d.join(format!("f{i}")), b"0123456789abcdef").unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!("create-rate: threads={threads} files={} seconds={secs:.2} files_per_s={:.0}", per * threads, (per * threads) as f64 / secs);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::DictLoad { entries, workdir, tdefs } => dict_load(entries, &workdir, &tdefs),
        Cmd::CreateRate { dir, threads, files } => create_rate(&dir, threads, files),
    }
}
