//! Frame-restoring wrappers, for timing the real paths with BPF_PROG_TEST_RUN
//! and `repeat N`. The kernel runs a program N times on one buffer, so what a
//! run rewrites carries over: after the first DNAT the frame is no longer
//! addressed to the Service, and the other runs would time the not-a-Service
//! path. Each wrapper writes the original frame (index 0 of `bench_frame`) back
//! over the buffer and tail-calls the program under test (slot 0 of its program
//! array), so every run takes the real path. The benchmark measures a wrapper's
//! own cost by wrapping a PASS-only program, and reports it beside. Never
//! attached; two program arrays because one array serves one program type.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::{bpf_get_smp_processor_id, bpf_redirect},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    bench::{
        spread_flow, spread_visit, GenConfig, SinkCounts, SpreadConfig, FRAME_LEN4, FRAME_LEN6,
    },
    ct_dir, proto, CtKey4, CtValue, Ip4,
};

use crate::{ct, maps::CONNTRACK};

/// The frame every run starts from, written by the benchmark: an IPv4
/// frame in its first `FRAME_LEN4` bytes, or an IPv6 one.
#[btf_map(name = "bench_frame")]
static FRAME: Array<[u8; FRAME_LEN6], 1> = Array::new();

/// The first `FRAME_LEN4` bytes of the frame.
#[inline(always)]
fn frame4(frame: &[u8; FRAME_LEN6]) -> &[u8; FRAME_LEN4] {
    // SAFETY: FRAME_LEN4 < FRAME_LEN6, and a byte array has alignment 1.
    unsafe { &*(frame.as_ptr() as *const [u8; FRAME_LEN4]) }
}

/// The XDP program under test.
#[btf_map(name = "bench_xdp_prog")]
static XDP_TARGET: ProgramArray<1> = ProgramArray::new();

/// The tc program under test.
#[btf_map(name = "bench_tc_prog")]
static TC_TARGET: ProgramArray<1> = ProgramArray::new();

/// The spread wrapper's settings, written by the benchmark.
#[btf_map(name = "bench_spread_cfg")]
static SPREAD: Array<SpreadConfig, 1> = Array::new();

/// Each CPU's runs of `bench_xdp_fresh`, `bench_xdp_spread`, `bench_ct_insert` and `bench_gen` so far: with
/// the CPU's number, each run's new flow or key is one of its own, on
/// either CPU of a run on both.
#[btf_map(name = "bench_seq")]
static SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

/// The next number of this CPU's runs, and the CPU's number.
#[inline(always)]
fn next_run() -> Option<(u32, u8)> {
    let seq = SEQ.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of the map's value; one program at a time runs
    // on a CPU.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    Some((n, cpu as u8))
}

/// Where an IPv4 frame (Ethernet, a 20-byte IP header, then TCP or UDP)
/// carries the last two bytes of its source address, and its source port.
const SADDR_LOW_OFF4: usize = 14 + 12 + 2;
const SPORT_OFF4: usize = 14 + 20;
/// Where an IPv4 frame carries its destination address.
const DADDR_OFF4: usize = 14 + 16;

/// What a wrapper does to the source of each run's IPv4 frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Leaves it as the frame has it.
    Same,
    /// Gives it one never seen before: a new flow each run.
    Fresh,
    /// Gives it (and the destination) the tuple of one of the spread flows.
    Spread,
}

#[xdp]
pub fn bench_xdp(ctx: XdpContext) -> u32 {
    restore_xdp(&ctx, Source::Same)
}

/// `bench_xdp` for new flows: each run's IPv4 frame gets a source never
/// seen before (the CPU's number and the run's in the last two bytes of its
/// source address and in its source port), so that every run opens a flow. The
/// checksums are left as they were: nothing on the path checks them. An
/// IPv6 frame is restored as `bench_xdp` restores it.
#[xdp]
pub fn bench_xdp_fresh(ctx: XdpContext) -> u32 {
    restore_xdp(&ctx, Source::Fresh)
}

/// `bench_xdp` for many established flows: each run's IPv4 frame gets the
/// tuple of the spread flow `spread_visit` picks (its source address, source
/// port and Service, see `spread_flow`), which the benchmark opened before.
/// The checksums are left as they were, as `bench_xdp_fresh` leaves them.
#[xdp]
pub fn bench_xdp_spread(ctx: XdpContext) -> u32 {
    restore_xdp(&ctx, Source::Spread)
}

