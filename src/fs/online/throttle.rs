//! How fast the online converter may go: a byte rate and a share of the time it may hold a
//! file's lock (the database waits while it does).

use std::time::{Duration, Instant};

pub struct Throttle {
    /// Bytes per second; 0: no limit.
    rate: u64,
    /// Percent of the time spent holding a lock (1..=100).
    share: u8,
    /// When the bytes converted so far are paid for at `rate`.
    paid_until: Option<Instant>,
}

impl Throttle {
    pub fn new(rate: u64, share: u8) -> Throttle {
        Throttle { rate, share: share.clamp(1, 100), paid_until: None }
    }

    /// After a chunk of `bytes` that held the file's lock for `held`: until when to wait.
    /// The rate is a token bucket without burst (waiting only makes up for going too fast,
    /// never banks time for later); the share stretches each chunk's lock time to
    /// `held * 100 / share` of wall time.
    pub fn after_chunk(&mut self, bytes: u64, held: Duration, now: Instant) -> Instant {
        let mut until = now;
        if self.rate > 0 {
            // The chunk began `held` ago; time not used since the last one is not banked.
            let began = now.checked_sub(held).unwrap_or(now);
            let start = self.paid_until.map_or(began, |p| p.max(began));
            let t = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            self.paid_until = Some(t);
            until = until.max(t);
        }
        if self.share < 100 {
            until = until.max(now + held * (100 - self.share as u32) / self.share as u32);
        }
        until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_and_the_share_bound_the_pace() {
        let t0 = Instant::now();
        // 10 MB/s: 1 MB chunks that take 10 ms each must end 100 ms apart.
        let mut t = Throttle::new(10_000_000, 100);
        let mut now = t0;
        for i in 1..=20u32 {
            now += Duration::from_millis(10);
            let until = t.after_chunk(1_000_000, Duration::from_millis(10), now);
            assert_eq!(until, t0 + Duration::from_millis(100) * i);
            now = until;
        }
        // A pause is not banked: after it, the pace is the rate again, no burst.
        now += Duration::from_secs(5);
        let until = t.after_chunk(1_000_000, Duration::from_millis(10), now);
        assert_eq!(until, now - Duration::from_millis(10) + Duration::from_millis(100));
        // A 25 % share: 10 ms under the lock, then 30 ms off it.
        let mut t = Throttle::new(0, 25);
        assert_eq!(t.after_chunk(1 << 20, Duration::from_millis(10), t0), t0 + Duration::from_millis(30));
        let mut t = Throttle::new(0, 100);
        assert_eq!(t.after_chunk(1 << 20, Duration::from_millis(10), t0), t0);
    }
}
