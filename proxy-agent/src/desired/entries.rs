//! The entries of the service, backend, reverse-NAT and source-range maps
//! as the agent plans them: one type for both address families. The kernel has a map of
//! each per family (`svc4_v2` and `svc6_v1`, ...); `kernel/` writes an entry
//! into the map of its address's family, through the conversions here.

use std::net::IpAddr;

use proxy_common::{
    Backend4, Backend6, RevNat4, RevNat6, ServiceKey4, ServiceKey6, SourceRange4, SourceRange6,
};

use crate::frontend::Cidr;

/// A key of the services map: slot `slot` of frontend `addr:port`/`proto`
/// (slot 0 describes the frontend, slots 1.. name its backends). Ordered by
/// address first, so one frontend's slots are a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub slot: u16,
}

impl ServiceKey {
    pub fn new(addr: impl Into<IpAddr>, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr: addr.into(),
            port,
            proto,
            slot,
        }
    }

    /// The same frontend's slot `slot`.
    #[must_use]
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }

    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn port(&self) -> u16 {
        self.port
    }
}

impl Backend {
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn port(&self) -> u16 {
        self.port
    }
}

impl RevNat {
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn port(&self) -> u16 {
        self.port
    }
}

/// A value of the backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// One of `proxy_common::backend_state`.
    pub state: u8,
    /// Bits of `proxy_common::backend_flags`.
    pub flags: u8,
}

/// A value of the reverse-NAT map: the frontend a client dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNat {
    pub addr: IpAddr,
    pub port: u16,
}

/// An entry in the kernel's layout of one family or the other.
pub enum Family<V4, V6> {
    V4(V4),
    V6(V6),
}

impl<V4, V6> Family<V4, V6> {
    /// The IPv4 layout, if the entry is of that family.
    pub fn v4(self) -> Option<V4> {
        match self {
            Self::V4(v) => Some(v),
            Self::V6(_) => None,
        }
    }
}

impl ServiceKey {
    pub fn kernel(&self) -> Family<ServiceKey4, ServiceKey6> {
        match self.addr {
            IpAddr::V4(a) => Family::V4(ServiceKey4::new(a, self.port, self.proto, self.slot)),
            IpAddr::V6(a) => Family::V6(ServiceKey6::new(a, self.port, self.proto, self.slot)),
        }
    }
}

impl From<ServiceKey4> for ServiceKey {
    fn from(k: ServiceKey4) -> Self {
        Self::new(k.addr(), k.port(), k.proto, k.slot)
    }
}

impl From<ServiceKey6> for ServiceKey {
    fn from(k: ServiceKey6) -> Self {
        Self::new(k.addr(), k.port(), k.proto, k.slot)
    }
}

impl Backend {
    /// The kernel's value for backend `id` (the IPv4 one names its id: see
    /// `Backend4`).
    pub fn kernel(&self, id: u32) -> Family<Backend4, Backend6> {
        match self.addr {
            IpAddr::V4(a) => Family::V4(Backend4 {
                addr: a.into(),
                port_be: self.port.to_be(),
                proto: self.proto,
                state: self.state,
                flags: self.flags,
                _pad: [0; 3],
                id,
            }),
            IpAddr::V6(a) => Family::V6(Backend6 {
                addr: a.octets(),
                port_be: self.port.to_be(),
                proto: self.proto,
                state: self.state,
                flags: self.flags,
                _pad: [0; 3],
            }),
        }
    }
}

impl From<Backend4> for Backend {
    fn from(b: Backend4) -> Self {
        Self {
            addr: b.addr().into(),
            port: b.port(),
            proto: b.proto,
            state: b.state,
            flags: b.flags,
        }
    }
}

impl From<Backend6> for Backend {
    fn from(b: Backend6) -> Self {
        Self {
            addr: b.addr().into(),
            port: b.port(),
            proto: b.proto,
            state: b.state,
            flags: b.flags,
        }
    }
}