#[inline(always)]
fn restore_xdp(ctx: &XdpContext, source: Source) -> u32 {
    let Some(frame) = FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    // The benchmark hands over frames of exactly one of the two lengths.
    let len = if start + FRAME_LEN6 <= end {
        FRAME_LEN6
    } else if start + FRAME_LEN4 <= end {
        FRAME_LEN4
    } else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the packet has `len` bytes (checked above), at least
    // FRAME_LEN4, past both source offsets; the map value FRAME_LEN6 bytes.
    unsafe {
        if len == FRAME_LEN6 {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), start as *mut u8, FRAME_LEN6);
        } else {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), start as *mut u8, FRAME_LEN4);
            let at = start as *mut u8;
            match source {
                Source::Same => {}
                Source::Fresh => {
                    let Some((n, cpu)) = next_run() else {
                        return xdp_action::XDP_ABORTED;
                    };
                    let [_, high, port @ ..] = n.to_be_bytes();
                    *at.add(SADDR_LOW_OFF4) = cpu;
                    *at.add(SADDR_LOW_OFF4 + 1) = high;
                    core::ptr::copy_nonoverlapping(port.as_ptr(), at.add(SPORT_OFF4), 2);
                }
                Source::Spread => {
                    let (Some((n, cpu)), Some(config)) = (next_run(), SPREAD.get(0)) else {
                        return xdp_action::XDP_ABORTED;
                    };
                    let i = spread_visit(n, u32::from(cpu), config.flows);
                    let flow = spread_flow(i, config.services);
                    let daddr = u32::from_be_bytes([
                        frame[DADDR_OFF4],
                        frame[DADDR_OFF4 + 1],
                        frame[DADDR_OFF4 + 2],
                        frame[DADDR_OFF4 + 3],
                    ])
                    .wrapping_add(flow.service);
                    let (saddr_low, sport, daddr) = (
                        flow.saddr_low.to_be_bytes(),
                        flow.sport.to_be_bytes(),
                        daddr.to_be_bytes(),
                    );
                    core::ptr::copy_nonoverlapping(saddr_low.as_ptr(), at.add(SADDR_LOW_OFF4), 2);
                    core::ptr::copy_nonoverlapping(sport.as_ptr(), at.add(SPORT_OFF4), 2);
                    core::ptr::copy_nonoverlapping(daddr.as_ptr(), at.add(DADDR_OFF4), 4);
                }
            }
        }
        XDP_TARGET.tail_call(ctx, 0);
    }
    // Only reached when the tail call failed: no program in slot 0.
    xdp_action::XDP_ABORTED
}

