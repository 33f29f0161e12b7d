//! `proxy-agent inspect`: the pinned maps as tables (or JSON), without
//! loading anything (read through `proxy_common::pinned`). Addresses and
//! ports are written as people write them (`10.96.0.10:80/TCP`,
//! `[fd00::10]:80`), both families in one table, frontends by the address
//! they stand for beside their id.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use proxy_common::{
    backend_flags, backend_state, ct_dir, ct_flags, map_names, pinned::Pinned, AffinityKey4,
    AffinityKey6, AffinityValue, CtKey6, CtValue, MaglevKey, Nat6, ServiceValue,
};

use crate::desired::{
    dump::{self, protocol},
    Backend, RevNat, ServiceKey, SourceRange,
};

/// What `inspect` can print.
pub const KINDS: [&str; 10] = [
    "services",
    "backends",
    "frontends",
    "conntrack",
    "nat",
    "affinity",
    "maglev",
    "source-ranges",
    "traffic",
    "stats",
];

/// One map (or view of several) as rows under named columns: printed
/// aligned, or as JSON objects keyed by the columns' names.
pub struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// Aligned columns, the last one left ragged.
    pub fn text(&self) -> String {
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            let last = cells.len() - 1;
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell:<w$}  ");
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let header: Vec<String> = self.columns.iter().map(|c| c.to_uppercase()).collect();
        let mut out = line(header.iter().map(String::as_str).collect());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }

    /// One object per row, keyed by column; numbers as numbers.
    pub fn json(&self) -> serde_json::Value {
        let rows = self.rows.iter().map(|row| {
            let object: serde_json::Map<String, serde_json::Value> = self
                .columns
                .iter()
                .zip(row)
                .map(|(column, cell)| {
                    let value = match cell.parse::<u64>() {
                        Ok(n) => n.into(),
                        Err(_) => cell.clone().into(),
                    };
                    (column.replace(' ', "_"), value)
                })
                .collect();
            serde_json::Value::Object(object)
        });
        serde_json::Value::Array(rows.collect())
    }
}

/// The table of `kind` (one of [`KINDS`]) from the maps pinned in `pin_dir`.
pub fn table(kind: &str, pin_dir: &Path) -> Result<Table> {
    let pinned = Pinned::new(pin_dir);
    match kind {
        "services" => services(&pinned),
        "backends" => backends(&pinned),
        "frontends" => frontends(&pinned),
        "conntrack" => conntrack(&pinned),
        "nat" => nat(&pinned),
        "affinity" => affinity(&pinned),
        "maglev" => maglev(&pinned),
        "source-ranges" => source_ranges(&pinned),
        "traffic" => traffic(&pinned),
        "stats" => stats(&pinned),
        other => anyhow::bail!("no table {other:?}: one of {}", KINDS.join(", ")),
    }
}

