//! `proxy-agent inspect`: the pinned maps as tables, without loading anything
//! (read through `proxy_common::pinned`).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Result;
use proxy_common::{
    backend_flags, backend_state, ct_dir, ct_flags, pinned::Pinned, AffinityKey4, AffinityValue,
    Backend4, CtKey4, CtValue, Nat4, RevNat4, ServiceKey4, ServiceValue,
};

use crate::desired::dump::{self, protocol};

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// The services map, one line per slot, like `cilium-dbg bpf lb list`.
pub fn services(pin_dir: &Path) -> Result<String> {
    let mut slots: Vec<(ServiceKey4, ServiceValue)> = Pinned::new(pin_dir).services()?;
    slots.sort_by_key(|(k, _)| {
        (
            u32::from_be(k.addr_be),
            u16::from_be(k.port_be),
            k.proto,
            k.slot,
        )
    });
    let backends: std::collections::HashMap<u32, Backend4> =
        Pinned::new(pin_dir).backends()?.into_iter().collect();
    let mut out = format!(
        "{:<24} {:>5}  {}\n",
        "FRONTEND", "SLOT", "BACKEND / SERVICE"
    );
    for (k, v) in slots {
        let frontend = format!(
            "{}:{}/{}",
            addr(k.addr_be),
            u16::from_be(k.port_be),
            protocol(k.proto)
        );
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
                    "{}:{} (id {}) {}",
                    addr(b.addr_be),
                    u16::from_be(b.port_be),
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

fn backend_words(b: &Backend4) -> String {
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
    let mut rows: Vec<(u32, Backend4)> = Pinned::new(pin_dir).backends()?;
    rows.sort_by_key(|(id, _)| *id);
    let mut out = format!("{:>6}  {:<22} {}\n", "ID", "BACKEND", "STATE");
    for (id, b) in rows {
        let _ = writeln!(
            out,
            "{id:>6}  {:<22} {}",
            format!(
                "{}:{}/{}",
                addr(b.addr_be),
                u16::from_be(b.port_be),
                protocol(b.proto)
            ),
            backend_words(&b)
        );
    }
    let mut revnat: Vec<(u32, RevNat4)> = Pinned::new(pin_dir).revnat()?;
    revnat.sort_by_key(|(id, _)| *id);
    let _ = writeln!(out, "\n{:>6}  FRONTEND", "REVNAT");
    for (id, r) in revnat {
        let _ = writeln!(
            out,
            "{id:>6}  {}:{}",
            addr(r.addr_be),
            u16::from_be(r.port_be)
        );
    }
    Ok(out)
}

pub fn conntrack(pin_dir: &Path) -> Result<String> {
    let rows: Vec<(CtKey4, CtValue)> = Pinned::new(pin_dir).conntrack()?;
    let mut out = format!(
        "{:<5} {:<7} {:<45} {:>8} {:>7} {}\n",
        "PROTO", "DIR", "TUPLE", "BACKEND", "REVNAT", "FLAGS"
    );
    for (k, v) in rows {
        let dir = match k.dir {
            ct_dir::FORWARD => "forward",
            ct_dir::REPLY => "reply",
            _ => "?",
        };
        let tuple = format!(
            "{}:{} -> {}:{}",
            addr(k.saddr_be),
            u16::from_be(k.sport_be),
            addr(k.daddr_be),
            u16::from_be(k.dport_be)
        );
        let mut flags = Vec::new();
        if v.flags & ct_flags::HAIRPIN != 0 {
            flags.push("hairpin".to_string());
        }
        if v.nat_port_be != 0 {
            flags.push(format!("nat-port {}", u16::from_be(v.nat_port_be)));
        }
        if v.remap_port_be != 0 {
            // Forward: the port the backend sees; reply: the client's own.
            let side = if k.dir == ct_dir::FORWARD {
                "as"
            } else {
                "for"
            };
            flags.push(format!(
                "client-port {side} {}",
                u16::from_be(v.remap_port_be)
            ));
        }
        let _ = writeln!(
            out,
            "{:<5} {dir:<7} {tuple:<45} {:>8} {:>7} {}",
            protocol(k.proto),
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
    for (k, v) in rows {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>8} {}",
            addr(k.client_addr_be),
            k.rev_nat_id,
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