/// One conntrack insert of a key never seen before, and nothing else: the
/// cost of the step a new flow cannot do without, against the whole paths.
/// Its keys (from 100.0.0.0/8, the CPU's number and the run's in the
/// address and source port) are no packet's. Timed through `bench_xdp` like the paths, so that the same
/// floor applies.
#[xdp]
pub fn bench_ct_insert(_ctx: XdpContext) -> u32 {
    let Some((n, cpu)) = next_run() else {
        return xdp_action::XDP_ABORTED;
    };
    let [a, b, c, d] = n.to_be_bytes();
    let key = CtKey4 {
        saddr: Ip4 {
            octets: [100, cpu, c, d],
        },
        daddr: Ip4 {
            octets: [10, 96, 0, 1],
        },
        sport_be: u16::from_ne_bytes([a, b]),
        dport_be: 80u16.to_be(),
        proto: proto::TCP,
        dir: ct_dir::FORWARD,
        _pad: 0,
    };
    let value = CtValue {
        last_seen_ns: ct::now(),
        ..CtValue::default()
    };
    match CONNTRACK.insert(&key, &value, 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

/// One conntrack lookup of the IPv4 frame's forward tuple, and a read of
/// what it finds: the least a packet of a known flow costs in any design
/// that keeps per-flow state in a hash map. Run behind `bench_xdp_spread`,
/// it visits the spread flows' entries in the order the established path
/// does. PASS when the entry is there, ABORTED when not.
#[xdp]
pub fn bench_ct_lookup(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + FRAME_LEN4 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: every byte read lies within the frame's FRAME_LEN4 (checked above).
    let byte = |off: usize| unsafe { *((start + off) as *const u8) };
    let at4 = |off: usize| Ip4 {
        octets: [byte(off), byte(off + 1), byte(off + 2), byte(off + 3)],
    };
    let key = CtKey4 {
        saddr: at4(DADDR_OFF4 - 4),
        daddr: at4(DADDR_OFF4),
        sport_be: u16::from_ne_bytes([byte(SPORT_OFF4), byte(SPORT_OFF4 + 1)]),
        dport_be: u16::from_ne_bytes([byte(SPORT_OFF4 + 2), byte(SPORT_OFF4 + 3)]),
        proto: byte(14 + 9),
        dir: ct_dir::FORWARD,
        _pad: 0,
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a pointer to the map value; the read is what a packet of a
    // known flow cannot do without.
    let seen = unsafe { core::ptr::read_volatile(&(*entry).last_seen_ns) };
    if seen == 0 {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_PASS
}

/// The throughput benchmark's settings, written by the benchmark.
#[btf_map(name = "bench_gen_cfg")]
static GEN: Array<GenConfig, 1> = Array::new();

/// What the throughput benchmark's receiver has counted, per CPU.
#[btf_map(name = "bench_sink_cnt")]
static SINK: PerCpuArray<SinkCounts, 1> = PerCpuArray::new();

/// The traffic generator, run in live-frames mode: the kernel hands it
/// frames of a page pool that it recycles, holding whatever the last trip
/// left in them (a translated frame comes back translated), so each run
/// writes the whole IPv4 frame again, gives it the source port of its flow
/// and sends it out of the interface of `bench_gen_cfg`.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (Some(frame), Some(config)) = (FRAME.get(0), GEN.get(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    if start + FRAME_LEN4 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let at = start as *mut u8;
    // SAFETY: the packet has FRAME_LEN4 bytes (checked above), past the
    // source port; the map value FRAME_LEN6 >= FRAME_LEN4 bytes.
    unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), at, FRAME_LEN4) };
    if config.flows > 1 {
        let Some((n, _)) = next_run() else {
            return xdp_action::XDP_ABORTED;
        };
        let flow = n.checked_rem(config.flows).unwrap_or(0) as u16;
        let sport = u16::from_be_bytes([frame[SPORT_OFF4], frame[SPORT_OFF4 + 1]]);
        // SAFETY: as above: the source port lies within FRAME_LEN4.
        unsafe {
            let port = sport.wrapping_add(flow).to_be_bytes();
            core::ptr::copy_nonoverlapping(port.as_ptr(), at.add(SPORT_OFF4), 2);
        }
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(config.ifindex, 0) as u32 }
}

/// The throughput benchmark's receiver: counts each IPv4 UDP frame, as one
/// of the expected translation (to the address and port of `bench_gen_cfg`)
/// or as another, and drops every frame.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let (Some(config), Some(counts)) = (GEN.get(0), SINK.get_ptr_mut(0)) else {
        return xdp_action::XDP_DROP;
    };
    let start = ctx.data();
    // Ethernet, a 20-byte IPv4 header, then the UDP ports.
    if start + 14 + 20 + 4 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the 38 bytes read lie in the packet (checked above).
    let byte = |off: usize| unsafe { *((start + off) as *const u8) };
    let udp4 = byte(12) == 0x08 && byte(13) == 0x00 && byte(14) == 0x45 && byte(23) == proto::UDP;
    if !udp4 {
        // The kernel's own chatter (ARP, IPv6 neighbour discovery).
        return xdp_action::XDP_DROP;
    }
    let expected = [byte(30), byte(31), byte(32), byte(33)] == config.expect_daddr
        && u16::from_ne_bytes([byte(36), byte(37)]) == config.expect_dport_be;
    // SAFETY: this CPU's slot; one program at a time runs on a CPU.
    unsafe {
        if expected {
            (*counts).expected += 1;
        } else {
            (*counts).other += 1;
        }
    }
    xdp_action::XDP_DROP
}

#[classifier]
pub fn bench_tc(ctx: TcContext) -> i32 {
    let Some(frame) = FRAME.get(0) else {
        return TC_ACT_SHOT as i32;
    };
    let stored = match ctx.len() as usize {
        FRAME_LEN4 => ctx.store(0, frame4(frame), 0),
        FRAME_LEN6 => ctx.store(0, frame, 0),
        _ => return TC_ACT_SHOT as i32,
    };
    if stored.is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: a tail call; on success it does not return.
    unsafe { TC_TARGET.tail_call(&ctx, 0) };
    TC_ACT_SHOT as i32
}
