//! Socket-level load balancing: cgroup hooks that translate a frontend into
//! a backend when a socket dials it, so the node's own clients (host
//! processes, hostNetwork pods, the kubelet, an API server) reach Services
//! without a packet hook on their path. The backend is the packet path's
//! choice (`sched`: schedulers, sessionAffinity; the agent's slots already
//! hold what traffic policies, topology and terminating fallback leave).
//!
//! - `connect4`/`connect6`: TCP and connected UDP, once per connect().
//! - `sendmsg4`/`sendmsg6`: unconnected UDP, per datagram.
//! - `recvmsg4`/`recvmsg6`: a datagram from a backend reads as from the frontend.
//! - `getpeername4`/`getpeername6`: the peer of a translated socket is the frontend.
//!
//! One code for both families ([`SockFamily`]). An IPv6 socket dialling an
//! IPv4-mapped address (`::ffff:10.96.0.10`, as dual-stack programs do for
//! IPv4 destinations) sends IPv4 packets: it is served from the IPv4 maps and
//! gets an IPv4-mapped backend; its reverse entry is IPv4's. The kernel runs
//! `connect6` for it (never `connect4`), `sendmsg4` for its unconnected
//! datagrams, and `recvmsg6`/`getpeername6` with mapped addresses.
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
    proto, sock_flags, svc_flags, Ip4, RevNat4, RevNat6, ServiceValue, SockRevKey4, SockRevKey6,
};

use crate::{
    ct,
    family::{Addr6, Endpoint, Family, V4, V6},
    lb,
    maps::{SOCK_CONFIG, SOCK_REVNAT, SOCK_REVNAT6},
    sched::{self, Client},
};

/// What a cgroup sock_addr program returns.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Whether the kernel has `bpf_set_retval` (5.18): without it a refusal is EPERM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Set,
    Eperm,
}

/// A family as the socket hooks see it: where its address sits in the
/// context, and its reverse-translation map.
pub trait SockFamily: Family {
    /// The destination the socket gives (network order).
    fn read_addr(sa: *mut bpf_sock_addr) -> Self::Addr;
    /// Puts `addr` in its place.
    fn write_addr(sa: *mut bpf_sock_addr, addr: Self::Addr);
    /// A namespace cookie as an address, for sessionAffinity: never a
    /// packet's source (IPv4: in 0.0.0.0/8; IPv6: in ::/96).
    fn client(cookie_be: u32) -> Self::Addr;
    /// The reverse entry of socket `cookie` sent to `backend:port_be`.
    fn remember(cookie: u64, backend: Self::Addr, port_be: u16, frontend: Self::Addr, fport: u16);
    /// The frontend socket `cookie` dialled, if it was sent to `backend:port_be`.
    fn recall(cookie: u64, backend: Self::Addr, port_be: u16) -> Option<(Self::Addr, u16)>;
    /// The IPv4 address an IPv4-mapped one carries (never for IPv4 itself).
    fn mapped4(addr: Self::Addr) -> Option<u32>;
    /// An IPv4 address as this family's socket gives it.
    fn embed4(addr: u32) -> Self::Addr;
}

