//! Loading the dictionary: replay of the snapshot and the logs, the rollback check against
//! the mark, and `salvage` (what `tdefs check --repair` keeps of a damaged log).

use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;


use super::*;
use crate::crypto::SealKeys;
use crate::error::{io_err, IoError};
use crate::sys::{self, Dir};

/// What `load` found; nothing on disk has been changed yet.
pub struct LoadedDictionary {
    pub(super) dir: Arc<Dir>,
    pub tree: Tree,
    pub snapshot: SnapshotInfo,
    /// Log generations replayed, oldest first.
    pub log_gens: Vec<u64>,
    /// Records replayed from the logs.
    pub records: u64,
    pub(super) next_seq: u64,
    pub(super) last_valid_len: u64,
    /// Why the last log ends in a torn record, if it does (cut off by `open_writable`).
    pub torn_tail: Option<(u64, &'static str)>,
    /// Paths written by the replayed records: the only entries a crash can have left stale.
    pub touched: Vec<Vec<u8>>,
    pub(super) stale_logs: Vec<String>,
    /// Format version of the newest log (appends continue in it).
    pub(super) log_version: u16,
    /// Records in the newest log.
    pub(super) newest_records: u64,
    /// The oldest format among the files read (1: upgrade due).
    pub format: u16,
}

impl LoadedDictionary {
    /// Sequence number of the last record.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The newest log generation.
    pub fn generation(&self) -> u64 {
        *self.log_gens.last().expect("load guarantees one log")
    }

    /// Refuse a set of files that ends before `mark` (see the module doc).
    pub fn check_mark(&self, mark: DictMark) -> Result<(), DictError> {
        let (newest, last) = (self.generation(), self.last_seq());
        let refuse = |what: String| Err(DictError::RolledBack { dir: self.dir.path().to_path_buf(), what });
        if newest < mark.gen {
            return refuse(format!("log generation {} is missing (the newest present is {newest})", mark.gen));
        }
        // Compaction creates the next log before it records the new generation, so an
        // empty log one generation ahead is an interrupted compaction; anything more means
        // the key dictionary is the older one.
        if newest > mark.gen && (newest > mark.gen + 1 || self.newest_records > 0) {
            return refuse(format!(
                "log generation {newest} is newer than the generation {} the key dictionary knows (was the key \
                 dictionary restored from an older backup?)",
                mark.gen
            ));
        }
        if last < mark.seq {
            return refuse(format!("the log ends at record {last}, but records up to {} were written", mark.seq));
        }
        if mark.clean && last > mark.seq {
            return refuse(format!(
                "the log holds records up to {last} after a clean close at record {} (was the key dictionary \
                 restored from an older backup?)",
                mark.seq
            ));
        }
        Ok(())
    }
}

impl FileDict {
    /// Create a dictionary in `dir` holding `initial` (durably): generation 1, mark
    /// `DictMark { gen: 1, seq: 0, clean: true }` for the caller to store.
    pub fn create(dir: &Dir, keys: &SealKeys, instance: &[u8; 16], initial: &Tree) -> Result<(), DictError> {
        let info = SnapshotInfo { covers_gen: 0, last_seq: 0 };
        let snap = snapshot::encode(initial, keys, instance, info);
        dir.write_durably(SNAPSHOT_FILE, &snap).map_err(io_err("write", &dir.join(SNAPSHOT_FILE)))?;
        let name = log_file_name(1);
        Ok(dir.write_durably(&name, &log::encode_header(1, instance)).map_err(io_err("write", &dir.join(&name)))?)
    }

    /// Read the snapshot and replay the logs, and check them against `mark` (none: a
    /// format 1 key dictionary, which kept no mark). Changes nothing on disk.
    pub fn load(dir: &Arc<Dir>, keys: &SealKeys, instance: &[u8; 16], mark: Option<DictMark>) -> Result<LoadedDictionary, DictError> {
        let started = Instant::now();
        let loaded = Self::replay(dir, keys, instance, None)?;
        if let Some(m) = mark {
            loaded.check_mark(m)?;
        }
        crate::metrics::dictionary_loaded(started.elapsed());
        Ok(loaded)
    }

    /// The snapshot plus the logs after it, up to generation `upto` (all of them: `None`).
    pub(super) fn replay(dir: &Arc<Dir>, keys: &SealKeys, instance: &[u8; 16], upto: Option<u64>) -> Result<LoadedDictionary, DictError> {
        let snap_path = dir.join(SNAPSHOT_FILE);
        let f = dir.open(SNAPSHOT_FILE, libc::O_RDONLY).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DictError::Missing { dir: dir.path().into(), what: format!("{SNAPSHOT_FILE} is missing") },
            _ => IoError::new("open", snap_path.clone(), e).into(),
        })?;
        let (mut tree, info, mut format) = snapshot::decode(&mut io::BufReader::with_capacity(1 << 20, f), keys, instance)
            .map_err(|e| match e {
                snapshot::SnapError::Header(err) => DictError::Header { path: snap_path.clone(), err },
                snapshot::SnapError::Damaged { offset, reason } => {
                    DictError::Damaged { path: snap_path.clone(), what: "file dictionary snapshot", offset, reason }
                }
                snapshot::SnapError::ForeignInstance => DictError::Foreign { path: snap_path.clone() },
                snapshot::SnapError::Io(err) => IoError::new("read", snap_path.clone(), err).into(),
            })?;

