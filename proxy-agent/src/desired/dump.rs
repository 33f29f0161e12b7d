//! The desired map state as text, one line per entry, in address order: what
//! the golden tests compare and what a person reads when a map looks wrong.
//! Pure formatting; byte order is decoded here.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use proxy_common::{backend_flags, backend_state, proto, svc_flags, ServiceValue};

use super::maps::MapState;

/// A protocol number's name as Kubernetes writes it.
pub fn protocol(number: u8) -> &'static str {
    match number {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "?",
    }
}

/// The policy flags of a frontend's slot 0 by name (`local-only`,
/// `in-cluster N`, `source-ranges`, `affinity Ns`), as `inspect` prints them.
pub fn policy_flags(head: &ServiceValue) -> Vec<String> {
    let mut out = Vec::new();
    if head.flags & svc_flags::LOCAL_ONLY != 0 {
        out.push("local-only".to_string());
    }
    if head.cluster_count != 0 {
        out.push(format!("in-cluster {}", head.cluster_count));
    }
    if head.flags & svc_flags::SOURCE_RANGES != 0 {
        out.push("source-ranges".to_string());
    }
    if head.flags & svc_flags::AFFINITY != 0 {
        out.push(format!("affinity {}s", head.backend_id));
    }
    out
}

/// Slot 0's flags by name (`-` for none), the scheduler other than flow hash
/// with them.
fn flags(head: &ServiceValue) -> String {
    let mut out = policy_flags(head);
    match head.flags & svc_flags::SCHEDULER_MASK {
        svc_flags::SCHEDULER_MAGLEV => out.push(format!("maglev(size#{})", head.maglev_size)),
        svc_flags::SCHEDULER_SOURCE_HASH => out.push("source-hash".into()),
        svc_flags::SCHEDULER_ROUND_ROBIN => out.push("round-robin".into()),
        _ => {}
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// Every frontend (slot 0, its slots, Maglev share, source ranges), then
/// every backend and reverse-NAT entry.
pub fn dump(state: &MapState) -> String {
    let mut out = String::new();
    let mut heads: Vec<_> = state.services.iter().filter(|(k, _)| k.slot == 0).collect();
    heads.sort_by_key(|(k, _)| **k);
    for (key, head) in heads {
        let _ = writeln!(
            out,
            "frontend {}/{} revnat={} backends={} flags={}",
            SocketAddr::new(key.addr, key.port),
            protocol(key.proto),
            head.rev_nat_id,
            head.count,
            flags(head)
        );
        for slot in 1..=head.slots() {
            let whose = if slot > head.count {
                " (in-cluster)"
            } else {
                ""
            };
            let _ = match state.services.get(&key.with_slot(slot)) {
                Some(v) => writeln!(out, "  slot {slot}{whose}: backend {}", v.backend_id),
                None => writeln!(out, "  slot {slot}{whose}: missing"),
            };
        }
        let mut share: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, id) in state
            .maglev
            .iter()
            .filter(|(k, _)| k.rev_nat_id == head.rev_nat_id)
        {
            *share.entry(*id).or_default() += 1;
        }
        if !share.is_empty() {
            let share: Vec<String> = share.iter().map(|(id, n)| format!("{id}:{n}")).collect();
            let _ = writeln!(out, "  maglev: {}", share.join(" "));
        }
        for range in &state.source_ranges {
            if range.rev_nat_id == head.rev_nat_id {
                let _ = writeln!(out, "  source range {}", range.range);
            }
        }
    }
    for (id, b) in &state.backends {
        let state = if b.state == backend_state::TERMINATING {
            "terminating"
        } else {
            "active"
        };
        let local = if b.flags & backend_flags::LOCAL != 0 {
            " local"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "backend {id} {}/{} {state}{local}",
            SocketAddr::new(b.addr, b.port),
            protocol(b.proto)
        );
    }
    for (id, r) in &state.revnat {
        let _ = writeln!(out, "revnat {id} {}", SocketAddr::new(r.addr, r.port));
    }
    out
}