/// `::ffff:0:0/96`'s third word, as the words of an [`Addr6`] hold it.
const MAPPED4_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl SockFamily for V4 {
    #[inline(always)]
    fn read_addr(sa: *mut bpf_sock_addr) -> u32 {
        // SAFETY: the context the kernel passed; a 32-bit load of its field.
        unsafe { addr_of!((*sa).user_ip4).read_volatile() }
    }

    #[inline(always)]
    fn write_addr(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: a field these hooks may write, with a 32-bit store.
        unsafe { addr_of_mut!((*sa).user_ip4).write_volatile(addr) }
    }

    #[inline(always)]
    fn client(cookie_be: u32) -> u32 {
        cookie_be
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: u32, port_be: u16, frontend: u32, fport: u16) {
        let key = SockRevKey4 {
            cookie,
            addr: Ip4::from_raw(backend),
            port_be,
            _pad: 0,
        };
        let value = RevNat4 {
            addr: Ip4::from_raw(frontend),
            port_be: fport,
            _pad: 0,
        };
        // Best effort: without it, getpeername shows the backend.
        let _ = SOCK_REVNAT.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: u32, port_be: u16) -> Option<(u32, u16)> {
        let key = SockRevKey4 {
            cookie,
            addr: Ip4::from_raw(backend),
            port_be,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let frontend = unsafe { SOCK_REVNAT.get(&key) }.copied()?;
        Some((frontend.addr(), frontend.port_be()))
    }

    #[inline(always)]
    fn mapped4(_: u32) -> Option<u32> {
        None
    }

    #[inline(always)]
    fn embed4(addr: u32) -> u32 {
        addr
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn read_addr(sa: *mut bpf_sock_addr) -> Addr6 {
        // SAFETY: the context the kernel passed; 32-bit loads of its field,
        // word by word (the verifier allows no wider access).
        unsafe {
            let words = addr_of!((*sa).user_ip6).cast::<u32>();
            [
                words.read_volatile(),
                words.add(1).read_volatile(),
                words.add(2).read_volatile(),
                words.add(3).read_volatile(),
            ]
        }
    }

    #[inline(always)]
    fn write_addr(sa: *mut bpf_sock_addr, addr: Addr6) {
        // SAFETY: a field these hooks may write, with 32-bit stores.
        unsafe {
            let words = addr_of_mut!((*sa).user_ip6).cast::<u32>();
            words.write_volatile(addr[0]);
            words.add(1).write_volatile(addr[1]);
            words.add(2).write_volatile(addr[2]);
            words.add(3).write_volatile(addr[3]);
        }
    }

    #[inline(always)]
    fn client(cookie_be: u32) -> Addr6 {
        [0, 0, 0, cookie_be]
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: Addr6, port_be: u16, frontend: Addr6, fport: u16) {
        let key = rev_key6(cookie, backend, port_be);
        let value = RevNat6 {
            addr: bytes6(frontend),
            port_be: fport,
            _pad: 0,
        };
        // Best effort, as for IPv4.
        let _ = SOCK_REVNAT6.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: Addr6, port_be: u16) -> Option<(Addr6, u16)> {
        // SAFETY: copied out at once.
        let frontend = unsafe { SOCK_REVNAT6.get(&rev_key6(cookie, backend, port_be)) }.copied()?;
        Some((frontend.addr(), frontend.port_be()))
    }

    #[inline(always)]
    fn mapped4(addr: Addr6) -> Option<u32> {
        (addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED4_WORD).then_some(addr[3])
    }

    #[inline(always)]
    fn embed4(addr: u32) -> Addr6 {
        [0, 0, MAPPED4_WORD, addr]
    }
}

#[inline(always)]
fn bytes6(addr: Addr6) -> [u8; 16] {
    // SAFETY: 16 bytes either way.
    unsafe { core::mem::transmute::<Addr6, [u8; 16]>(addr) }
}

#[inline(always)]
fn rev_key6(cookie: u64, backend: Addr6, port_be: u16) -> SockRevKey6 {
    SockRevKey6 {
        cookie,
        addr: bytes6(backend),
        port_be,
        _pad: [0; 6],
    }
}

/// A socket dialling a frontend, as the schedulers see it.
struct Dial<F: Family> {
    /// Stands for the client's address: its network namespace's cookie.
    client: F::Addr,
    daddr: F::Addr,
    dport: u16,
    proto: u8,
    cookie: u64,
}

impl<F: SockFamily> Client<F> for Dial<F> {
    /// The namespace's cookie, not an address: the source address is not
    /// chosen yet at connect() (see [`SockFamily::client`]): a socket's
    /// affinity never meets a packet client's.
    #[inline(always)]
    fn client(&self) -> F::Addr {
        self.client
    }

    /// The socket's cookie in place of the source address and port: one
    /// socket, one backend; the next socket, another draw.
    #[inline(always)]
    fn flow_hash(&self) -> u32 {
        F::flow_hash(
            F::client(self.cookie as u32),
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
    /// No endpoint to go to: the frontend has none, or no frontend serves
    /// this port of an address in the service CIDRs (the packet path
    /// rejects both).
    NoEndpoints,
    /// internalTrafficPolicy=Local and none on this node (the packet path drops).
    NoLocalEndpoint,
}

/// connect(): TCP and connected UDP.
#[inline(always)]
pub fn connect<F: SockFamily>(ctx: &SockAddrContext, errno: Errno) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; 32-bit loads of its fields.
    let protocol = unsafe { addr_of!((*sa).protocol).read_volatile() };
    let proto = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return ALLOW,
    };
    dial::<F>(ctx, proto, errno)
}

/// sendmsg() with an address: unconnected UDP, per datagram.
#[inline(always)]
pub fn sendmsg<F: SockFamily>(ctx: &SockAddrContext, errno: Errno) -> i32 {
    // The hook runs for UDP only (and for raw sockets, which it leaves alone).
    // SAFETY: as in `connect`.
    let protocol = unsafe { addr_of!((*ctx.sock_addr).protocol).read_volatile() };
    if protocol != 17 {
        return ALLOW;
    }
    dial::<F>(ctx, proto::UDP, errno)
}

/// recvmsg() and getpeername(): a backend this socket was sent to reads as
/// the frontend it dialled. Always allowed (these hooks cannot refuse).
#[inline(always)]
pub fn reverse<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = F::read_addr(sa);
    // SAFETY: as in `connect`.
    let port = unsafe { addr_of!((*sa).user_port).read_volatile() };
    // SAFETY: a helper every sock_addr program may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let frontend = match F::mapped4(addr) {
        Some(addr4) => V4::recall(cookie, addr4, port as u16).map(|(a, p)| (F::embed4(a), p)),
        None => F::recall(cookie, addr, port as u16),
    };
    if let Some((frontend, port_be)) = frontend {
        write::<F>(sa, frontend, port_be);
    }
    ALLOW
}

