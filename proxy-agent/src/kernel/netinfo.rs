//! What the agent reads from the calling thread's network namespace: each
//! interface with its IPv4 addresses (getifaddrs) and the default route's
//! interface (`/proc/thread-self/net/route`), for the uplink choice
//! (`crate::uplink`); every address of either family, for
//! `--nodeport-addresses`.

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};

use crate::uplink::Interface;

/// Every interface with its IPv4 addresses, in the order the kernel lists them.
pub fn interfaces() -> Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    for (name, loopback, address) in if_addresses()? {
        let index = match out.iter().position(|i| i.name == name) {
            Some(index) => index,
            None => {
                out.push(Interface {
                    name,
                    addresses: Vec::new(),
                    loopback,
                });
                out.len() - 1
            }
        };
        if let Some(IpAddr::V4(address)) = address {
            out[index].addresses.push(address);
        }
    }
    Ok(out)
}

/// Every address of either family the namespace's interfaces hold.
pub fn addresses() -> Result<Vec<IpAddr>> {
    Ok(if_addresses()?
        .into_iter()
        .filter_map(|(_, _, address)| address)
        .collect())
}

/// getifaddrs' list: each entry's interface name, whether it is a loopback,
/// and its address if IPv4 or IPv6.
fn if_addresses() -> Result<Vec<(String, bool, Option<IpAddr>)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let family = if entry.ifa_addr.is_null() {
            0
        } else {
            i32::from(unsafe { (*entry.ifa_addr).sa_family })
        };
        let address = match family {
            libc::AF_INET => {
                let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
                Some(IpAddr::from(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in6>() };
                Some(IpAddr::from(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        };
        let loopback = entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        out.push((name, loopback, address));
    }
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The interface of the IPv4 default route (the lowest metric if several),
/// or none.
pub fn default_route() -> Result<Option<String>> {
    // thread-self: a test thread that entered another namespace sees its own.
    let path = "/proc/thread-self/net/route";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(parse_default_route(&text))
}

/// From the text of `/proc/net/route`: the default route's interface.
pub fn parse_default_route(text: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(fields.get(i)?, 16).ok();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let default = hex(1)? == 0 && hex(7)? == 0 && hex(3)? & RTF_UP != 0;
            let metric = fields.get(6)?.parse::<u32>().ok()?;
            default.then(|| (metric, fields[0].to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric() {
        let text = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
";
        assert_eq!(parse_default_route(text).as_deref(), Some("eth0"));
    }

    #[test]
    fn no_default_route() {
        let header =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n";
        assert_eq!(parse_default_route(header), None);
        // A default route that is not up, and a garbled line.
        let text = format!(
            "{header}eth0\t00000000\t0100000A\t0002\t0\t0\t0\t00000000\t0\t0\t0\nbad line\n"
        );
        assert_eq!(parse_default_route(&text), None);
        assert_eq!(parse_default_route(""), None);
    }
}
