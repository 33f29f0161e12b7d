//! One harness for the real programs without attaching them anywhere: load the
//! embedded object into private (unpinned) maps, serve a list of frontends as
//! the agent would, run a frame through a hook with BPF_PROG_TEST_RUN and hand
//! back the verdict and the frame that came out. `simulate`, the packet tests
//! and the per-packet bench all run the programs through it; `packet` builds
//! the frames they send.

pub mod packet;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use proxy_common::{program_names, StatCounter};

use crate::{
    desired::{Capacity, Problem, Programmed},
    frontend::FrontendSpec,
    kernel::{batch::Writing, Dataplane},
};

/// tc: on to the next filter, or to the stack.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;

/// Room a program may add to a frame (encapsulation, an ICMP error's quote).
const HEADROOM: usize = 256;

/// The loaded programs, their private maps, and what the agent's code put in
/// them.
pub struct Programs {
    pub dp: Dataplane,
    /// What the maps hold and the ids their entries were given, kept across
    /// [`Programs::serve`].
    pub programmed: Programmed,
    /// How [`Programs::serve`] writes runs of puts (batched unless a
    /// benchmark's baseline says otherwise).
    pub writing: Writing,
}

/// One run of a program.
#[derive(Debug)]
pub struct Run {
    /// The program's return value (a tc action or an XDP verdict).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The kernel's time for the run.
    pub duration: Duration,
}

/// The hook a frame enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook<'a> {
    /// A tc program by name, with an `__sk_buff` whose ifindex is this (the
    /// uplink programs look routes up from it), or none.
    Tc(&'a str, Option<u32>),
    /// The uplink's tc ingress: `uplink_tc`, then `uplink_tc6` with what
    /// the first let through (TC_ACT_UNSPEC), with an `__sk_buff` naming this
    /// interface, or none. The kernel may run them the other way round; each
    /// takes one family and lets the other through, so the outcome is the same.
    UplinkTc(Option<u32>),
    /// The uplink XDP program, with an `xdp_md` naming this ingress device,
    /// or none (kernels before 5.15 refuse one: see the uplink packet tests).
    Xdp(Option<u32>),
    /// The XDP program that only returns PASS: the benches' floor.
    PassOnly,
}

impl Programs {
    /// The programs in maps of the default capacities, empty.
    pub fn load() -> Result<Self> {
        Self::with(Dataplane::load_private()?)
    }

    /// The programs in maps sized for `frontends` frontends of `backends_each`
    /// backends each, and `flows` IPv4 flows; counting traffic per pair if
    /// `traffic_counters` (the agent's flag of that name).
    pub fn load_sized(
        frontends: u32,
        backends_each: u32,
        flows: u32,
        traffic_counters: bool,
    ) -> Result<Self> {
        Self::with(Dataplane::load_private_sized(
            frontends,
            backends_each,
            flows,
            traffic_counters,
        )?)
    }

    /// The programs in maps of `capacity`, empty: for tests that fill them.
    pub fn load_with_capacity(capacity: &Capacity) -> Result<Self> {
        Self::with(Dataplane::load_private_with_capacity(capacity)?)
    }

    /// The same with another build of the programs (`object`: the bytes of
    /// an eBPF object file), for benches that time two builds in one run.
    pub fn load_sized_object(
        object: &[u8],
        frontends: u32,
        backends_each: u32,
        flows: u32,
        traffic_counters: bool,
    ) -> Result<Self> {
        Self::with(Dataplane::load_private_sized_object(
            object,
            frontends,
            backends_each,
            flows,
            traffic_counters,
        )?)
    }

    /// Programs already loaded (pinned, for tests of what outlives the agent).
    pub fn with(dp: Dataplane) -> Result<Self> {
        // Empty maps of the sizes loaded, frontend ids below the reverse-NAT
        // map's size, as the agent's.
        let capacity = dp.capacity()?;
        Ok(Self {
            dp,
            programmed: Programmed::adopt(Default::default(), Default::default(), capacity),
            writing: Writing::Batched,
        })
    }

