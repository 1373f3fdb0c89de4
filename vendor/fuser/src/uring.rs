//! FUSE over io_uring (Linux 6.14+, `FUSE_OVER_IO_URING`).
//!
//! Protocol (fs/fuse/dev_uring.c, include/uapi/linux/fuse.h): after an INIT reply that
//! carries `FUSE_OVER_IO_URING`, the daemon registers *ring entries*, each a pair of buffers
//! (a 288-byte header and a payload), with `IORING_OP_URING_CMD` commands on the
//! `/dev/fuse` descriptor, one set per possible CPU (the queue id). A request arrives as the
//! completion of such a command; the reply is written into the same entry and sent with
//! `COMMIT_AND_FETCH`, which re-arms the entry for the next request in the same system
//! call. FORGET, INTERRUPT and notifications keep using `/dev/fuse`.
//!
//! Threads: each queue gets `threads` threads, each with its own ring and one entry
//! armed, so a request never waits behind a busy thread while another is idle. A
//! filesystem may keep a reply and send it later from another thread: the entry stays
//! with that reply, so the thread arms a fresh entry to keep serving. A reply sent from a
//! foreign thread is written into the entry there and handed to the owning thread through
//! a mailbox and an eventfd: io_uring ties a command to the task that submitted it and
//! cancels it when that task exits, so only the long-lived ring threads submit.
//!
//! Entry buffers are never freed: the kernel keeps their addresses until the connection
//! is gone, so they live as long as the process (one set per mount).

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::ll::Errno;
use crate::ll::RequestId;
use crate::ll::ResponseErrno;
use crate::read_buf::FuseReadBuf;
use crate::reply::Reply;
use crate::reply::ReplyRaw;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;
use crate::session::UringPlan;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `sizeof(struct fuse_in_header)`, `sizeof(struct fuse_out_header)`
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const OP_IN: usize = 128;
/// user_data of the eventfd read that wakes a ring thread for a foreign reply
const WAKE: u64 = u64::MAX;

/// `struct fuse_uring_req_header`
#[repr(C)]
struct Header {
    in_out: [u8; 128],
    op_in: [u8; OP_IN],
    // struct fuse_uring_ent_in_out
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// One ring entry: its buffers, shared with the kernel.
struct Ent {
    hdr: *mut Header,
    payload: *mut u8,
    cap: usize,
    iov: [libc::iovec; 2],
    /// Set when the reply is in the buffers; cleared when a request arrives.
    replied: AtomicBool,
}

// The buffers are touched by one side at a time: the ring thread between a completion and
// the dispatch, then only the one reply (ReplyRaw replies exactly once).
unsafe impl Send for Ent {}
unsafe impl Sync for Ent {}

impl Ent {
    fn leak(cap: usize) -> &'static Ent {
        let hdr = Box::into_raw(Box::new(Header {
            in_out: [0; 128],
            op_in: [0; OP_IN],
            flags: 0,
            commit_id: 0,
            payload_sz: 0,
            padding: 0,
            reserved: 0,
        }));
        let payload = Box::leak(vec![0u8; cap].into_boxed_slice()).as_mut_ptr();
        let iov = [
            libc::iovec { iov_base: hdr.cast(), iov_len: size_of::<Header>() },
            libc::iovec { iov_base: payload.cast(), iov_len: cap },
        ];
        Box::leak(Box::new(Ent { hdr, payload, cap, iov, replied: AtomicBool::new(false) }))
    }
}

/// What reply senders share with a ring thread.
#[derive(Debug)]
struct Shared {
    owner: ThreadId,
    /// entries whose replies foreign threads wrote, to be committed by the owner
    mailbox: Mutex<Vec<u32>>,
    efd: OwnedFd,
    ch: ChannelSender,
}

/// Sends one reply into the ring entry its request came in.
#[derive(Clone)]
pub(crate) struct UringSender {
    shared: Arc<Shared>,
    ent: &'static Ent,
    idx: u32,
}

impl std::fmt::Debug for UringSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringSender").field("idx", &self.idx).finish()
    }
}