/// `addr:port`, or `[addr]:port` for IPv6, as people write them.
fn at(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Both families' frontends, backends and reverse-NAT entries, in one type.
struct ServiceMaps {
    slots: Vec<(ServiceKey, ServiceValue)>,
    backends: HashMap<u32, Backend>,
    revnat: BTreeMap<u32, RevNat>,
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

impl ServiceMaps {
    /// A frontend id as the address it stands for (its protocol is the
    /// flow's), or the bare id when the maps do not hold it.
    fn frontend(&self, id: u32) -> String {
        match self.revnat.get(&id) {
            Some(r) => at(r.addr, r.port),
            None => format!("id {id}"),
        }
    }

    fn backend(&self, id: u32) -> String {
        match self.backends.get(&id) {
            Some(b) => format!("{}/{}", at(b.addr, b.port), protocol(b.proto)),
            None if id == 0 => "-".into(),
            None => format!("id {id}"),
        }
    }
}

/// The services maps, one line per slot, like `cilium-dbg bpf lb list`.
fn services(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut slots = maps.slots.clone();
    slots.sort_by_key(|(k, _)| *k);
    let mut table = Table::new(&["frontend", "slot", "backend / service"]);
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
            match maps.backends.get(&v.backend_id) {
                Some(b) => format!(
                    "{} (id {}) {}",
                    at(b.addr, b.port),
                    v.backend_id,
                    backend_words(b)
                ),
                None => format!("missing backend id {}", v.backend_id),
            }
        };
        table.push(vec![frontend, k.slot.to_string(), what]);
    }
    Ok(table)
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

fn backends(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut rows: Vec<(&u32, &Backend)> = maps.backends.iter().collect();
    rows.sort_by_key(|(id, _)| **id);
    let mut table = Table::new(&["id", "backend", "state"]);
    for (id, b) in rows {
        table.push(vec![
            id.to_string(),
            format!("{}/{}", at(b.addr, b.port), protocol(b.proto)),
            backend_words(b),
        ]);
    }
    Ok(table)
}

/// The reverse-NAT map: each frontend id and the address replies get back.
fn frontends(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut table = Table::new(&["id", "frontend"]);
    for (id, r) in &maps.revnat {
        table.push(vec![id.to_string(), at(r.addr, r.port)]);
    }
    Ok(table)
}

/// One conntrack-keyed entry of either family.
struct Tuple {
    proto: u8,
    dir: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

impl Tuple {
    fn v4(k: &proxy_common::CtKey4) -> Self {
        Self {
            proto: k.proto,
            dir: k.dir,
            src: SocketAddr::new(k.saddr.addr().into(), u16::from_be(k.sport_be)),
            dst: SocketAddr::new(k.daddr.addr().into(), u16::from_be(k.dport_be)),
        }
    }

    fn v6(k: &CtKey6) -> Self {
        Self {
            proto: k.proto,
            dir: k.dir,
            src: SocketAddr::new(Ipv6Addr::from(k.saddr).into(), u16::from_be(k.sport_be)),
            dst: SocketAddr::new(Ipv6Addr::from(k.daddr).into(), u16::from_be(k.dport_be)),
        }
    }
}

fn conntrack(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let rows: Vec<(Tuple, CtValue)> = pinned
        .conntrack()?
        .iter()
        .map(|(k, v)| (Tuple::v4(k), *v))
        .chain(pinned.conntrack6()?.iter().map(|(k, v)| (Tuple::v6(k), *v)))
        .collect();
    let mut table = Table::new(&["proto", "dir", "tuple", "backend", "frontend", "flags"]);
    for (t, v) in rows {
        let forward = t.dir == ct_dir::FORWARD;
        let dir = match t.dir {
            ct_dir::FORWARD => "forward",
            ct_dir::REPLY => "reply",
            _ => "?",
        };
        let mut flags = Vec::new();
        if v.flags & ct_flags::HAIRPIN != 0 {
            flags.push("hairpin".to_string());
        }
        if v.flags & ct_flags::CLOSING != 0 {
            flags.push("closing".to_string());
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
        table.push(vec![
            protocol(t.proto).into(),
            dir.into(),
            format!("{} -> {}", t.src, t.dst),
            maps.backend(v.backend_id),
            maps.frontend(v.rev_nat_id),
            flags.join(" "),
        ]);
    }
    Ok(table)
}

/// SNATed flows: a remote backend's reply (to the node's address and NAT
/// port) and the client it goes back to.
fn nat(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut table = Table::new(&[
        "proto", "reply", "nat port", "client", "frontend", "backend", "flags",
    ]);
    let closing = |flags: u16| {
        if flags & ct_flags::CLOSING != 0 {
            "closing"
        } else {
            ""
        }
    };
    for (k, v) in pinned.nat()? {
        let t = Tuple::v4(&k);
        table.push(vec![
            protocol(t.proto).into(),
            format!("{} -> {}", t.src, t.dst),
            t.dst.port().to_string(),
            at(v.client_addr.addr().into(), u16::from_be(v.client_port_be)),
            maps.frontend(v.rev_nat_id),
            maps.backend(v.backend_id),
            closing(v.flags).into(),
        ]);
    }
    for (k, v) in pinned.hash::<CtKey6, Nat6>(map_names::NAT_V6)? {
        let t = Tuple::v6(&k);
        table.push(vec![
            protocol(t.proto).into(),
            format!("{} -> {}", t.src, t.dst),
            t.dst.port().to_string(),
            at(
                Ipv6Addr::from(v.client_addr).into(),
                u16::from_be(v.client_port_be),
            ),
            maps.frontend(v.rev_nat_id),
            // nat6_v1 does not name the backend: the reply comes from it.
            at(t.src.ip(), t.src.port()),
            closing(v.flags).into(),
        ]);
    }
    Ok(table)
}

fn affinity(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let v4: Vec<(AffinityKey4, AffinityValue)> = pinned.affinity()?;
    let v6: Vec<(AffinityKey6, AffinityValue)> = pinned.affinity6()?;
    let rows = v4
        .iter()
        .map(|(k, v)| (IpAddr::from(k.client_addr.addr()), k.rev_nat_id, v))
        .chain(
            v6.iter()
                .map(|(k, v)| (Ipv6Addr::from(k.client_addr).into(), k.rev_nat_id, v)),
        );
    let mut table = Table::new(&["client", "frontend", "backend", "last used ns"]);
    for (client, rev_nat_id, v) in rows {
        table.push(vec![
            client.to_string(),
            maps.frontend(rev_nat_id),
            maps.backend(v.backend_id),
            v.last_used_ns.to_string(),
        ]);
    }
    Ok(table)
}

/// Each Maglev table: its size and how many of its slots each backend has.
fn maglev(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut tables: BTreeMap<u32, BTreeMap<u32, usize>> = BTreeMap::new();
    for (k, backend_id) in pinned.hash::<MaglevKey, u32>(map_names::MAGLEV_V4)? {
        *tables
            .entry(k.rev_nat_id)
            .or_default()
            .entry(backend_id)
            .or_default() += 1;
    }
    let mut table = Table::new(&["frontend", "slots", "backend", "share"]);
    for (rev_nat_id, backends) in tables {
        let size: usize = backends.values().sum();
        for (backend_id, slots) in backends {
            table.push(vec![
                maps.frontend(rev_nat_id),
                size.to_string(),
                maps.backend(backend_id),
                slots.to_string(),
            ]);
        }
    }
    Ok(table)
}

/// loadBalancerSourceRanges: the ranges each LoadBalancer IP lets in.
fn source_ranges(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let ranges = pinned
        .source_ranges()?
        .into_iter()
        .filter_map(|(len, d)| SourceRange::from_v4(len, d))
        .chain(
            pinned
                .source_ranges6()?
                .into_iter()
                .filter_map(|(len, d)| SourceRange::from_v6(len, d)),
        );
    let mut table = Table::new(&["frontend", "range"]);
    for r in ranges {
        table.push(vec![maps.frontend(r.rev_nat_id), r.range.to_string()]);
    }
    Ok(table)
}

/// The traffic counters (with `--traffic-counters`), per frontend and backend.
fn traffic(pinned: &Pinned) -> Result<Table> {
    let maps = service_maps(pinned)?;
    let mut rows = pinned.traffic()?;
    rows.sort_by_key(|(k, _)| *k);
    let mut table = Table::new(&[
        "frontend",
        "backend",
        "to backend packets",
        "to backend bytes",
        "to client packets",
        "to client bytes",
    ]);
    for (k, t) in rows {
        table.push(vec![
            maps.frontend(k.rev_nat_id),
            maps.backend(k.backend_id),
            t.to_backend_packets.to_string(),
            t.to_backend_bytes.to_string(),
            t.to_client_packets.to_string(),
            t.to_client_bytes.to_string(),
        ]);
    }
    Ok(table)
}

fn stats(pinned: &Pinned) -> Result<Table> {
    let mut table = Table::new(&["counter", "packets", "bytes"]);
    for (name, c) in pinned.stats()? {
        table.push(vec![
            name.into(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_prints_aligned_and_as_json_objects() {
        let mut table = Table::new(&["frontend", "to backend packets", "flags"]);
        table.push(vec!["10.96.0.10:80".into(), "7".into(), "".into()]);
        table.push(vec!["[fd00::10]:80".into(), "12".into(), "closing".into()]);
        assert_eq!(
            table.text(),
            "FRONTEND       TO BACKEND PACKETS  FLAGS\n\
             10.96.0.10:80  7\n\
             [fd00::10]:80  12                  closing\n"
        );
        assert_eq!(
            table.json(),
            serde_json::json!([
                {"frontend": "10.96.0.10:80", "to_backend_packets": 7, "flags": ""},
                {"frontend": "[fd00::10]:80", "to_backend_packets": 12, "flags": "closing"},
            ])
        );
    }
}