impl RevNat {
    pub fn kernel(&self) -> Family<RevNat4, RevNat6> {
        match self.addr {
            IpAddr::V4(a) => Family::V4(RevNat4 {
                addr: a.into(),
                port_be: self.port.to_be(),
                _pad: 0,
            }),
            IpAddr::V6(a) => Family::V6(RevNat6 {
                addr: a.octets(),
                port_be: self.port.to_be(),
                _pad: 0,
            }),
        }
    }
}

impl From<RevNat4> for RevNat {
    fn from(r: RevNat4) -> Self {
        Self {
            addr: r.addr().into(),
            port: r.port(),
        }
    }
}

impl From<RevNat6> for RevNat {
    fn from(r: RevNat6) -> Self {
        Self {
            addr: r.addr().into(),
            port: r.port(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_go_to_their_familys_layout_and_back() {
        let v4 = ServiceKey::new([10, 96, 0, 10], 53, 17, 2);
        let Family::V4(k) = v4.kernel() else {
            panic!("IPv4 key in the IPv6 layout")
        };
        assert_eq!(ServiceKey::from(k), v4);
        let v6 = ServiceKey::new("fd00::10".parse::<std::net::Ipv6Addr>().unwrap(), 53, 17, 2);
        let Family::V6(k) = v6.kernel() else {
            panic!("IPv6 key in the IPv4 layout")
        };
        assert_eq!(ServiceKey::from(k), v6);
        let b = Backend {
            addr: "fd00::3".parse().unwrap(),
            port: 8080,
            proto: 6,
            state: 1,
            flags: 1,
        };
        let Family::V6(k) = b.kernel(7) else { panic!() };
        assert_eq!(Backend::from(k), b);
        let b4 = Backend {
            addr: "10.0.0.3".parse().unwrap(),
            ..b
        };
        let Family::V4(k) = b4.kernel(7) else {
            panic!()
        };
        assert_eq!(
            (Backend::from(k), k.id),
            (b4, 7),
            "the IPv4 value names its id"
        );
        let r = RevNat {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
        };
        let Family::V4(k) = r.kernel() else { panic!() };
        assert_eq!(RevNat::from(k), r);
        // One frontend's slots are a range, whatever the family.
        assert!(v4 < v6 && v4.with_slot(0) < v4 && v4 < v4.with_slot(3));
    }
}

/// An entry of the source-ranges maps: clients in `range` may reach the
/// LoadBalancer frontend `rev_nat_id` (whose address is of `range`'s family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub rev_nat_id: u32,
    pub range: Cidr,
}

impl SourceRange {
    /// The LPM trie key: its prefix length and data.
    pub fn kernel(&self) -> Family<(u32, SourceRange4), (u32, SourceRange6)> {
        let rev_nat_id_be = self.rev_nat_id.to_be();
        match self.range.address {
            IpAddr::V4(a) => Family::V4((
                SourceRange4::prefix_len(self.range.prefix),
                SourceRange4 {
                    rev_nat_id_be,
                    addr: a.into(),
                },
            )),
            IpAddr::V6(a) => Family::V6((
                SourceRange6::prefix_len(self.range.prefix),
                SourceRange6 {
                    rev_nat_id_be,
                    addr: a.octets(),
                },
            )),
        }
    }

    /// An entry read back from the kernel (`None` for a prefix length no
    /// entry the agent writes has).
    fn read(rev_nat_id_be: u32, addr: IpAddr, prefix_len: u32, id_bits: u32) -> Option<Self> {
        let prefix = u8::try_from(prefix_len.checked_sub(id_bits)?).ok()?;
        Some(Self {
            rev_nat_id: u32::from_be(rev_nat_id_be),
            range: Cidr::new(addr, prefix)?,
        })
    }

    pub fn from_v4(prefix_len: u32, d: SourceRange4) -> Option<Self> {
        let addr = d.addr.addr();
        Self::read(
            d.rev_nat_id_be,
            addr.into(),
            prefix_len,
            SourceRange4::ID_BITS,
        )
    }

    pub fn from_v6(prefix_len: u32, d: SourceRange6) -> Option<Self> {
        let addr = std::net::Ipv6Addr::from(d.addr);
        Self::read(
            d.rev_nat_id_be,
            addr.into(),
            prefix_len,
            SourceRange6::ID_BITS,
        )
    }
}
