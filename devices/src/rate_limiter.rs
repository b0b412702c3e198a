//! Per-device I/O limits: token buckets for bandwidth (bytes/s) and
//! operations (requests/s), with a timerfd that wakes the device thread
//! when a blocked request may go on.
//!
//! A device asks [`RateLimiter::consume`] before each request. When a
//! bucket is empty the request waits (the device leaves it on the queue)
//! and the limiter arms its timer for the moment enough tokens are back;
//! the device watches [`RateLimiter::timer_fd`] in its epoll loop.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A limit as the user gives it: a rate per second and the burst allowed
/// on top of it (defaults to one second's worth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_second: u64,
    pub burst: u64,
}

impl Limit {
    pub fn per_second(per_second: u64) -> Limit {
        Limit {
            per_second,
            burst: per_second,
        }
    }
}

/// One token bucket, refilled continuously.
#[derive(Debug)]
struct TokenBucket {
    limit: Limit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: Limit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            tokens: limit.burst.max(1) as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let cap = self.limit.burst.max(1) as f64;
        self.tokens = (self.tokens + dt * self.limit.per_second as f64).min(cap);
    }

    /// Time until `n` tokens are available (zero if they are). A request
    /// larger than the burst waits until the bucket is full and then takes
    /// it all (so an oversize request is slowed, never refused).
    fn wait_for(&self, n: u64) -> Duration {
        let need = (n as f64).min(self.limit.burst.max(1) as f64);
        if self.tokens >= need || self.limit.per_second == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.tokens) / self.limit.per_second as f64)
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

/// The bandwidth and ops limits of one device.
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter; `None` leaves that dimension unlimited.
    pub fn new(bytes: Option<Limit>, ops: Option<Limit>) -> std::io::Result<RateLimiter> {
        let now = Instant::now();
        Ok(RateLimiter {
            bytes: bytes
                .filter(|l| l.per_second > 0)
                .map(|l| TokenBucket::new(l, now)),
            ops: ops
                .filter(|l| l.per_second > 0)
                .map(|l| TokenBucket::new(l, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// May a request of `bytes` bytes go now? If yes its tokens are taken;
    /// if not, nothing is taken and the timer is armed for when it may.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        if let Some(b) = self.bytes.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(bytes));
        }
        if let Some(o) = self.ops.as_mut() {
            o.refill(now);
            wait = wait.max(o.wait_for(1));
        }
        if wait.is_zero() {
            if let Some(b) = self.bytes.as_mut() {
                b.take(bytes);
            }
            if let Some(o) = self.ops.as_mut() {
                o.take(1);
            }
            return true;
        }
        // At least 1 ms: a timerfd armed with zero would be disarmed.
        let wait = wait.max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            Err(e) => {
                // Without a timer the device would never wake: let it go.
                tracing::error!("rate limiter timer: {e}; request not limited");
                return true;
            }
        }
        false
    }

    /// True while requests wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Call when [`RateLimiter::timer_fd`] is readable: requests may be
    /// tried again.
    pub fn on_timer(&mut self) {
        // Re-arming (here: disarming) the timer resets its expiration
        // count, so the fd is no longer readable.
        if let Err(e) = self.timer.clear() {
            tracing::error!("rate limiter timer: {e}");
        }
        self.blocked = false;
    }

    /// The fd to watch (EPOLLIN) for the end of a wait.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Is any limit set?
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_always_passes() {
        let mut r = RateLimiter::new(None, None).unwrap();
        assert!(!r.is_limited());
        for _ in 0..1000 {
            assert!(r.consume(1 << 20));
        }
    }

    #[test]
    fn ops_bucket_blocks_after_burst_and_timer_releases() {
        let mut r = RateLimiter::new(
            None,
            Some(Limit {
                per_second: 1000,
                burst: 3,
            }),
        )
        .unwrap();
        assert!(r.consume(0) && r.consume(0) && r.consume(0));
        assert!(!r.consume(0));
        assert!(r.is_blocked());
        // The timer fires within a few ms (one token at 1000/s).
        let mut pfd = libc::pollfd {
            fd: r.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1, "timer never fired");
        r.on_timer();
        assert!(r.consume(0));
    }

    #[test]
    fn oversize_request_waits_for_a_full_bucket_instead_of_failing() {
        let mut r = RateLimiter::new(Some(Limit::per_second(1 << 20)), None).unwrap();
        // Bigger than the burst: passes while the bucket is full...
        assert!(r.consume(4 << 20));
        // ...and the next one waits.
        assert!(!r.consume(1));
    }
}
