//! The clsact qdisc the tc filters hang from: `cleanup` removes it from an
//! interface where it detached Ferry's filters once no filter at all is left
//! on it (deleting a clsact deletes its filters, so one that still holds
//! another tool's filters stays). Plain rtnetlink: aya adds clsact qdiscs but
//! has no call to remove one or to list filters.

use std::{io, mem::size_of};

use anyhow::{Context, Result};

const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
const TCA_KIND: u16 = 1;
/// `TC_H_CLSACT`, and the parents of its ingress and egress filters.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;

/// Removes the clsact qdisc of interface `index` if neither of its hooks has
/// a filter left. Returns whether it removed one (none there: false).
pub fn remove_if_empty(index: u32) -> Result<bool> {
    let socket = Socket::open()?;
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        match socket.count_filters(index, parent) {
            Ok(0) => {}
            Ok(_) => return Ok(false),
            // No clsact on this interface.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                return Ok(false)
            }
            Err(e) => return Err(e).context("listing tc filters"),
        }
    }
    let mut kind = attribute(TCA_KIND, b"clsact\0");
    let mut body = tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT);
    body.append(&mut kind);
    match socket.request(RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK, &body) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(false),
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

fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut attr = Vec::with_capacity(len.next_multiple_of(4));
    attr.extend((len as u16).to_ne_bytes());
    attr.extend(kind.to_ne_bytes());
    attr.extend(value);
    attr.resize(len.next_multiple_of(4), 0);
    attr
}

/// The message types of a buffer of netlink messages, with an error
/// message's code (0 for an acknowledgement).
fn parse(mut buf: &[u8]) -> Vec<(u16, i32)> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let code = match buf.get(NLMSG_HDR..NLMSG_HDR + 4) {
            Some(code) if kind == NLMSG_ERROR => i32::from_ne_bytes(code.try_into().unwrap()),
            _ => 0,
        };
        out.push((kind, code));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

struct Socket(i32);

impl Socket {
    fn open() -> Result<Self> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        Ok(Self(fd))
    }

    fn count_filters(&self, index: u32, parent: u32) -> io::Result<usize> {
        let replies = self.request(
            RTM_GETTFILTER,
            NLM_F_REQUEST | NLM_F_DUMP,
            &tcmsg(index, 0, parent),
        )?;
        Ok(replies.iter().filter(|k| **k == RTM_NEWTFILTER).count())
    }

    /// Sends one request and reads its answer up to the end of the dump or the
    /// acknowledgement; a netlink error becomes the `io::Error` of its code.
    fn request(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<u16>> {
        let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
        msg.extend(((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(1u32.to_ne_bytes()); // sequence
        msg.extend(0u32.to_ne_bytes()); // port id: the kernel fills it
        msg.extend(body);
        let sent = unsafe { libc::send(self.0, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            for (kind, code) in parse(&buf[..n as usize]) {
                match kind {
                    NLMSG_ERROR if code != 0 => return Err(io::Error::from_raw_os_error(-code)),
                    NLMSG_ERROR | NLMSG_DONE => return Ok(replies),
                    _ => replies.push(kind),
                }
            }
            if n == 0 {
                return Ok(replies);
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

const _: () = assert!(size_of::<libc::nlmsghdr>() == NLMSG_HDR);

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend(((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(payload);
        msg.resize(msg.len().next_multiple_of(4), 0);
        msg
    }

    #[test]
    fn replies_are_read_with_their_error_codes() {
        let buf = [
            message(RTM_NEWTFILTER, &[0; 22]),
            message(NLMSG_ERROR, &(-libc::EINVAL).to_ne_bytes()),
            message(NLMSG_DONE, &[0; 4]),
        ]
        .concat();
        assert_eq!(
            parse(&buf),
            [
                (RTM_NEWTFILTER, 0),
                (NLMSG_ERROR, -libc::EINVAL),
                (NLMSG_DONE, 0)
            ]
        );
        assert!(
            parse(&buf[..8]).is_empty(),
            "a truncated buffer yields nothing"
        );
    }

    #[test]
    fn the_qdisc_request_names_clsact() {
        let mut body = tcmsg(7, CLSACT_HANDLE, TC_H_CLSACT);
        body.extend(attribute(TCA_KIND, b"clsact\0"));
        assert_eq!(body.len(), TCMSG + 12);
        assert_eq!(&body[4..8], &7u32.to_ne_bytes());
        assert_eq!(&body[TCMSG..TCMSG + 2], &11u16.to_ne_bytes());
        assert_eq!(&body[TCMSG + 4..TCMSG + 11], b"clsact\0");
    }
}