    /// Programs the maps for `frontends` as the agent's full round does.
    /// Frontends that cannot be programmed are left out (or left as they
    /// were) and returned; the others are served. Fails if a write failed.
    pub fn serve(&mut self, frontends: &[FrontendSpec]) -> Result<Vec<Problem>> {
        let dp = &mut self.dp;
        let report = self.programmed.full(frontends, dp.writes(self.writing));
        if let Some(failure) = report.outcome.failures.first() {
            bail!(
                "programming the maps: {} of {} writes failed, first {:?}: {}",
                report.outcome.failures.len(),
                report.writes,
                failure.op,
                failure.reason
            );
        }
        Ok(report.problems)
    }

    /// [`Programs::serve`], checking that the maps held what the agent last
    /// wrote before, and hold what it wanted after.
    pub fn serve_checked(&mut self, frontends: &[FrontendSpec]) -> Result<Vec<Problem>> {
        if self.dp.read_state()? != *self.programmed.applied() {
            bail!("the maps do not hold what was last written");
        }
        let problems = self.serve(frontends)?;
        if self.dp.read_state()? != *self.programmed.applied() {
            bail!("the maps do not hold what was just written");
        }
        Ok(problems)
    }

    /// Runs `frame` once through `hook`.
    pub fn run(&mut self, hook: Hook<'_>, frame: &[u8]) -> Result<Run> {
        let Hook::UplinkTc(ifindex) = hook else {
            return self.test_run(hook, frame, None);
        };
        let first = self.test_run(Hook::Tc(program_names::UPLINK_TC, ifindex), frame, None)?;
        if first.verdict != TC_ACT_UNSPEC {
            return Ok(first);
        }
        let second = self.test_run(
            Hook::Tc(program_names::UPLINK_TC6, ifindex),
            &first.frame,
            None,
        )?;
        Ok(Run {
            duration: first.duration + second.duration,
            ..second
        })
    }

    /// Runs `frame` through `hook` `repeat` times in the kernel; the duration
    /// is the kernel's mean per run. Only for programs that leave the frame
    /// as it is (each run starts from what the last one left).
    pub fn run_repeated(&mut self, hook: Hook<'_>, frame: &[u8], repeat: u32) -> Result<Run> {
        self.test_run(hook, frame, Some(repeat))
    }

    fn test_run(&mut self, hook: Hook<'_>, frame: &[u8], repeat: Option<u32>) -> Result<Run> {
        let mut out = vec![0u8; frame.len() + HEADROOM];
        // __sk_buff's ifindex is at byte 40; everything else zero.
        let mut skb = [0u8; 192];
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let mut md = [0u8; 24];
        let mut opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        if let Some(repeat) = repeat {
            opts.repeat = repeat;
        }
        let result = match hook {
            Hook::Tc(name, ifindex) => {
                if let Some(ifindex) = ifindex {
                    skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                    opts.ctx_in = Some(&skb);
                }
                self.dp.program(name)?.test_run(opts)
            }
            Hook::Xdp(ingress) => {
                if let Some(ifindex) = ingress {
                    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                    opts.ctx_in = Some(&md);
                }
                self.dp.xdp_program()?.test_run(opts)
            }
            Hook::PassOnly => self.dp.pass_only()?.test_run(opts),
            Hook::UplinkTc(_) => bail!("the uplink's tc filters run one by one, not repeated"),
        }
        .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    /// The packets counted under the stat `name`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let stats = self.dp.stats()?;
        let Some((_, counter)) = stats.into_iter().find(|(n, _)| *n == name) else {
            bail!("no stat named {name}");
        };
        Ok(counter.packets)
    }

    /// Every stat with packets counted, in the programs' order.
    pub fn nonzero_stats(&self) -> Result<Vec<(&'static str, StatCounter)>> {
        Ok(self
            .dp
            .stats()?
            .into_iter()
            .filter(|(_, c)| c.packets > 0)
            .collect())
    }
}
