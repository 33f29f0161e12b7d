//! The fault suite's load: from namespaces of the lab, to lab addresses only,
//! one thread per target sends a request every few milliseconds (a new TCP
//! connection that must be greeted by a pod, or a UDP datagram from a new
//! socket that must be answered) until told to stop or until its bound on
//! requests is reached, and notes when each one went and how it ended.

use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between two requests of one target.
const PACE: Duration = Duration::from_millis(20);
/// The most requests one target sends in one load, whatever happens.
const MAX_REQUESTS: usize = 200_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
}

/// A path through Ferry: from a namespace to an address.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: &'static str,
    pub ns: String,
    pub addr: SocketAddr,
    pub kind: Kind,
    /// Every answer must come from the pod that gave the first (affinity).
    pub affine: bool,
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    /// The connection was reset (RST).
    Reset,
    /// Refused, timed out, closed.
    Failed(String),
    /// Answered, by a pod other than the one affinity sent it to before.
    Moved,
}

/// One request: when it was sent and how it ended.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub outcome: Outcome,
}

/// A load running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Vec<Sample>>)>,
}

/// Starts one thread per target.
pub fn start(targets: &[Target]) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = targets
        .iter()
        .cloned()
        .map(|target| {
            let stop = stop.clone();
            let name = target.name;
            let thread = thread::spawn(move || {
                let ns = target.ns.clone();
                ferry_netns::in_netns(&ns, move || drive(&target, &stop)).unwrap_or_default()
            });
            (name, thread)
        })
        .collect();
    Load { stop, threads }
}

impl Load {
    /// Stops the threads and returns each target's samples.
    pub fn stop(self) -> Vec<(&'static str, Vec<Sample>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|(name, t)| (name, t.join().unwrap_or_default()))
            .collect()
    }
}

fn drive(target: &Target, stop: &AtomicBool) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut affine_pod: Option<String> = None;
    while !stop.load(Ordering::Relaxed) && samples.len() < MAX_REQUESTS {
        let at = Instant::now();
        let outcome = match ask(target) {
            Ok(answer) => {
                let pod = answer.split_whitespace().next().unwrap_or("").to_string();
                match &affine_pod {
                    Some(first) if target.affine && *first != pod => {
                        affine_pod = Some(pod);
                        Outcome::Moved
                    }
                    _ => {
                        affine_pod.get_or_insert(pod);
                        Outcome::Answered
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Outcome::Reset,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        samples.push(Sample { at, outcome });
        thread::sleep(PACE);
    }
    samples
}

/// One request; the pod's answer.
fn ask(target: &Target) -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    let n = match target.kind {
        Kind::Tcp => {
            let mut s = TcpStream::connect_timeout(&target.addr, REQUEST_TIMEOUT)?;
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            s.read(&mut buf)?
        }
        Kind::Udp => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            s.send_to(b"who?", target.addr)?;
            s.recv(&mut buf)?
        }
    };
    if n == 0 {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// What a fault did to the load: requests sent, failed (resets included),
/// reset, and the time from the fault's start to the first answer after the
/// last failure.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub failed: usize,
    pub reset: usize,
    /// Affinity answers from a new pod.
    pub moved: usize,
    pub recovered_in: Option<Duration>,
    /// The first failure of each target, said in words.
    pub first_failures: Vec<String>,
}

/// Tallies `samples` from `start` on.
pub fn tally(samples: &[(&'static str, Vec<Sample>)], start: Instant) -> Tally {
    let mut t = Tally::default();
    let mut last_failure: Option<Instant> = None;
    for (name, samples) in samples {
        let mut first = true;
        for s in samples.iter().filter(|s| s.at >= start) {
            t.sent += 1;
            match &s.outcome {
                Outcome::Answered => continue,
                Outcome::Moved => {
                    t.moved += 1;
                    continue;
                }
                Outcome::Reset => t.reset += 1,
                Outcome::Failed(_) => {}
            }
            t.failed += 1;
            last_failure = last_failure.max(Some(s.at));
            if first {
                first = false;
                let what = match &s.outcome {
                    Outcome::Failed(e) => e.as_str(),
                    _ => "reset",
                };
                t.first_failures.push(format!("{name}: {what}"));
            }
        }
    }
    if let Some(last) = last_failure {
        let answered_after = samples
            .iter()
            .flat_map(|(_, s)| s.iter())
            .filter(|s| s.at > last && matches!(s.outcome, Outcome::Answered | Outcome::Moved))
            .map(|s| s.at)
            .min();
        t.recovered_in = answered_after.map(|at| at - start);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_from_the_start_and_times_the_recovery() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let sample = |ms, outcome| Sample {
            at: at(ms),
            outcome,
        };
        let samples = vec![
            (
                "a",
                vec![
                    sample(0, Outcome::Failed("before".into())),
                    sample(100, Outcome::Answered),
                    sample(200, Outcome::Reset),
                    sample(300, Outcome::Answered),
                ],
            ),
            (
                "b",
                vec![
                    sample(150, Outcome::Failed("refused".into())),
                    sample(250, Outcome::Failed("refused".into())),
                    sample(350, Outcome::Answered),
                ],
            ),
        ];
        let t = tally(&samples, at(50));
        assert_eq!((t.sent, t.failed, t.reset), (6, 3, 1));
        assert_eq!(t.recovered_in, Some(Duration::from_millis(250)));
        assert_eq!(t.first_failures.len(), 2);
        assert!(tally(&samples, at(320)).recovered_in.is_none());
    }
}
