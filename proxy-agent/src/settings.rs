//! The one place that fills what the objects leave open and builds the node
//! settings, for the agent, `simulate`, the tests and the benches alike: the
//! default scheduler of frontends without one, and the node settings (SNAT
//! address, NAT port range, service CIDRs) the programs read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Result};
use proxy_common::{capacity, Net4, Net6, ServiceCidrs};

use crate::frontend::{Cidr, FrontendSpec, Scheduler};

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
    pub service_cidrs: ServiceCidrs,
}

/// The node settings: SNATed traffic leaves with `snat` or `snat6` (none:
/// zeros, no SNAT address of that family known yet) and a port in
/// `nat_ports`; new flows into `service_cidrs` that no frontend serves are
/// refused.
pub fn node_config(
    snat: Option<Ipv4Addr>,
    snat6: Option<Ipv6Addr>,
    nat_ports: (u16, u16),
    service_cidrs: ServiceCidrs,
) -> NodeConfig {
    NodeConfig {
        service_cidrs,
        v4: proxy_common::Config {
            snat_addr: snat.map_or(proxy_common::Ip4::default(), proxy_common::Ip4::from),
            nat_port_min: nat_ports.0,
            nat_port_max: nat_ports.1,
        },
        v6: proxy_common::Config6 {
            snat_addr: snat6.map_or([0; 16], |a| a.octets()),
        },
    }
}

/// The service CIDRs (`--service-cidr`) as the programs hold them: at most
/// `capacity::SERVICE_CIDRS` of each family.
pub fn service_cidrs(cidrs: &[Cidr]) -> Result<ServiceCidrs> {
    let mut out = ServiceCidrs::default();
    for cidr in cidrs {
        let full = || {
            anyhow!(
                "--service-cidr {cidr}: at most {} ranges of each family",
                capacity::SERVICE_CIDRS
            )
        };
        match cidr.address {
            IpAddr::V4(addr) => {
                let net = out.v4.get_mut(out.count4 as usize).ok_or_else(full)?;
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(cidr.prefix))
                    .unwrap_or(0);
                *net = Net4 {
                    addr: addr.into(),
                    mask: Ipv4Addr::from(mask).into(),
                };
                out.count4 += 1;
            }
            IpAddr::V6(addr) => {
                let net = out.v6.get_mut(out.count6 as usize).ok_or_else(full)?;
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(cidr.prefix))
                    .unwrap_or(0);
                *net = Net6 {
                    addr: addr.octets(),
                    mask: mask.to_be_bytes(),
                };
                out.count6 += 1;
            }
        }
    }
    Ok(out)
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
    fn service_cidrs_become_masks_of_each_family() {
        let cidrs: Vec<Cidr> = ["10.96.0.0/12", "fd00:10:96::/112", "192.0.2.7"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let got = service_cidrs(&cidrs).unwrap();
        assert_eq!((got.count4, got.count6), (2, 1));
        assert_eq!(got.v4[0].addr, Ipv4Addr::new(10, 96, 0, 0).into());
        assert_eq!(got.v4[0].mask.addr(), Ipv4Addr::new(255, 240, 0, 0));
        assert_eq!(got.v4[1].mask.octets, [255; 4]);
        assert_eq!(got.v6[0].mask[..14], [0xff; 14]);
        assert_eq!(got.v6[0].mask[14..], [0, 0]);
        let all: Vec<Cidr> = vec!["0.0.0.0/0".parse().unwrap()];
        assert_eq!(service_cidrs(&all).unwrap().v4[0].mask.octets, [0; 4]);
        let five: Vec<Cidr> = (0..5)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        assert!(service_cidrs(&five).is_err());
        assert!(service_cidrs(&five[..4]).is_ok());
    }

    #[test]
    fn nat_ports_parse_as_the_flag_documents() {
        assert_eq!(parse_nat_ports("61000-65535").unwrap(), DEFAULT_NAT_PORTS);
        assert_eq!(parse_nat_ports(" 1 - 2 ").unwrap(), (1, 2));
        for bad in ["0-10", "10-1", "10", "a-b", "1-70000"] {
            assert!(parse_nat_ports(bad).is_err(), "{bad}");
        }
    }
}
