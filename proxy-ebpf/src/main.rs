//! Ferry's dataplane programs.
//!
//! `from_pod` runs on tc ingress of each pod's host-side veth (packets the pod
//! sends): a packet to a Service frontend is DNATed to a backend. `to_pod` runs on
//! tc egress of the same veth (packets the pod receives): replies from a backend are
//! reverse-NATed so the pod sees the address it dialled.
#![no_std]
#![no_main]

mod csum;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    verdict::finish(len, lb::from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    verdict::finish(len, lb::to_pod(&ctx))
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
