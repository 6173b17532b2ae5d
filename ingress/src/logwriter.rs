//! A non-blocking log writer: log lines go into a bounded in-memory buffer that a thread of
//! its own writes out, every 10 ms or as soon as 64 KiB are waiting. A request never waits for
//! stderr (a pipe, the journal); when the buffer holds 4 MiB more lines are dropped and counted
//! (the count is written out as a line of its own), as tracing-appender's lossy mode does.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes kept waiting at most; beyond, lines are dropped.
const MAX_BUFFERED: usize = 4 << 20;
/// Waiting bytes that wake the writer thread before its period.
const WAKE_AT: usize = 64 << 10;
const PERIOD: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    dropped: AtomicU64,
    closed: AtomicBool,
}

/// The writer handed to the log formatter (cheap to clone: one per log line).
#[derive(Debug, Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

/// Stops the writer thread after writing out what is buffered (drop it last).
#[derive(Debug)]
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl NonBlocking {
    /// A writer into `out`, written by a thread of its own.
    pub fn new<W: Write + Send + 'static>(
        mut out: W,
    ) -> std::io::Result<(NonBlocking, FlushGuard)> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let mut spare = Vec::with_capacity(WAKE_AT);
                loop {
                    let closed = {
                        let Ok(mut buf) = s.buf.lock() else { return };
                        if buf.len() < WAKE_AT && !s.closed.load(Ordering::Acquire) {
                            buf = match s.wake.wait_timeout(buf, PERIOD) {
                                Ok((b, _)) => b,
                                Err(_) => return,
                            };
                        }
                        std::mem::swap(&mut *buf, &mut spare);
                        s.closed.load(Ordering::Acquire)
                    };
                    let dropped = s.dropped.swap(0, Ordering::Relaxed);
                    if dropped > 0 {
                        let _ = writeln!(
                            out,
                            "log-writer: {dropped} log lines dropped (output too slow)"
                        );
                    }
                    if !spare.is_empty() {
                        let _ = out.write_all(&spare);
                        let _ = out.flush();
                        spare.clear();
                        if spare.capacity() > MAX_BUFFERED {
                            spare.shrink_to(WAKE_AT);
                        }
                    }
                    if closed && s.buf.lock().map(|b| b.is_empty()).unwrap_or(true) {
                        return;
                    }
                }
            })?;
        Ok((
            NonBlocking {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Appends one line that `write` puts straight into the buffer (no copy, one lock); the
    /// line is dropped and counted when the buffer would grow beyond its bound.
    pub fn append_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let Ok(mut buf) = self.shared.buf.lock() else {
            return;
        };
        let start = buf.len();
        if start >= MAX_BUFFERED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        write(&mut buf);
        if buf.len() > MAX_BUFFERED {
            buf.truncate(start);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if start < WAKE_AT && buf.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far and not yet reported.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for NonBlocking {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    /// A whole log line at once (the formatter writes each line with one call).
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let Ok(mut buf) = self.shared.buf.lock() else {
            return Ok(());
        };
        if buf.len() + data.len() > MAX_BUFFERED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let was_below = buf.len() < WAKE_AT;
        buf.extend_from_slice(data);
        if was_below && buf.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A sink the test can read, optionally stalled; `entered` tells that the writer thread
    /// is in a write (so, while stalled, stuck there holding what it took).
    #[derive(Clone, Default)]
    struct Sink {
        data: Arc<Mutex<Vec<u8>>>,
        stall: Arc<Mutex<()>>,
        entered: Arc<AtomicBool>,
    }

    impl Sink {
        /// Waits (bounded) until the writer thread is inside a write.
        fn wait_entered(&self) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.entered.load(Ordering::Acquire) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer thread never wrote"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    impl Write for Sink {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            self.entered.store(true, Ordering::Release);
            let _g = self.stall.lock().unwrap();
            self.data.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_all_on_drop() {
        let sink = Sink::default();
        let (w, guard) = NonBlocking::new(sink.clone()).unwrap();
        for i in 0..1000 {
            w.clone()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.data.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[999], "line 999");
    }

    #[test]
    fn appended_lines_arrive_and_are_bounded() {
        let sink = Sink::default();
        let (w, guard) = NonBlocking::new(sink.clone()).unwrap();
        // Taken after the guard: a failing assertion releases the output before the guard
        // waits for the thread (no hang).
        let stall = sink.stall.lock().unwrap();
        w.append_with(|b| b.extend_from_slice(b"first\n"));
        // The thread took "first" and is stuck writing it: the buffer is empty again.
        sink.wait_entered();
        // 8 MiB against a 4 MiB buffer while the output is stuck: the second half is dropped.
        for _ in 0..8192 {
            w.append_with(|b| {
                b.extend_from_slice(&[b'y'; 1023]);
                b.push(b'\n');
            });
        }
        assert_eq!(w.dropped(), 4096);
        drop(stall);
        drop(guard);
        let text = String::from_utf8(sink.data.lock().unwrap().clone()).unwrap();
        // In order (the drop report may come first), every line kept whole: a dropped one
        // leaves nothing behind.
        let mut lines = text.lines().filter(|l| !l.contains("log lines dropped"));
        assert_eq!(lines.next(), Some("first"));
        assert!(lines.all(|l| l == "y".repeat(1023)));
        let kept = text.lines().filter(|l| l.starts_with('y')).count();
        assert_eq!(kept, 4096);
    }

    #[test]
    fn a_stalled_output_does_not_block_writers_and_drops_are_reported() {
        let sink = Sink::default();
        let (w, guard) = NonBlocking::new(sink.clone()).unwrap();
        let stall = sink.stall.lock().unwrap();
        w.clone().write_all(b"first\n").unwrap();
        sink.wait_entered();
        let line = vec![b'x'; 1023];
        let started = std::time::Instant::now();
        // 8 MiB of lines against a 4 MiB buffer while the output is stuck.
        for _ in 0..8192 {
            let mut l = line.clone();
            l.push(b'\n');
            w.clone().write_all(&l).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(w.dropped(), 4096);
        drop(stall);
        drop(guard);
        let text = String::from_utf8(sink.data.lock().unwrap().clone()).unwrap();
        assert!(text.contains("log lines dropped"), "no drop report");
        let kept = text.lines().filter(|l| l.starts_with('x')).count();
        assert_eq!(kept, 4096);
    }
}
