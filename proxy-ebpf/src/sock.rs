//! Socket-level load balancing: cgroup hooks that translate a frontend into
//! a backend when a socket dials it, so the node's own clients (host
//! processes, hostNetwork pods, the kubelet, an API server) reach Services
//! without a packet hook on their path. The backend is the packet path's
//! choice (`sched`: schedulers, sessionAffinity; the agent's slots already
//! hold what traffic policies, topology and terminating fallback leave).
//!
//! - `connect4`: TCP and connected UDP, once per connect().
//! - `sendmsg4`: unconnected UDP, per datagram.
//! - `recvmsg4`: a datagram from a backend reads as from the frontend.
//! - `getpeername4`: the peer of a translated socket is the frontend.
//!
//! What the hooks send to a backend never reaches the packet path as a
//! frontend, so it is never translated twice; what they let through
//! untranslated (another namespace's sockets unless told otherwise, a
//! frontend with loadBalancerSourceRanges) meets the packet path as before.
//! No conntrack: a socket keeps its backend by itself, and its only state here
//! is the reverse entry, keyed by the socket's cookie.

use core::ptr::{addr_of, addr_of_mut, null_mut};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use proxy_common::{
    hash::flow_hash4, proto, sock_flags, svc_flags, RevNat4, ServiceValue, SockRevKey4,
};

use crate::{
    ct,
    family::V4,
    keys,
    maps::{SERVICES, SOCK_CONFIG, SOCK_REVNAT},
    sched::{self, Client},
};

/// What a cgroup sock_addr program returns.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Whether the kernel has `bpf_set_retval` (5.18): without it a refusal is EPERM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Set,
    Eperm,
}

/// A socket dialling a frontend, as the schedulers see it.
struct Dial {
    /// Stands for the client's address: its network namespace's cookie.
    client: u32,
    daddr: u32,
    dport: u16,
    proto: u8,
    cookie: u64,
}

impl Client<V4> for Dial {
    /// The namespace's cookie, not an address: the source address is not
    /// chosen yet at connect(). Cookies count up from 1, so they read as
    /// addresses in 0.0.0.0/8, which no packet comes from: a socket's
    /// affinity never meets a packet client's.
    #[inline(always)]
    fn client(&self) -> u32 {
        self.client
    }

    /// The socket's cookie in place of the source address and port: one
    /// socket, one backend; the next socket, another draw.
    #[inline(always)]
    fn flow_hash(&self) -> u32 {
        flow_hash4(
            self.cookie as u32,
            self.daddr,
            (self.cookie >> 32) as u16,
            self.dport,
            self.proto,
        )
    }
}

/// Why a dial is refused.
#[derive(Clone, Copy)]
enum Refusal {
    /// The frontend has no endpoint at all (the packet path rejects).
    NoEndpoints,
    /// internalTrafficPolicy=Local and none on this node (the packet path drops).
    NoLocalEndpoint,
}

/// connect(): TCP and connected UDP.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext, errno: Errno) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; 32-bit loads of its fields.
    let protocol = unsafe { addr_of!((*sa).protocol).read_volatile() };
    let proto = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return ALLOW,
    };
    dial(ctx, proto, errno)
}

/// sendmsg() with an address: unconnected UDP, per datagram.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext, errno: Errno) -> i32 {
    // The hook runs for UDP only (and for raw sockets, which it leaves alone).
    // SAFETY: as in `connect4`.
    let protocol = unsafe { addr_of!((*ctx.sock_addr).protocol).read_volatile() };
    if protocol != 17 {
        return ALLOW;
    }
    dial(ctx, proto::UDP, errno)
}

/// recvmsg() and getpeername(): a backend this socket was sent to reads as
/// the frontend it dialled. Always allowed (these hooks cannot refuse).
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `connect4`.
    let (addr_be, port) = unsafe {
        (
            addr_of!((*sa).user_ip4).read_volatile(),
            addr_of!((*sa).user_port).read_volatile(),
        )
    };
    let key = SockRevKey4 {
        // SAFETY: a helper every sock_addr program may call.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr_be,
        port_be: port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { SOCK_REVNAT.get(&key) }.copied() {
        write_addr(sa, frontend.addr_be, frontend.port_be);
    }
    ALLOW
}

