//! The clsact qdisc the tc filters hang from: `cleanup` removes it from an
//! interface where it detached Ferry's filters once no filter at all is left
//! on it (deleting a clsact deletes its filters, so one that still holds
//! another tool's filters stays), over rtnetlink (`rtnl`): aya adds clsact
//! qdiscs but has no call to remove one or to list filters.

use anyhow::{Context, Result};
use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    tc::{TcAttribute, TcHandle, TcMessage},
    RouteNetlinkMessage,
};

use super::rtnl::{os_error, Rtnl};

/// The parents of clsact's ingress and egress filters.
const CLSACT_INGRESS: TcHandle = TcHandle {
    major: 0xFFFF,
    minor: TcHandle::MIN_INGRESS,
};
const CLSACT_EGRESS: TcHandle = TcHandle {
    major: 0xFFFF,
    minor: TcHandle::MIN_EGRESS,
};
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xFFFF,
    minor: 0,
};

/// No clsact qdisc on the interface (or no such interface).
fn none_there(e: &anyhow::Error) -> bool {
    matches!(os_error(e), Some(libc::EINVAL | libc::ENOENT))
}

/// Removes the clsact qdisc of interface `index` if neither of its hooks has
/// a filter left. Returns whether it removed one (none there: false).
pub fn remove_if_empty(index: u32) -> Result<bool> {
    let mut rtnl = Rtnl::open()?;
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        let filters = RouteNetlinkMessage::GetTrafficFilter(tcmsg(index, TcHandle::UNSPEC, parent));
        match rtnl.request(filters, NLM_F_DUMP) {
            Ok(filters) if filters.is_empty() => {}
            Ok(_) => return Ok(false),
            Err(e) if none_there(&e) => return Ok(false),
            Err(e) => return Err(e).context("listing tc filters"),
        }
    }
    match rtnl.request(
        RouteNetlinkMessage::DelQueueDiscipline(clsact_qdisc(index)),
        0,
    ) {
        Ok(_) => Ok(true),
        Err(e) if none_there(&e) => Ok(false),
        Err(e) => Err(e).context("removing the clsact qdisc"),
    }
}

/// A tc message about interface `index`.
fn tcmsg(index: u32, handle: TcHandle, parent: TcHandle) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.handle = handle;
    msg.header.parent = parent;
    msg
}

/// The message naming interface `index`'s clsact qdisc.
fn clsact_qdisc(index: u32) -> TcMessage {
    let mut msg = tcmsg(index, CLSACT_HANDLE, TcHandle::CLSACT);
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::rtnl::tests::framed;

    #[test]
    fn the_qdisc_request_names_clsact_with_tc_s_handles() {
        let bytes = framed(RouteNetlinkMessage::DelQueueDiscipline(clsact_qdisc(7)));
        // After the netlink header: the tcmsg (family, padding, ifindex,
        // handle, parent, info), then TCA_KIND.
        let tcmsg = &bytes[16..36];
        assert_eq!(&tcmsg[4..8], &7u32.to_ne_bytes());
        assert_eq!(&tcmsg[8..12], &0xFFFF_0000u32.to_ne_bytes(), "ffff:");
        assert_eq!(&tcmsg[12..16], &0xFFFF_FFF1u32.to_ne_bytes(), "TC_H_CLSACT");
        assert_eq!(&bytes[36..38], &11u16.to_ne_bytes());
        assert_eq!(&bytes[38..40], &1u16.to_ne_bytes(), "TCA_KIND");
        assert_eq!(&bytes[40..47], b"clsact\0");
        let ingress = u32::from(CLSACT_INGRESS);
        assert_eq!(ingress, 0xFFFF_FFF2);
        assert_eq!(u32::from(CLSACT_EGRESS), 0xFFFF_FFF3);
    }
}
