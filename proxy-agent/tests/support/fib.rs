//! A network namespace whose routing table and neighbours the uplink
//! programs' FIB lookups use: the node's uplink `up0` (10.250.0.11/24), node2
//! and an outside client as static neighbours, node2's pod CIDR routed through
//! it, and 10.244.3.0/24 through a next hop without a neighbour entry; and
//! the same in IPv6 (fd00:10:250::11/64, node2's pods fd00:10:244:2::/64,
//! fd00:10:244:3::/64 through a next hop without a neighbour entry).

use super::netns::{run, Lab};

pub const NODE: &str = "10.250.0.11";
pub const NODE2: &str = "10.250.0.12";
pub const CLIENT: &str = "10.250.0.100";
pub const NODE6: &str = "fd00:10:250::11";
pub const NODE2_6: &str = "fd00:10:250::12";
pub const CLIENT6: &str = "fd00:10:250::100";
pub const NODE_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x11];
pub const NODE2_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x12];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x64];

/// A namespace whose routing table and neighbours the FIB lookups use.
pub fn namespace(lab: &mut Lab) -> (String, u32) {
    let ns = lab.netns("fib");
    run(
        "ip",
        &[
            "-n", &ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &ns,
            "link",
            "set",
            "up0",
            "address",
            &mac(NODE_MAC),
            "up",
        ],
    );
    run("ip", &["-n", &ns, "link", "set", "up1", "up"]);
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NODE}/24"),
            "dev",
            "up0",
        ],
    );
    for (addr, mac_addr) in [(NODE2, NODE2_MAC), (CLIENT, CLIENT_MAC)] {
        neighbour(&ns, addr, mac_addr);
    }
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    run(
        "ip",
        &["-n", &ns, "route", "add", "10.244.2.0/24", "via", NODE2],
    );
    // IPv6: forwarding on before the address, which must be usable at once.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "up0",
            "nodad",
        ],
    );
    for (addr, mac_addr) in [(NODE2_6, NODE2_MAC), (CLIENT6, CLIENT_MAC)] {
        neighbour(&ns, addr, mac_addr);
    }
    run(
        "ip",
        &[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            NODE2_6,
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &ns,
            "route",
            "add",
            "10.244.3.0/24",
            "via",
            "10.250.0.13",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "fd00:10:244:3::/64",
            "via",
            "fd00:10:250::13",
        ],
    );
    let index = run(
        "ip",
        &["netns", "exec", &ns, "cat", "/sys/class/net/up0/ifindex"],
    )
    .trim()
    .parse()
    .unwrap();
    (ns, index)
}

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `addr` a static neighbour on `up0` at `mac_addr`.
fn neighbour(ns: &str, addr: &str, mac_addr: [u8; 6]) {
    let mac = mac(mac_addr);
    run(
        "ip",
        &[
            "-n",
            ns,
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac,
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
    );
}
