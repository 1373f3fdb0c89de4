//! Online conversion (docs/design.md §10): while the mount serves the database, a
//! background thread encrypts plaintext files, moves files to another method and re-keys
//! files whose data key is too old, rewriting each file in place, chunk by chunk
//! (`file.rs`), throttled (`throttle.rs`). The job is a dictionary record, so a remount
//! continues it; the control socket starts, pauses, resumes, cancels and reports it.

mod file;
mod throttle;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use self::file::{Between, FileOutcome};
use self::throttle::Throttle;
use super::errno::Result;
use super::volume::Volume;
use crate::dictionary::{Job, Record};
use crate::metadir::journal::Journal;
use crate::metadir::status::{self, Conversion};
use crate::metadir::STAGING_PREFIX;


/// The converter of one mount: a thread that runs the job the dictionary records.
pub struct Converter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    volume: Arc<Volume>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

#[derive(Default)]
struct Ctl {
    stop: bool,
    /// Retrying after an error (`tdefs status` says "waiting").
    waiting: bool,
    progress: Progress,
    /// Files this job left as they were (not selected again).
    skipped: HashSet<Vec<u8>>,
    last_error: Option<String>,
}

#[derive(Default, Clone)]
struct Progress {
    files_total: u64,
    files_done: u64,
    files_skipped: u64,
    bytes_total: u64,
    bytes_done: u64,
    current: Option<String>,
    /// Since when, and how many bytes, for the rate (this mount's part of the job).
    since: Option<Instant>,
    bytes_since: u64,
}

/// How a pass over the selected files ended.
enum PassEnd {
    /// Nothing is left to convert: the job is complete.
    Finished,
    /// The selection was worked through; select again (files may have changed meanwhile).
    /// `progressed`: some file was converted.
    Again { progressed: bool },
    /// Stopped (unmount), paused or cancelled: the control loop decides what next.
    Interrupted,
}

impl Converter {
    pub fn start(volume: Arc<Volume>) -> Converter {
        let shared = Arc::new(Shared { volume, ctl: Mutex::new(Ctl::default()), cv: Condvar::new() });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tdefs-convert".into())
            .spawn(move || sh.run())
            .expect("spawn the online conversion thread");
        Converter { shared, thread: Mutex::new(Some(thread)) }
    }

    /// Start a job. Refused while another one exists.
    pub fn submit(&self, job: Job) -> std::result::Result<String, String> {
        let v = &self.shared.volume;
        if self.shared.ctl.lock().stop {
            return Err("the mount is stopping".into());
        }
        if let Some(j) = v.dict.job() {
            return Err(format!(
                "an online conversion to {} is already {}: pause, resume or cancel it (`tdefs convert status` shows it)",
                j.method,
                if j.paused { "paused" } else { "running" }
            ));
        }
        let mut msg = format!("online conversion to {} started", job.method);
        if job.method != v.opts.method {
            msg.push_str(&format!(
                "; note: new files are still created as {} (the config's data-encryption-method); set it to {} for the next mount",
                v.opts.method, job.method
            ));
        }
        {
            let mut c = self.shared.ctl.lock();
            c.skipped.clear();
            c.progress = Progress::default();
            c.last_error = None;
        }
        self.record(Some(job))?;
        tracing::info!("{msg}");
        Ok(msg)
    }

    pub fn pause(&self) -> std::result::Result<String, String> {
        self.set_paused(true)
    }

    pub fn resume(&self) -> std::result::Result<String, String> {
        self.set_paused(false)
    }

    fn set_paused(&self, paused: bool) -> std::result::Result<String, String> {
        let Some(mut job) = self.shared.volume.dict.job() else {
            return Err("no online conversion job on this mount".into());
        };
        if job.paused == paused {
            return Ok(format!("the online conversion is {} already", if paused { "paused" } else { "running" }));
        }
        job.paused = paused;
        self.record(Some(job))?;
        let what = if paused { "paused (files in progress stay consistent; `resume` continues them)" } else { "resumed" };
        tracing::info!("online conversion {what}");
        Ok(format!("online conversion {what}"))
    }