        let mut gens = Vec::new();
        for name in dir.list().map_err(io_err("list", dir.path()))? {
            if let Some(g) = name.to_str().and_then(log::parse_log_file_name) {
                gens.push(g);
            }
        }
        gens.sort_unstable();
        let stale_logs = gens.iter().filter(|&&g| g <= info.covers_gen).map(|&g| log_file_name(g)).collect();
        gens.retain(|&g| g > info.covers_gen && upto.is_none_or(|u| g <= u));
        if gens.is_empty() {
            return Err(DictError::Missing {
                dir: dir.path().into(),
                what: format!("no log after generation {} (the snapshot's)", info.covers_gen),
            });
        }
        for (i, g) in gens.iter().enumerate() {
            if *g != info.covers_gen + 1 + i as u64 {
                return Err(DictError::Missing {
                    dir: dir.path().into(),
                    what: format!("log generation {} is missing", info.covers_gen + 1 + i as u64),
                });
            }
        }

        let mut next_seq = info.last_seq + 1;
        let (mut records, mut touched, mut torn_tail, mut last_valid_len) = (0, Vec::new(), None, 0);
        let (mut log_version, mut newest_records) = (crate::codec::FORMAT_VERSION, 0);
        for (i, &gen) in gens.iter().enumerate() {
            let path = dir.join(&log_file_name(gen));
            let bytes = dir.read(&log_file_name(gen)).map_err(io_err("read", &path))?;
            let version = log::check_log_header(&bytes, gen, instance).map_err(|p| match p {
                log::HeaderProblem::Format(err) => DictError::Header { path: path.clone(), err },
                log::HeaderProblem::Instance => DictError::Foreign { path: path.clone() },
                log::HeaderProblem::Checksum => DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: "header checksum mismatch".into(),
                },
                log::HeaderProblem::Generation(g) => DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: format!("header says generation {g}"),
                },
            })?;
            format = format.min(version);
            // Only the live log may end in a torn record: a log that compaction will read
            // (`upto`) was closed whole.
            let is_last = i + 1 == gens.len() && upto.is_none();
            let seal = log::log_seal(keys, gen, version);
            let c = log::read_log(&bytes, &seal, instance, gen, version, next_seq, is_last).map_err(|d| DictError::Damaged {
                path: path.clone(),
                what: LOG_WHAT,
                offset: d.offset,
                reason: d.reason,
            })?;
            for (seq, rec) in &c.records {
                tree.apply(*seq, rec).map_err(|e| DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: format!("record {seq}: {}", e.0),
                })?;
                if let Record::Put { path, .. } | Record::ConvertLink { path, .. } = rec {
                    touched.push(path.clone());
                }
            }
            records += c.records.len() as u64;
            next_seq += c.records.len() as u64;
            if i + 1 == gens.len() {
                last_valid_len = c.valid_len;
                torn_tail = c.torn.map(|why| ((bytes.len() as u64 - c.valid_len), why));
                log_version = version;
                newest_records = c.records.len() as u64;
            }
        }
        Ok(LoadedDictionary {
            dir: dir.clone(),
            tree,
            snapshot: info,
            log_gens: gens,
            records,
            next_seq,
            last_valid_len,
            torn_tail,
            touched,
            stale_logs,
            log_version,
            newest_records,
            format,
        })
    }

    /// Cut a damaged log before its damage so the dictionary loads again, keeping a copy of
    /// every file changed (`<name>.damaged`). Later log generations are set aside the same
    /// way. Returns the files set aside.
    pub fn salvage(dir: &Dir, err: &DictError) -> Result<Vec<PathBuf>, DictError> {
        let DictError::Damaged { path, what, offset, .. } = err else {
            return Ok(Vec::new());
        };
        if *what != LOG_WHAT {
            return Ok(Vec::new());
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { return Ok(Vec::new()) };
        let gen = log::parse_log_file_name(&name).unwrap_or(0);
        let mut kept = Vec::new();
        // Each copy is made durable before the log is cut or removed: the copy is what
        // keeps the records after the damage.
        let aside = |name: &str, kept: &mut Vec<PathBuf>| -> Result<(), DictError> {
            use std::io::Write;
            let copy = format!("{name}.damaged");
            let bytes = dir.read(name).map_err(io_err("read", &dir.join(name)))?;
            dir.remove_if_exists(&copy).map_err(io_err("remove", &dir.join(&copy)))?;
            let mut f = dir.create_new(&copy).map_err(io_err("create", &dir.join(&copy)))?;
            f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io_err("write", &dir.join(&copy)))?;
            dir.sync().map_err(io_err("fsync", dir.path()))?;
            kept.push(dir.join(&copy));
            Ok(())
        };
        aside(&name, &mut kept)?;
        let cut = (*offset).max(LOG_HEADER_LEN as u64);
        let f = dir.open(&name, libc::O_RDWR).map_err(io_err("open", path))?;
        sys::ftruncate(f.as_fd(), cut).map_err(io_err("truncate", path))?;
        sys::fsync(f.as_fd()).map_err(io_err("fsync", path))?;
        let mut g = gen + 1;
        loop {
            let later = log_file_name(g);
            if dir.open(&later, libc::O_RDONLY).is_err() {
                break;
            }
            aside(&later, &mut kept)?;
            dir.remove(&later).map_err(io_err("remove", &dir.join(&later)))?;
            g += 1;
        }
        dir.sync().map_err(io_err("fsync", dir.path()))?;
        Ok(kept)
    }
}
