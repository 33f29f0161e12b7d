//! `proxy-agent inspect`: the pinned maps as tables, without loading anything
//! (read through `proxy_common::pinned`).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use proxy_common::{
    backend_flags, backend_state, ct_dir, ct_flags, pinned::Pinned, AffinityKey4, AffinityValue,
    CtKey4, CtValue, Nat4, ServiceValue,
};

use crate::desired::{
    dump::{self, protocol},
    Backend, RevNat, ServiceKey,
};

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// `addr:port`, or `[addr]:port` for IPv6, as people write them.
fn at(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Both families' frontends, backends and reverse-NAT entries, in one type.
struct ServiceMaps {
    slots: Vec<(ServiceKey, ServiceValue)>,
    backends: HashMap<u32, Backend>,
    revnat: Vec<(u32, RevNat)>,
}

fn service_maps(pinned: &Pinned) -> Result<ServiceMaps> {
    let slots = pinned
        .services()?
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .chain(pinned.services6()?.into_iter().map(|(k, v)| (k.into(), v)))
        .collect();
    let backends = pinned
        .backends()?
        .into_iter()
        .map(|(id, b)| (id, b.into()))
        .chain(
            pinned
                .backends6()?
                .into_iter()
                .map(|(id, b)| (id, b.into())),
        )
        .collect();
    let revnat = pinned
        .revnat()?
        .into_iter()
        .map(|(id, r)| (id, r.into()))
        .chain(pinned.revnat6()?.into_iter().map(|(id, r)| (id, r.into())))
        .collect();
    Ok(ServiceMaps {
        slots,
        backends,
        revnat,
    })
}

/// The services maps, one line per slot, like `cilium-dbg bpf lb list`.
pub fn services(pin_dir: &Path) -> Result<String> {
    let ServiceMaps {
        mut slots,
        backends,
        ..
    } = service_maps(&Pinned::new(pin_dir))?;
    slots.sort_by_key(|(k, _)| *k);
    let mut out = format!(
        "{:<24} {:>5}  {}\n",
        "FRONTEND", "SLOT", "BACKEND / SERVICE"
    );
    for (k, v) in slots {
        let frontend = format!("{}/{}", at(k.addr, k.port), protocol(k.proto));
        let what = if k.slot == 0 {
            let flags = dump::policy_flags(&v);
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            };
            format!("{} backends, revnat {}{flags}", v.count, v.rev_nat_id)
        } else {
            match backends.get(&v.backend_id) {
                Some(b) => format!(
                    "{} (id {}) {}",
                    at(b.addr, b.port),
                    v.backend_id,
                    backend_words(b)
                ),
                None => format!("missing backend id {}", v.backend_id),
            }
        };
        let _ = writeln!(out, "{frontend:<24} {:>5}  {what}", k.slot);
    }
    Ok(out)
}

fn backend_words(b: &Backend) -> String {
    let state = if b.state == backend_state::TERMINATING {
        "terminating"
    } else {
        "active"
    };
    if b.flags & backend_flags::LOCAL != 0 {
        format!("{state} local")
    } else {
        state.to_string()
    }
}

pub fn backends(pin_dir: &Path) -> Result<String> {
    let ServiceMaps {
        backends,
        mut revnat,
        ..
    } = service_maps(&Pinned::new(pin_dir))?;
    let mut rows: Vec<(u32, Backend)> = backends.into_iter().collect();
    rows.sort_by_key(|(id, _)| *id);
    let mut out = format!("{:>6}  {:<22} {}\n", "ID", "BACKEND", "STATE");
    for (id, b) in rows {
        let _ = writeln!(
            out,
            "{id:>6}  {:<22} {}",
            format!("{}/{}", at(b.addr, b.port), protocol(b.proto)),
            backend_words(&b)
        );
    }
    revnat.sort_by_key(|(id, _)| *id);
    let _ = writeln!(out, "\n{:>6}  FRONTEND", "REVNAT");
    for (id, r) in revnat {
        let _ = writeln!(out, "{id:>6}  {}", at(r.addr, r.port));
    }
    Ok(out)
}

/// One conntrack entry of either family as a row.
struct CtRow {
    proto: u8,
    dir: u8,
    src: SocketAddr,
    dst: SocketAddr,
    value: CtValue,
}

impl CtRow {
    fn v4(k: &CtKey4, value: CtValue) -> Self {
        Self {
            proto: k.proto,
            dir: k.dir,
            src: SocketAddr::new(addr(k.saddr_be).into(), u16::from_be(k.sport_be)),
            dst: SocketAddr::new(addr(k.daddr_be).into(), u16::from_be(k.dport_be)),
            value,
        }
    }