/// A socket of the node (or, when told, of any namespace) dialling a
/// frontend gets the scheduler's backend in its place.
#[inline(always)]
fn dial(ctx: &SockAddrContext, proto: u8, errno: Errno) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `connect4`.
    let (family, daddr, port) = unsafe {
        (
            addr_of!((*sa).user_family).read_volatile(),
            addr_of!((*sa).user_ip4).read_volatile(),
            addr_of!((*sa).user_port).read_volatile(),
        )
    };
    if family != AF_INET {
        return ALLOW;
    }
    let dport = port as u16;
    let key = keys::service(daddr, dport, proto, 0);
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return ALLOW;
    };
    let Some(client) = node_client(ctx) else {
        return ALLOW;
    };
    // The node is not one of the clients loadBalancerSourceRanges name: its
    // connection goes out to the load balancer, which applies them.
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        return ALLOW;
    }
    // SAFETY: a helper every sock_addr program may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dial = Dial {
        client,
        daddr,
        dport,
        proto,
        cookie,
    };
    match choose(&dial, key, &svc) {
        Ok((addr_be, port_be)) => {
            let key = SockRevKey4 {
                cookie,
                addr_be,
                port_be,
                _pad: 0,
            };
            let frontend = RevNat4 {
                addr_be: daddr,
                port_be: dport,
                _pad: 0,
            };
            // Best effort: without it, getpeername shows the backend.
            let _ = SOCK_REVNAT.insert(&key, &frontend, u64::from(BPF_ANY));
            write_addr(sa, addr_be, port_be);
            ALLOW
        }
        Err(refusal) => refuse(refusal, errno),
    }
}

/// The backend for `dial`: none when the frontend has no endpoint for it.
#[inline(always)]
fn choose(
    dial: &Dial,
    key: proxy_common::ServiceKey4,
    svc: &ServiceValue,
) -> Result<(u32, u16), Refusal> {
    if svc.count == 0 {
        return Err(if svc.flags & svc_flags::LOCAL_ONLY != 0 {
            Refusal::NoLocalEndpoint
        } else {
            Refusal::NoEndpoints
        });
    }
    let (_, backend) =
        sched::pick::<V4>(dial, key, svc, ct::now()).map_err(|_| Refusal::NoEndpoints)?;
    Ok((backend.addr_be, backend.port_be))
}

/// The client identity of a socket the hooks serve: its namespace's cookie,
/// if the namespace is the node's (or every namespace is served).
#[inline(always)]
fn node_client(ctx: &SockAddrContext) -> Option<u32> {
    // SAFETY: a helper every sock_addr program may call (5.7).
    let mine = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let config = SOCK_CONFIG.get(0).copied().unwrap_or_default();
    if config.flags & sock_flags::ALL_NAMESPACES == 0 {
        let host = if config.host_netns_cookie != 0 {
            config.host_netns_cookie
        } else {
            // SAFETY: NULL asks for the initial namespace's cookie.
            unsafe { bpf_get_netns_cookie(null_mut()) }
        };
        if mine != host {
            return None;
        }
    }
    Some((mine as u32).to_be())
}

#[inline(always)]
fn refuse(refusal: Refusal, errno: Errno) -> i32 {
    if errno == Errno::Set {
        let code = match refusal {
            Refusal::NoEndpoints => ECONNREFUSED,
            Refusal::NoLocalEndpoint => EHOSTUNREACH,
        };
        // SAFETY: a helper every cgroup program may call on 5.18 and later;
        // the compat programs never reach here.
        unsafe { bpf_set_retval(-code) };
    }
    REFUSE
}

#[inline(always)]
fn write_addr(sa: *mut bpf_sock_addr, addr_be: u32, port_be: u16) {
    // SAFETY: fields these hooks may write, with 32-bit stores.
    unsafe {
        addr_of_mut!((*sa).user_ip4).write_volatile(addr_be);
        addr_of_mut!((*sa).user_port).write_volatile(u32::from(port_be));
    }
}
