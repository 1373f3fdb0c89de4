//! Progress of a conversion: an indicatif bar (bytes/s, ETA) on a terminal, a plain line
//! every few seconds otherwise, and the progress file that `tdefs status` reads while the
//! converter holds the backing directory's lock.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::metadir::PROGRESS_FILE;
use crate::sys::Dir;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::metadir::status::{rfc3339, Conversion, Status};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Display {
    /// A bar on a terminal, lines otherwise.
    Auto,
    Bar,
    Lines,
    None,
}

const LINE_EVERY: Duration = Duration::from_secs(5);
const FILE_EVERY: Duration = Duration::from_millis(500);

pub struct Progress {
    op: &'static str,
    bar: Option<ProgressBar>,
    lines: bool,
    files_total: u64,
    files_done: u64,
    bytes_total: u64,
    bytes_done: u64,
    started: Instant,
    started_wall: SystemTime,
    last_line: Instant,
    last_file: Option<Instant>,
    /// Where `tdefs status` looks, and the status to write there (with `conversion` live).
    file: Option<(Arc<Dir>, Status)>,
}

impl Progress {
    pub fn new(op: &'static str, display: Display, files_total: u64, bytes_total: u64) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = match display {
            Display::Bar => true,
            Display::Auto => terminal,
            Display::Lines | Display::None => false,
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(Some(bytes_total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            b.set_prefix(format!("tdefs {op}"));
            b
        });
        let now = Instant::now();
        Progress {
            op,
            bar,
            lines: display == Display::Lines || (display == Display::Auto && !terminal),
            files_total,
            files_done: 0,
            bytes_total,
            bytes_done: 0,
            started: now,
            started_wall: SystemTime::now(),
            last_line: now,
            last_file: None,
            file: None,
        }
    }

    /// Keep `status` (with this run's progress) in the progress file of `dir` (the staging
    /// directory) while the run lasts.
    pub fn publish_to(&mut self, dir: Arc<Dir>, status: Status) {
        self.file = Some((dir, status));
        self.write_file(true);
    }

    /// The published status, for a converter that changes what it counts.
    pub fn status_mut(&mut self) -> Option<&mut Status> {
        self.file.as_mut().map(|(_, s)| s)
    }

    pub fn bytes(&mut self, n: u64) {
        self.bytes_done += n;
        if let Some(b) = &self.bar {
            b.set_position(self.bytes_done);
        }
        self.tick();
    }

    pub fn file_done(&mut self) {
        self.files_done += 1;
        if let Some(b) = &self.bar {
            b.set_message(format!("{}/{} files", self.files_done, self.files_total));
        }
        self.tick();
    }

    /// A message that must not be drawn over by the bar.
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            (self.bytes_done as f64 / secs) as u64
        } else {
            0
        }
    }

    fn percent(&self) -> f64 {
        if self.bytes_total == 0 {
            if self.files_total == 0 {
                100.0
            } else {
                self.files_done as f64 * 100.0 / self.files_total as f64
            }
        } else {
            self.bytes_done as f64 * 100.0 / self.bytes_total as f64
        }
    }

    fn conversion(&self, state: &str) -> Conversion {
        let rate = self.rate();
        Conversion {
            operation: self.op.into(),
            state: state.into(),
            pid: std::process::id(),
            started: rfc3339(self.started_wall),
            files_total: self.files_total,
            files_done: self.files_done,
            bytes_total: self.bytes_total,
            bytes_done: self.bytes_done,
            percent_complete: (self.percent() * 10.0).floor() / 10.0,
            bytes_per_second: rate,
            eta_seconds: (rate > 0).then(|| self.bytes_total.saturating_sub(self.bytes_done) / rate),
            ..Default::default()
        }
    }

    fn tick(&mut self) {
        if self.lines && self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            eprintln!("{}", self.line());
        }
        self.write_file(false);
    }

    fn line(&self) -> String {
        let c = self.conversion("running");
        let eta = c.eta_seconds.map(|e| format!(", ETA {}", humantime::format_duration(Duration::from_secs(e)))).unwrap_or_default();
        format!(
            "tdefs {}: {:.1}% ({} of {} files, {} of {}, {}/s{eta})",
            self.op,
            c.percent_complete,
            self.files_done,
            self.files_total,
            HumanBytes(self.bytes_done),
            HumanBytes(self.bytes_total),
            HumanBytes(c.bytes_per_second)
        )
    }

    /// Replace the progress file (rename: a reader never sees half of it). Not fsynced:
    /// after a crash it is only a hint, and `status` says the run was interrupted.
    fn write_file(&mut self, force: bool) {
        if !force && self.last_file.is_some_and(|t| t.elapsed() < FILE_EVERY) {
            return;
        }
        self.last_file = Some(Instant::now());
        let conv = self.conversion("running");
        let Some((dir, status)) = &mut self.file else { return };
        status.conversion = Some(conv);
        let json = serde_json::to_vec_pretty(status).expect("status serializes");
        if let Err(e) = dir.write(PROGRESS_FILE, &json) {
            tracing::debug!(error = %e, "cannot update the progress file");
        }
    }

    /// The run is over: final line, and no more progress file.
    pub fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.lines || self.bar.is_some() {
            eprintln!("{} in {}", self.line(), humantime::format_duration(Duration::from_secs(self.started.elapsed().as_secs())));
        }
        if let Some((dir, _)) = self.file.take() {
            let _ = dir.remove_if_exists(PROGRESS_FILE);
        }
    }
}