/// A socket of the node (or, when told, of any namespace) dialling a
/// frontend gets the scheduler's backend in its place.
#[inline(always)]
fn dial<F: SockFamily>(ctx: &SockAddrContext, proto: u8, errno: Errno) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `connect`.
    let (family, port) = unsafe {
        (
            addr_of!((*sa).user_family).read_volatile(),
            addr_of!((*sa).user_port).read_volatile(),
        )
    };
    if family != u32::from(F::AF) {
        return ALLOW;
    }
    let daddr = F::read_addr(sa);
    let dport = port as u16;
    match F::mapped4(daddr) {
        // IPv4 packets: the IPv4 frontend, a backend written back mapped.
        Some(daddr4) => match translate::<V4>(ctx, daddr4, dport, proto) {
            Ok(Some((addr, port_be))) => write::<F>(sa, F::embed4(addr), port_be),
            Ok(None) => {}
            Err(refusal) => return refuse(refusal, errno),
        },
        None => match translate::<F>(ctx, daddr, dport, proto) {
            Ok(Some((addr, port_be))) => write::<F>(sa, addr, port_be),
            Ok(None) => {}
            Err(refusal) => return refuse(refusal, errno),
        },
    }
    ALLOW
}

/// The backend a socket dialling `daddr:dport` goes to, its reverse entry
/// remembered; None when the hooks leave the dial alone.
#[inline(always)]
fn translate<F: SockFamily>(
    ctx: &SockAddrContext,
    daddr: F::Addr,
    dport: u16,
    proto: u8,
) -> Result<Option<(F::Addr, u16)>, Refusal> {
    let key = F::service_key(daddr, dport, proto, 0);
    let Some(svc) = F::service(&key) else {
        // No frontend at an address of the service CIDRs: an unallocated
        // ClusterIP, or a port its ClusterIP does not serve.
        if F::in_service_cidr(daddr) && node_client(ctx).is_some() {
            return Err(Refusal::NoEndpoints);
        }
        return Ok(None);
    };
    let (svc, skip) = lb::for_cluster_client(svc);
    let Some(client) = node_client(ctx) else {
        return Ok(None);
    };
    // The node is not one of the clients loadBalancerSourceRanges name: its
    // connection goes out to the load balancer, which applies them.
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        return Ok(None);
    }
    // SAFETY: a helper every sock_addr program may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dial = Dial::<F> {
        client: F::client(client),
        daddr,
        dport,
        proto,
        cookie,
    };
    let (addr, port_be) = choose(&dial, key, &svc, skip)?;
    F::remember(cookie, addr, port_be, daddr, dport);
    Ok(Some((addr, port_be)))
}

/// The backend for `dial`: none when the frontend has no endpoint for it.
#[inline(always)]
fn choose<F: SockFamily>(
    dial: &Dial<F>,
    key: F::ServiceKey,
    svc: &ServiceValue,
    skip: u16,
) -> Result<(F::Addr, u16), Refusal> {
    if svc.count == 0 {
        return Err(if svc.flags & svc_flags::LOCAL_ONLY != 0 {
            Refusal::NoLocalEndpoint
        } else {
            Refusal::NoEndpoints
        });
    }
    let (_, backend) =
        sched::pick::<F>(dial, key, svc, skip, ct::now()).map_err(|_| Refusal::NoEndpoints)?;
    Ok((backend.addr(), backend.port_be()))
}

/// The client identity of a socket the hooks serve: its namespace's cookie
/// (network order, as an address would be), if the namespace is the node's
/// (or every namespace is served).
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

/// Writes the address and port the socket goes to.
#[inline(always)]
fn write<F: SockFamily>(sa: *mut bpf_sock_addr, addr: F::Addr, port_be: u16) {
    F::write_addr(sa, addr);
    // SAFETY: a field these hooks may write, with a 32-bit store.
    unsafe { addr_of_mut!((*sa).user_port).write_volatile(u32::from(port_be)) };
}
