//! Ferry's dataplane programs.
//!
//! - `from_pod` / `to_pod`: tc ingress / egress on each pod's host-side veth
//!   (pod traffic to services, and replies).
//! - `uplink_xdp` / `uplink_tc`: XDP and tc ingress on the node's uplink
//!   (NodePort, externalIPs, LoadBalancer IPs, SNAT to remote backends).
//! - `sock_*`: cgroup socket hooks, the node's own connections to Services
//!   (see `sock`).
//! - `pass_only` / `pass_only_tc`, `bench_xdp` / `bench_xdp_fresh` /
//!   `bench_xdp_spread` / `bench_tc` / `bench_ct_insert` /
//!   `bench_ct_lookup`: for the per-packet benchmarks only,
//!   never attached (floors, and frame-restoring wrappers).
//! - `bench_gen` / `bench_sink`: the throughput benchmark's traffic
//!   generator (run in live-frames mode) and receiver, attached only to
//!   the benchmark's own interfaces.
#![no_std]
#![no_main]

mod bench;
mod csum;
mod ct;
mod ctx;
mod diag;
mod family;
mod fib;
mod flow;
mod frag;
mod icmp;
mod keys;
mod lb;
mod maps;
mod monitor;
mod pod;
mod reject;
mod sched;
mod sctp;
mod sock;
mod traffic;
mod uplink;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use proxy_common::{monitor as program, stats::Stat};

use crate::{
    family::{V4, V6},
    flow::Frame,
    sock::Errno,
    verdict::Out,
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    sctp::arrived(&ctx);
    let code = verdict::finish_tc(&ctx, program::FROM_POD, len, pod::from_pod(&ctx));
    sctp::fix(&ctx);
    code
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    sctp::arrived(&ctx);
    let code = verdict::finish_tc(&ctx, program::TO_POD, len, pod::to_pod(&ctx));
    sctp::fix(&ctx);
    code
}

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    let len = Frame::len(&ctx);
    // IPv6 goes on to the stack, to `uplink_tc6`: its frames leave XDP's
    // packet bounds no room within 512 bytes of stack.
    // So does SCTP (see `sctp`).
    let outcome = uplink::uplink4(&ctx).unwrap_or(Ok(Out::pass(Stat::PassIpv6ToTc)));
    verdict::finish_xdp(&ctx, len, outcome)
}

/// One of the uplink's two tc filters (the kernel runs both, in either
/// order, until one gives a verdict): IPv4, and what is not IP. IPv6 goes
/// on, uncounted, to `uplink_tc6`, which counts it.
#[classifier]
pub fn uplink_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    sctp::arrived(&ctx);
    match uplink::uplink4(&ctx) {
        Some(outcome) => {
            let code = verdict::finish_tc(&ctx, program::UPLINK_TC, len, outcome);
            sctp::fix(&ctx);
            code
        }
        None => verdict::TC_ACT_UNSPEC,
    }
}

/// The uplink's other tc filter: IPv6, in a program of its own so that
/// each family is verified within the kernel's instruction budget.
#[classifier]
pub fn uplink_tc6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    sctp::arrived(&ctx);
    match uplink::uplink6(&ctx) {
        Some(outcome) => {
            let code = verdict::finish_tc(&ctx, program::UPLINK_TC6, len, outcome);
            sctp::fix(&ctx);
            code
        }
        None => verdict::TC_ACT_UNSPEC,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4>(&ctx, Errno::Set)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4_compat(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4>(&ctx, Errno::Eperm)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V4>(&ctx, Errno::Set)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4_compat(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V4>(&ctx, Errno::Eperm)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V4>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect::<V6>(&ctx, Errno::Set)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6_compat(ctx: SockAddrContext) -> i32 {
    sock::connect::<V6>(&ctx, Errno::Eperm)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V6>(&ctx, Errno::Set)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6_compat(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V6>(&ctx, Errno::Eperm)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V6>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V6>(&ctx)
}

/// Returns XDP_PASS and nothing else: the floor the benchmarks measure the
/// other programs against. Never attached.
#[xdp]
pub fn pass_only(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Returns TC_ACT_UNSPEC and nothing else: around it, the benchmarks time the
/// tc wrapper's own cost (see `bench`). Never attached.
#[classifier]
pub fn pass_only_tc(_ctx: TcContext) -> i32 {
    verdict::TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to here.
    loop {}
}

/// The kernel checks the license of programs that call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
