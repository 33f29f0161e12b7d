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
    btf_maps::{Array, ProgramArray},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::bench::{FRAME_LEN4, FRAME_LEN6};

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

#[xdp]
pub fn bench_xdp(ctx: XdpContext) -> u32 {
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
    // SAFETY: the packet has `len` bytes (checked above); the map value
    // FRAME_LEN6, at least as many.
    unsafe {
        if len == FRAME_LEN6 {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), start as *mut u8, FRAME_LEN6);
        } else {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), start as *mut u8, FRAME_LEN4);
        }
        XDP_TARGET.tail_call(&ctx, 0);
    }
    // Only reached when the tail call failed: no program in slot 0.
    xdp_action::XDP_ABORTED
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