    /// Cancel the job: the file in progress is finished, nothing else is started.
    pub fn cancel(&self) -> std::result::Result<String, String> {
        if self.shared.volume.dict.job().is_none() {
            return Err("no online conversion job on this mount".into());
        }
        self.record(None)?;
        let inflight = self.shared.volume.dict.conversions().len();
        tracing::info!(files_in_progress = inflight, "online conversion cancelled");
        Ok(if inflight > 0 {
            format!("online conversion cancelled; finishing the {inflight} file(s) in progress, then stopping")
        } else {
            "online conversion cancelled".into()
        })
    }

    /// Record the job (durably) and wake the thread.
    fn record(&self, job: Option<Job>) -> std::result::Result<(), String> {
        if self.shared.ctl.lock().stop {
            return Err("the mount is stopping".into());
        }
        let dict = &self.shared.volume.dict;
        let seq = dict.submit(Record::SetJob { job }).map_err(|e| e.to_string())?;
        dict.sync(seq).map_err(|e| e.to_string())?;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// The job's progress for `tdefs status`; `None` without a job or files in progress.
    pub fn status(&self) -> Option<Conversion> {
        self.shared.status()
    }

    /// For the metrics: bytes left, and the state as a number (see `metrics::Gauges`).
    pub fn gauges(&self) -> (u64, i64) {
        match self.shared.status() {
            None => (0, 0),
            Some(c) => {
                let state = match c.state.as_str() {
                    "running" => 1,
                    "paused" => 2,
                    "cancelling" => 3,
                    _ => 4,
                };
                (c.bytes_total.saturating_sub(c.bytes_done), state)
            }
        }
    }
}

impl Converter {
    /// At unmount: the chunk in flight completes, then the thread ends (the job continues
    /// at the next mount). Requests after this are refused.
    pub fn shutdown(&self) {
        self.shared.ctl.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Converter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Shared {
    fn status(&self) -> Option<Conversion> {
        let job = self.volume.dict.job();
        let inflight = !self.volume.dict.conversions().is_empty();
        if job.is_none() && !inflight {
            return None;
        }
        let c = self.ctl.lock();
        let p = &c.progress;
        let rate = p.since.map_or(0, |t| {
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.5 {
                (p.bytes_since as f64 / secs) as u64
            } else {
                0
            }
        });
        let left = p.bytes_total.saturating_sub(p.bytes_done);
        let state = match &job {
            None => "cancelling",
            Some(j) if j.paused => "paused",
            Some(_) if c.waiting => "waiting",
            Some(_) => "running",
        };
        Some(Conversion {
            operation: "online".into(),
            state: state.into(),
            pid: std::process::id(),
            started: job.as_ref().map(|j| status::rfc3339(UNIX_EPOCH + Duration::from_secs(j.started))).unwrap_or_default(),
            files_total: p.files_total,
            files_done: p.files_done,
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            percent_complete: if p.bytes_total == 0 {
                0.0
            } else {
                ((p.bytes_done as f64 * 1000.0 / p.bytes_total as f64).floor() / 10.0).min(100.0)
            },
            bytes_per_second: rate,
            eta_seconds: (rate > 0).then(|| left / rate),
            target_method: job.as_ref().map(|j| j.method.to_string()),
            current_file: p.current.clone(),
            files_skipped: p.files_skipped,
            rate_limit: job.as_ref().map_or(0, |j| j.rate),
            io_share: job.as_ref().map_or(100, |j| j.share),
            last_error: c.last_error.clone(),
        })
    }

    fn run(&self) {
        loop {
            {
                let mut c = self.ctl.lock();
                loop {
                    if c.stop {
                        return;
                    }
                    let job = self.volume.dict.job();
                    // A cancelled job still finishes the files it started (but for those
                    // it had to leave).
                    let inflight = self.volume.dict.conversions().iter().any(|v| !c.skipped.contains(&v.paths[0]));
                    if job.as_ref().map_or(inflight, |j| !j.paused) {
                        break;
                    }
                    self.cv.wait(&mut c);
                }
                c.waiting = false;
            }
            match self.pass() {
                Ok(PassEnd::Again { progressed: true }) | Ok(PassEnd::Interrupted) => {}
                Ok(PassEnd::Again { progressed: false }) => {
                    // Only files that went away or were left: no busy loop over them.
                    let mut c = self.ctl.lock();
                    if !c.stop {
                        self.cv.wait_for(&mut c, Duration::from_secs(1));
                    }
                }
                Ok(PassEnd::Finished) => self.finish(),
                Err(e) => {
                    tracing::error!(error = %e, "online conversion stopped by an error; retrying in 30 s (`tdefs convert cancel` to give up)");
                    let mut c = self.ctl.lock();
                    c.waiting = true;
                    c.last_error = Some(e.to_string());
                    if !c.stop {
                        self.cv.wait_for(&mut c, Duration::from_secs(30));
                    }
                }
            }
        }
    }

    /// Record the job complete and drop the data keys no file uses any more (the point of
    /// re-keying old files).
    fn finish(&self) {
        let v = &self.volume;
        if v.dict.job().is_some() {
            if let Err(e) = v.dict.submit(Record::SetJob { job: None }).and_then(|s| v.dict.sync(s)) {
                tracing::error!(error = %e, "online conversion: cannot record the job's end; it will be checked again");
                return;
            }
        }
        if let Ok(j) = Journal::open(v.dict.dir(), v.keys.instance()) {
            let _ = j.clear(); // the last chunk's copy is stale: give the space back
        }
        let p = self.ctl.lock().progress.clone();
        tracing::info!(
            files = p.files_done, bytes = p.bytes_done, skipped = p.files_skipped,
            "online conversion finished"
        );
        if let Err(e) = v.collect_unused_keys() {
            tracing::warn!(error = %e, "deleting unused data keys after the conversion failed; the housekeeping retries");
        }
        let mut c = self.ctl.lock();
        c.last_error = None;
        c.progress.current = None;
    }

    /// The files of the job: those in conversion first, then the selection.
    fn todo(&self, job: Option<&Job>) -> Vec<Vec<u8>> {
        let v = &self.volume;
        let skipped = self.ctl.lock().skipped.clone();
        let mut todo: Vec<Vec<u8>> =
            v.dict.conversions().into_iter().map(|c| c.paths[0].clone()).filter(|p| !skipped.contains(p)).collect();
        let Some(job) = job else { return todo };
        let old_keys = old_keys(v, job);
        let mut selected = Vec::new();
        v.dict.with_tree(|t| {
            t.for_each(|p, e| {
                let wanted = e.method != job.method || old_keys.contains(&e.key_id);
                if wanted && in_scope(p, &job.paths) && !p.starts_with(STAGING_PREFIX) && t.conversion_at(p).is_none() {
                    selected.push(p.to_vec());
                }
            })
        });
        selected.retain(|p| !skipped.contains(p));
        selected.sort();
        todo.extend(selected);
        todo
    }

    fn pass(&self) -> Result<PassEnd> {
        let v = &self.volume;
        let job = v.dict.job();
        let todo = self.todo(job.as_ref());
        if todo.is_empty() {
            return Ok(if job.is_some() { PassEnd::Finished } else { PassEnd::Interrupted });
        }
        let journal = Journal::open(v.dict.dir(), v.keys.instance())?;
        let sizes: Vec<u64> = todo
            .iter()
            .map(|p| crate::sys::stat_below(v.root_fd(), p).map_or(0, |st| st.st_size as u64))
            .collect();
        {
            let mut c = self.ctl.lock();
            let p = &mut c.progress;
            if p.since.is_none() {
                p.since = Some(Instant::now());
                tracing::info!(files = todo.len(), bytes = sizes.iter().sum::<u64>(), "online conversion: files selected");
            }
            p.files_total = p.files_done + p.files_skipped + todo.len() as u64;
            p.bytes_total = p.bytes_done + sizes.iter().sum::<u64>();
        }
        let mut throttle = job.as_ref().map_or(Throttle::new(0, 100), |j| Throttle::new(j.rate, j.share));
        let period = match job.as_ref().and_then(|j| j.older_than) {
            Some(d) => v.opts.rotation.min(Duration::from_secs(d)),
            None => v.opts.rotation,
        };
        let mut progressed = false;
        for (path, size) in todo.iter().zip(&sizes) {
            let shown = String::from_utf8_lossy(path).into_owned();
            self.ctl.lock().progress.current = Some(shown.clone());
            let job_now = v.dict.job();
            let mut file_bytes = 0u64;
            let last = std::cell::Cell::new(None);
            let outcome = v.convert_file(
                &journal,
                path,
                job_now.as_ref(),
                period,
                |n, held| {
                    file_bytes += n;
                    last.set(Some((n, held)));
                    crate::metrics::conversion_bytes(n);
                    let mut c = self.ctl.lock();
                    c.progress.bytes_done += n;
                    c.progress.bytes_since += n;
                },
                || self.between(&mut throttle, last.take()),
            )?;
            // The file's last chunk is paid for too (many files are a single chunk).
            let stop = matches!(self.between(&mut throttle, last.take()), Between::Stop);
            let mut c = self.ctl.lock();
            c.progress.current = None;
            // The file's selected size not counted chunk by chunk (it shrank, or was done).
            let rest = size.saturating_sub(file_bytes);
            match outcome {
                FileOutcome::Done => {
                    c.progress.files_done += 1;
                    c.progress.bytes_done += rest;
                    progressed = true;
                }
                FileOutcome::Gone => {
                    c.progress.files_total = c.progress.files_total.saturating_sub(1);
                    c.progress.bytes_total = c.progress.bytes_total.saturating_sub(rest);
                    tracing::debug!(file = %shown, "online conversion: the file was renamed or removed meanwhile; a new name is selected in the next pass");
                }
                FileOutcome::Skipped(why) => {
                    tracing::warn!(file = %shown, reason = %why, "online conversion: file skipped");
                    c.progress.files_skipped += 1;
                    c.progress.bytes_done += rest;
                    c.skipped.insert(path.clone());
                }
                FileOutcome::Interrupted => return Ok(PassEnd::Interrupted),
            }
            if c.stop || stop {
                return Ok(PassEnd::Interrupted);
            }
            drop(c);
            // Paused or cancelled: stop between files (a cancel finished this one). The rate
            // and share cannot change within a job.
            match (job.as_ref(), v.dict.job()) {
                (_, Some(j)) if j.paused => return Ok(PassEnd::Interrupted),
                (Some(_), None) => return Ok(PassEnd::Interrupted),
                _ => {}
            }
        }
        // Selected again: files renamed, created or changed meanwhile. The job ends when a
        // selection finds nothing (skipped files are not selected again).
        Ok(PassEnd::Again { progressed })
    }

    /// Before each chunk: wait as the throttle says, then go on unless the mount stops or
    /// the job was paused. (A cancel lets the file finish.)
    fn between(&self, throttle: &mut Throttle, last: Option<(u64, Duration)>) -> Between {
        let mut c = self.ctl.lock();
        if let Some((bytes, held)) = last {
            let until = throttle.after_chunk(bytes, held, Instant::now());
            while !c.stop && Instant::now() < until {
                self.cv.wait_until(&mut c, until);
                if self.volume.dict.job().is_some_and(|j| j.paused) {
                    break;
                }
            }
        }
        if c.stop || self.volume.dict.job().is_some_and(|j| j.paused) {
            return Between::Stop;
        }
        Between::Go
    }
}

/// The data keys `job` moves files off (older than its `--rekey-older-than`).
fn old_keys(v: &Volume, job: &Job) -> HashSet<u64> {
    let now = SystemTime::now();
    match job.older_than {
        None => HashSet::new(),
        Some(d) => v.keys.keys().iter().filter(|k| k.age(now) >= Duration::from_secs(d)).map(|k| k.id).collect(),
    }
}

/// Whether a file recorded as `e` is one `job` converts.
pub(super) fn wanted(v: &Volume, job: &Job, e: &crate::dictionary::FileEntry) -> bool {
    e.method != job.method || old_keys(v, job).contains(&e.key_id)
}

/// Whether `path` is at or below one of `scope` (all paths when it is empty).
fn in_scope(path: &[u8], scope: &[Vec<u8>]) -> bool {
    scope.is_empty()
        || scope.iter().any(|s| path.strip_prefix(s.as_slice()).is_some_and(|rest| rest.is_empty() || rest[0] == b'/'))
}

/// A job as `tdefs convert start` asks for it.
pub fn new_job(method: crate::crypto::Method, older_than: Option<Duration>, paths: Vec<Vec<u8>>, rate: u64, share: u8) -> Job {
    Job { method, older_than: older_than.map(|d| d.as_secs()), paths, rate, share: share.clamp(1, 100), paused: false, started: now_secs() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scope_is_a_path_prefix_by_component() {
        let s = vec![b"/db".to_vec()];
        assert!(super::in_scope(b"/db", &s));
        assert!(super::in_scope(b"/db/base/1", &s));
        assert!(!super::in_scope(b"/dbx/1", &s));
        assert!(super::in_scope(b"/anything", &[]));
    }
}