impl UringSender {
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.shared.ch
    }

    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let ent = self.ent;
        let total: usize = data.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > ent.cap {
            return Err(io::Error::other(format!("FUSE reply of {total} bytes does not fit a ring entry")));
        }
        // SAFETY: the entry is ours until it is committed (see `Ent`).
        unsafe {
            let mut at = 0usize;
            for b in data {
                let mut b: &[u8] = b;
                if at < OUT_HEADER {
                    let n = (OUT_HEADER - at).min(b.len());
                    std::ptr::copy_nonoverlapping(b.as_ptr(), (*ent.hdr).in_out.as_mut_ptr().add(at), n);
                    at += n;
                    b = &b[n..];
                }
                std::ptr::copy_nonoverlapping(b.as_ptr(), ent.payload.add(at - OUT_HEADER), b.len());
                at += b.len();
            }
            (*ent.hdr).payload_sz = (total - OUT_HEADER) as u32;
        }
        ent.replied.store(true, Ordering::Release);
        if std::thread::current().id() == self.shared.owner {
            // Committed with the ring thread's next wait: one system call for both.
            LOCAL.with(|l| l.borrow_mut().push(self.idx));
        } else {
            self.shared.mailbox.lock().unwrap().push(self.idx);
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes to an eventfd we own.
            let rc = unsafe { libc::write(self.shared.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
            if rc != 8 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Entries the ring thread replied to itself, to commit before it waits.
    static LOCAL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The possible CPUs (`/sys/devices/system/cpu/possible`): the kernel wants a queue for each.
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0usize;
    for part in s.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let last: usize = last.parse().map_err(|_| io::Error::other(format!("cannot parse possible CPUs {s:?}")))?;
        n = n.max(last + 1);
    }
    Ok(n)
}

/// Payload size the kernel requires of every entry: max(8 KiB, max_write, max_pages pages).
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    (8192usize).max(max_write as usize).max(usize::from(max_pages) * page_size::get())
}

/// Start the ring threads: `per_queue` for each of the plan's queues. They end when the
/// connection does.
pub(crate) fn spawn<FS: Filesystem>(
    template: &SessionEventLoop<FS>,
    plan: UringPlan,
    per_queue: usize,
) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
    let mut threads = Vec::new();
    for qid in 0..plan.queues {
        for t in 0..per_queue {
            let name = format!("fuser-uring-{qid}.{t}");
            let se = SessionEventLoop {
                thread_name: name.clone(),
                ch: template.ch.clone(),
                filesystem: template.filesystem.clone(),
                allowed: template.allowed,
                session_owner: template.session_owner,
            };
            let cap = plan.payload;
            threads.push(std::thread::Builder::new().name(name).spawn(move || ring_thread(se, qid as u16, cap))?);
        }
    }
    Ok(threads)
}

struct RingThread {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fd: RawFd,
    qid: u16,
    ents: Vec<&'static Ent>,
    cap: usize,
    efd_buf: Box<u64>,
}

impl RingThread {
    fn push(&mut self, sqe: squeue::Entry128) -> io::Result<()> {
        loop {
            // SAFETY: the buffers the entry points at are leaked (`Ent`) or owned by self.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn cmd(&self, op: u32, idx: u32, commit_id: u64) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let ent = self.ents[idx as usize];
        let mut sqe = opcode::UringCmd80::new(types::Fd(self.fd), op)
            .cmd(cmd)
            .addr(Some(ent.iov.as_ptr() as u64))
            .build()
            .user_data(u64::from(idx));
        // sqe->len: the number of iovecs (2), which UringCmd80 has no setter for (byte 24).
        // SAFETY: Entry128 is the 128-byte io_uring_sqe; `len` is the u32 at offset 24.
        unsafe { (&raw mut sqe).cast::<u8>().add(24).cast::<u32>().write_unaligned(2) };
        sqe
    }

    fn register(&mut self) -> io::Result<()> {
        self.ents.push(Ent::leak(self.cap));
        let idx = (self.ents.len() - 1) as u32;
        let sqe = self.cmd(CMD_REGISTER, idx, 0);
        self.push(sqe)
    }

    fn commit(&mut self, idx: u32) -> io::Result<()> {
        // SAFETY: the reply has been written; the kernel reads the header now.
        let commit_id = unsafe { (*self.ents[idx as usize].hdr).commit_id };
        let sqe = self.cmd(CMD_COMMIT_AND_FETCH, idx, commit_id);
        self.push(sqe)
    }

    fn arm_wake(&mut self, efd: RawFd) -> io::Result<()> {
        let sqe = opcode::Read::new(types::Fd(efd), (&raw mut *self.efd_buf).cast(), 8).build().user_data(WAKE);
        self.push(squeue::Entry128::from(sqe))
    }
}

/// Keep a queue's threads on the queue's CPU, as libfuse does: the kernel queues a request
/// on the CPU the application runs on, so the thread that answers it is woken there, where
/// the application has just gone to sleep (no cross-CPU wake-up, warm caches).
fn pin_to_cpu(qid: u16) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for qid < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if usize::from(qid) >= 8 * size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(usize::from(qid), &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            // A possible CPU that is not online, or a cpuset without it: run anywhere.
            debug!("FUSE io_uring queue {qid}: not pinned: {}", io::Error::last_os_error());
        }
    }
}