    fn v6(k: &proxy_common::CtKey6, value: CtValue) -> Self {
        Self {
            proto: k.proto,
            dir: k.dir,
            src: SocketAddr::new(Ipv6Addr::from(k.saddr).into(), u16::from_be(k.sport_be)),
            dst: SocketAddr::new(Ipv6Addr::from(k.daddr).into(), u16::from_be(k.dport_be)),
            value,
        }
    }
}

pub fn conntrack(pin_dir: &Path) -> Result<String> {
    let pinned = Pinned::new(pin_dir);
    let rows: Vec<CtRow> = pinned
        .conntrack()?
        .iter()
        .map(|(k, v)| CtRow::v4(k, *v))
        .chain(pinned.conntrack6()?.iter().map(|(k, v)| CtRow::v6(k, *v)))
        .collect();
    let mut out = format!(
        "{:<5} {:<7} {:<45} {:>8} {:>7} {}\n",
        "PROTO", "DIR", "TUPLE", "BACKEND", "REVNAT", "FLAGS"
    );
    for CtRow {
        proto,
        dir,
        src,
        dst,
        value: v,
    } in rows
    {
        let forward = dir == ct_dir::FORWARD;
        let dir = match dir {
            ct_dir::FORWARD => "forward",
            ct_dir::REPLY => "reply",
            _ => "?",
        };
        let tuple = format!("{src} -> {dst}");
        let mut flags = Vec::new();
        if v.flags & ct_flags::HAIRPIN != 0 {
            flags.push("hairpin".to_string());
        }
        if v.nat_port_be != 0 {
            flags.push(format!("nat-port {}", u16::from_be(v.nat_port_be)));
        }
        if v.remap_port_be != 0 {
            // Forward: the port the backend sees; reply: the client's own.
            let side = if forward { "as" } else { "for" };
            flags.push(format!(
                "client-port {side} {}",
                u16::from_be(v.remap_port_be)
            ));
        }
        let _ = writeln!(
            out,
            "{:<5} {dir:<7} {tuple:<45} {:>8} {:>7} {}",
            protocol(proto),
            v.backend_id,
            v.rev_nat_id,
            flags.join(" ")
        );
    }
    let nat: Vec<(CtKey4, Nat4)> = Pinned::new(pin_dir).nat()?;
    if !nat.is_empty() {
        let _ = writeln!(out, "\nSNAT (remote backend reply -> client)");
        for (k, v) in nat {
            let _ = writeln!(
                out,
                "{:<5} {}:{} -> {}:{}  =>  {}:{} (revnat {}){}",
                protocol(k.proto),
                addr(k.saddr_be),
                u16::from_be(k.sport_be),
                addr(k.daddr_be),
                u16::from_be(k.dport_be),
                addr(v.client_addr_be),
                u16::from_be(v.client_port_be),
                v.rev_nat_id,
                if v.flags & ct_flags::CLOSING != 0 {
                    " closing"
                } else {
                    ""
                }
            );
        }
    }
    Ok(out)
}

pub fn affinity(pin_dir: &Path) -> Result<String> {
    let rows: Vec<(AffinityKey4, AffinityValue)> = Pinned::new(pin_dir).affinity()?;
    let mut out = format!(
        "{:<16} {:>7} {:>8} {}\n",
        "CLIENT", "REVNAT", "BACKEND", "LAST USED (ktime ns)"
    );
    let v6 = Pinned::new(pin_dir).affinity6()?;
    let rows = rows
        .iter()
        .map(|(k, v)| (IpAddr::from(addr(k.client_addr_be)), k.rev_nat_id, v))
        .chain(
            v6.iter()
                .map(|(k, v)| (Ipv6Addr::from(k.client_addr).into(), k.rev_nat_id, v)),
        );
    for (client, rev_nat_id, v) in rows {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>8} {}",
            client.to_string(),
            rev_nat_id,
            v.backend_id,
            v.last_used_ns
        );
    }
    Ok(out)
}

pub fn stats(pin_dir: &Path) -> Result<String> {
    let mut out = format!("{:<24} {:>12} {:>14}\n", "COUNTER", "PACKETS", "BYTES");
    for (name, c) in Pinned::new(pin_dir).stats()? {
        let _ = writeln!(out, "{name:<24} {:>12} {:>14}", c.packets, c.bytes);
    }
    Ok(out)
}
