//! The reading end of the programs' reports (proxy-ebpf's `monitor`): a
//! perf buffer per CPU in the events map, and the lease in the monitor map
//! that makes the programs report drops and rejects while it lasts, and
//! every packet they translate too when it asks for traces. The lease is renewed
//! while the monitor reads and cleared when it stops; a monitor killed
//! without either leaves a lease that runs out by itself, and its buffers
//! leave the events map when its file descriptor closes.

use std::{
    os::fd::{AsRawFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{
    perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer},
    Array, Map, MapData,
};
use proxy_common::{map_names, monitor::TRACE};

use super::{monotonic_ns, Dataplane};

/// How long a lease lasts; renewed at least every `LEASE / 4` by `poll`.
const LEASE: Duration = Duration::from_secs(2);
/// Pages of each CPU's perf buffer (a power of two).
const PAGES: usize = 16;

/// Reads the programs' reports while it lives.
pub struct Monitor {
    lease: Array<MapData, u64>,
    renewed_ns: u64,
    /// The lease asks for traces.
    trace: bool,
    buffers: Vec<PerfEventArrayBuffer<MapData>>,
    /// Kept open: closing it takes the buffers out of the map.
    _events: PerfEventArray<MapData>,
}

impl Monitor {
    /// Reads through the maps a running agent pinned under `pin_dir`;
    /// `trace`: traces too.
    pub fn pinned(pin_dir: &Path, trace: bool) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (is an agent of this version running here?)",
                    path.display()
                )
            })?;
            Ok(Map::from_map_data(data)?)
        };
        Self::new(open(map_names::EVENTS)?, open(map_names::MONITOR)?, trace)
    }

    fn new(events: Map, lease: Map, trace: bool) -> Result<Self> {
        let mut events = PerfEventArray::try_from(events)?;
        let lease = Array::try_from(lease)?;
        let cpus =
            aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))?;
        let buffers = cpus
            .into_iter()
            .map(|cpu| {
                events
                    .open(cpu, Some(PAGES))
                    .with_context(|| format!("opening the perf buffer of CPU {cpu}"))
            })
            .collect::<Result<_>>()?;
        let mut monitor = Self {
            lease,
            renewed_ns: 0,
            trace,
            buffers,
            _events: events,
        };
        monitor.renew()?;
        Ok(monitor)
    }

    /// Asks for traces too (`true`) or stops asking, at once.
    pub fn set_traces(&mut self, trace: bool) -> Result<()> {
        self.trace = trace;
        self.renew()
    }

    fn renew(&mut self) -> Result<()> {
        let now = monotonic_ns();
        let until = now + u64::try_from(LEASE.as_nanos()).unwrap_or(u64::MAX);
        let until = if self.trace {
            until | TRACE
        } else {
            until & !TRACE
        };
        self.lease
            .set(0, until, 0)
            .context("writing the monitor's lease")?;
        self.renewed_ns = now;
        Ok(())
    }

    /// Waits up to `timeout` for reports and hands each one's bytes (the
    /// event header, then the packet's first bytes) to `each`. Returns how
    /// many reports the kernel dropped because a buffer was full.
    pub fn poll(&mut self, timeout: Duration, mut each: impl FnMut(&[u8])) -> Result<u64> {
        if monotonic_ns().saturating_sub(self.renewed_ns)
            >= u64::try_from((LEASE / 4).as_nanos()).unwrap_or(0)
        {
            self.renew()?;
        }
        let mut fds: Vec<libc::pollfd> = self
            .buffers
            .iter()
            .map(|b| libc::pollfd {
                fd: b.as_raw_fd() as RawFd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a live array of as many pollfd as passed.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e).context("waiting for the perf buffers");
        }
        let mut lost = 0;
        for buffer in &mut self.buffers {
            if !buffer.readable() {
                continue;
            }
            buffer.for_each(|event| match event {
                PerfEvent::Sample { head, tail } => {
                    if tail.is_empty() {
                        each(head);
                    } else {
                        each(&[head, tail].concat());
                    }
                }
                PerfEvent::Lost { count } => lost += count,
            });
        }
        Ok(lost)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Nothing reads any more: the programs stop reporting at once.
        let _ = self.lease.set(0, 0, 0);
    }
}

impl Dataplane {
    /// A monitor of these programs' reports (private maps: for tests),
    /// with traces if `trace`. Takes the maps: one monitor per loaded
    /// object.
    pub fn monitor(&mut self, trace: bool) -> Result<Monitor> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the object, or taken"))
        };
        let events = take(map_names::EVENTS)?;
        let lease = take(map_names::MONITOR)?;
        Monitor::new(events, lease, trace)
    }
}
