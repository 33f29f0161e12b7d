//! The one place that fills what the objects leave open and builds the node
//! settings, for the agent, `simulate`, the tests and the benches alike: the
//! default scheduler of frontends without one, and the node `Config` (SNAT
//! address, NAT port range) the programs read.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Result};

use crate::frontend::{FrontendSpec, Scheduler};

/// Node ports SNATed flows get unless told otherwise: above Linux's default
/// ephemeral range (32768-60999), so they never meet the node's own sockets.
pub const DEFAULT_NAT_PORTS: (u16, u16) = (61_000, 65_535);

/// Gives every frontend without a scheduler of its own (no
/// `ferry.dev/scheduler` annotation, none in the services file) `scheduler`.
pub fn fill_defaults(frontends: &mut [FrontendSpec], scheduler: Scheduler) {
    for frontend in frontends {
        frontend.scheduler.get_or_insert(scheduler);
    }
}

/// The node settings the programs read, of both families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub v4: proxy_common::Config,
    pub v6: proxy_common::Config6,
}

/// The node settings: SNATed traffic leaves with `snat` or `snat6` (none:
/// zeros, no SNAT address of that family known yet) and a port in
/// `nat_ports`.
pub fn node_config(
    snat: Option<Ipv4Addr>,
    snat6: Option<Ipv6Addr>,
    nat_ports: (u16, u16),
) -> NodeConfig {
    NodeConfig {
        v4: proxy_common::Config {
            snat_addr_be: snat.map_or(0, |a| u32::from(a).to_be()),
            nat_port_min: nat_ports.0,
            nat_port_max: nat_ports.1,
        },
        v6: proxy_common::Config6 {
            snat_addr: snat6.map_or([0; 16], |a| a.octets()),
        },
    }
}

/// Reads a NAT port range written `MIN-MAX` (as `--nat-ports` takes it).
pub fn parse_nat_ports(text: &str) -> Result<(u16, u16)> {
    text.split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
        .filter(|(a, b)| *a > 0 && a <= b)
        .ok_or_else(|| anyhow!("--nat-ports {text}: expected MIN-MAX"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_ports_parse_as_the_flag_documents() {
        assert_eq!(parse_nat_ports("61000-65535").unwrap(), DEFAULT_NAT_PORTS);
        assert_eq!(parse_nat_ports(" 1 - 2 ").unwrap(), (1, 2));
        for bad in ["0-10", "10-1", "10", "a-b", "1-70000"] {
            assert!(parse_nat_ports(bad).is_err(), "{bad}");
        }
    }
}
