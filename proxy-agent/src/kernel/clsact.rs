//! The clsact qdisc the tc filters hang from: `cleanup` removes it from an
//! interface where it detached Ferry's filters once no filter at all is left
//! on it (deleting a clsact deletes its filters, so one that still holds
//! another tool's filters stays). Plain rtnetlink (`rtnl`): aya adds clsact
//! qdiscs but has no call to remove one or to list filters.

use anyhow::{Context, Result};

use super::rtnl::{attr, os_error, Rtnl, NLM_F_DUMP};

const RTM_DELQDISC: u16 = 37;
const RTM_GETTFILTER: u16 = 46;
const TCMSG: usize = 20;
const TCA_KIND: u16 = 1;
/// `TC_H_CLSACT`, and the parents of its ingress and egress filters.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;

/// No clsact qdisc on the interface (or no such interface).
fn none_there(e: &anyhow::Error) -> bool {
    matches!(os_error(e), Some(libc::EINVAL | libc::ENOENT))
}

/// Removes the clsact qdisc of interface `index` if neither of its hooks has
/// a filter left. Returns whether it removed one (none there: false).
pub fn remove_if_empty(index: u32) -> Result<bool> {
    let mut rtnl = Rtnl::open()?;
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        match rtnl.request(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg(index, 0, parent)) {
            Ok(filters) if filters.is_empty() => {}
            Ok(_) => return Ok(false),
            Err(e) if none_there(&e) => return Ok(false),
            Err(e) => return Err(e).context("listing tc filters"),
        }
    }
    match rtnl.request(RTM_DELQDISC, 0, &clsact_qdisc(index)) {
        Ok(_) => Ok(true),
        Err(e) if none_there(&e) => Ok(false),
        Err(e) => Err(e).context("removing the clsact qdisc"),
    }
}

/// A tcmsg: family, padding, ifindex, handle, parent, info.
fn tcmsg(index: u32, handle: u32, parent: u32) -> Vec<u8> {
    let mut msg = vec![0u8; TCMSG];
    msg[4..8].copy_from_slice(&index.to_ne_bytes());
    msg[8..12].copy_from_slice(&handle.to_ne_bytes());
    msg[12..16].copy_from_slice(&parent.to_ne_bytes());
    msg
}

/// The request body naming interface `index`'s clsact qdisc.
fn clsact_qdisc(index: u32) -> Vec<u8> {
    let mut body = tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT);
    attr(&mut body, TCA_KIND, b"clsact\0");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qdisc_request_names_clsact() {
        let body = clsact_qdisc(7);
        assert_eq!(body.len(), TCMSG + 12);
        assert_eq!(&body[4..8], &7u32.to_ne_bytes());
        assert_eq!(&body[TCMSG..TCMSG + 2], &11u16.to_ne_bytes());
        assert_eq!(&body[TCMSG + 4..TCMSG + 11], b"clsact\0");
    }
}