fn ring_thread<FS: Filesystem>(se: SessionEventLoop<FS>, qid: u16, cap: usize) -> io::Result<()> {
    pin_to_cpu(qid);
    let ch: &Channel = &se.ch;
    // SAFETY: eventfd(2) returns a new descriptor or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: efd was just created and is owned here.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let efd_raw = efd.as_raw_fd();
    let shared = Arc::new(Shared {
        owner: std::thread::current().id(),
        mailbox: Mutex::new(Vec::new()),
        efd,
        ch: ch.sender(),
    });
    let mut rt = RingThread {
        ring: IoUring::builder().build(64)?,
        fd: ch.as_fd().as_raw_fd(),
        qid,
        ents: Vec::new(),
        cap,
        efd_buf: Box::new(0),
    };
    rt.register()?;
    rt.arm_wake(efd_raw)?;
    // The buffer the /dev/fuse threads read into: aligned for fuser's parser.
    let mut parse = FuseReadBuf::new();
    let bytes = parse.as_mut();
    let mut served = false;
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(16);
    loop {
        LOCAL.with(|l| -> io::Result<()> {
            for idx in l.borrow_mut().drain(..) {
                rt.commit(idx)?;
            }
            Ok(())
        })?;
        match rt.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(rt.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &done {
            if user_data == WAKE {
                let idxs = std::mem::take(&mut *shared.mailbox.lock().unwrap());
                for idx in idxs {
                    rt.commit(idx)?;
                }
                rt.arm_wake(efd_raw)?;
                continue;
            }
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                // ENOTCONN (or the ring cancelled, the device gone): unmounted, the normal
                // end. Anything else before the first request: the kernel refused the ring
                // and serves everything over /dev/fuse instead.
                let ended = [libc::ENOTCONN, libc::ECANCELED, libc::ENODEV].contains(&-res);
                if !served && !ended {
                    warn!("FUSE io_uring queue {qid}: registering failed ({err}); requests go over /dev/fuse");
                } else {
                    debug!("FUSE io_uring queue {qid} ends: {err}");
                }
                return Ok(());
            }
            served = true;
            let idx = user_data as u32;
            let ent = rt.ents[idx as usize];
            ent.replied.store(false, Ordering::Relaxed);
            let sender = UringSender { shared: shared.clone(), ent, idx };
            match assemble(ent, bytes).and_then(|len| {
                RequestWithSender::new(ReplySender::Uring(sender.clone()), &bytes[..len]).ok_or_else(|| "unparsable request".to_string())
            }) {
                Ok(req) => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<ReplyEmpty>().ok();
                    } else {
                        req.dispatch(&se);
                    }
                }
                Err(e) => {
                    // Fail the request rather than lose the entry.
                    warn!("FUSE io_uring: {e}");
                    // SAFETY: the kernel has filled the entry; the unique id is at 8..16.
                    let unique = u64::from_ne_bytes(unsafe { (&(*ent.hdr).in_out)[8..16].try_into().unwrap() });
                    <ReplyRaw as Reply>::new(RequestId(unique), ReplySender::Uring(sender)).send_ll(&ResponseErrno(Errno::EIO));
                }
            }
            if !ent.replied.load(Ordering::Acquire) {
                // The filesystem keeps the reply for later: the entry goes with it.
                rt.register()?;
            }
        }
    }
}

/// The request as `/dev/fuse` would deliver it: in header, the opcode's struct, payload.
fn assemble(ent: &Ent, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: the kernel has filled the entry and completed; it is ours until committed.
    unsafe {
        let hdr = &*ent.hdr;
        let len = u32::from_ne_bytes(hdr.in_out[..4].try_into().unwrap()) as usize;
        let payload = hdr.payload_sz as usize;
        let Some(op) = len.checked_sub(IN_HEADER + payload).filter(|op| *op <= OP_IN && payload <= ent.cap) else {
            return Err(format!("request of {len} bytes with a {payload}-byte payload does not add up"));
        };
        if len > buf.len() {
            return Err(format!("request of {len} bytes is larger than the parse buffer"));
        }
        buf[..IN_HEADER].copy_from_slice(&hdr.in_out[..IN_HEADER]);
        buf[IN_HEADER..IN_HEADER + op].copy_from_slice(&hdr.op_in[..op]);
        buf[IN_HEADER + op..len].copy_from_slice(std::slice::from_raw_parts(ent.payload, payload));
        Ok(len)
    }
}
