//! SCTP endpoints in userspace, over raw IP sockets, for lab tests on
//! kernels built without SCTP (a raw socket takes IP protocol 132 whether or
//! not the kernel speaks it). Just enough of RFC 9260 for one association:
//! the four-way handshake with a state cookie, DATA and SACK, and the
//! three-chunk shutdown; no retransmission (the lab loses nothing).
//!
//! Both ends check the CRC32c of every packet they receive and count the bad
//! ones: a translation that changed a port without fixing the CRC shows there
//! (a kernel SCTP stack would drop the packet silently).

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const IPPROTO_SCTP: i32 = 132;

use proxy_common::sctp_chunk as chunk;

/// The State Cookie parameter of an INIT ACK.
const STATE_COOKIE: u16 = 7;
/// DATA flags: the first and the last fragment of a user message.
const DATA_WHOLE: u8 = 0x03;
const WINDOW: u32 = 1 << 16;
/// How long an endpoint waits for its peer's next packet.
const PATIENCE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub kind: u8,
    pub flags: u8,
    pub value: Vec<u8>,
}

impl Chunk {
    fn new(kind: u8, value: Vec<u8>) -> Self {
        Self {
            kind,
            flags: 0,
            value,
        }
    }
}

/// One SCTP packet as it arrived: the IP source, the common header and the
/// chunks.
#[derive(Clone, Debug)]
pub struct Packet {
    pub from: SocketAddrV4,
    pub dport: u16,
    pub vtag: u32,
    pub chunks: Vec<Chunk>,
}

impl Packet {
    fn first(&self) -> u8 {
        self.chunks.first().map_or(u8::MAX, |c| c.kind)
    }
}

/// The bytes of an SCTP packet, its CRC32c filled in.
pub fn encode(sport: u16, dport: u16, vtag: u32, chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&vtag.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for c in chunks {
        out.push(c.kind);
        out.push(c.flags);
        out.extend_from_slice(&(4 + c.value.len() as u16).to_be_bytes());
        out.extend_from_slice(&c.value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let crc = proxy_common::crc32c::checksum(&out);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What [`decode`] makes of an IPv4 packet carrying SCTP.
pub enum Decoded {
    Packet(Packet),
    /// A packet whose CRC32c does not match its bytes.
    BadCrc(SocketAddrV4),
    Malformed(String),
}

/// An IPv4 packet (as a raw socket reads it, header included) as SCTP.
pub fn decode(ip: &[u8]) -> Decoded {
    let malformed = |why: &str| Decoded::Malformed(format!("{why}: {ip:02x?}"));
    if ip.len() < 20 || ip[0] >> 4 != 4 || i32::from(ip[9]) != IPPROTO_SCTP {
        return malformed("not IPv4 SCTP");
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let sctp = &ip[usize::from(ip[0] & 0xf) * 4..];
    if sctp.len() < 12 {
        return malformed("short common header");
    }
    let sport = u16::from_be_bytes([sctp[0], sctp[1]]);
    let from = SocketAddrV4::new(src, sport);
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    let crc = u32::from_le_bytes(sctp[8..12].try_into().unwrap());
    if proxy_common::crc32c::checksum(&zeroed) != crc {
        return Decoded::BadCrc(from);
    }
    let mut chunks = Vec::new();
    let mut rest = &sctp[12..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if len < 4 || len > rest.len() {
            return malformed("chunk length");
        }
        chunks.push(Chunk {
            kind: rest[0],
            flags: rest[1],
            value: rest[4..len].to_vec(),
        });
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Decoded::Packet(Packet {
        from,
        dport: u16::from_be_bytes([sctp[2], sctp[3]]),
        vtag: u32::from_be_bytes(sctp[4..8].try_into().unwrap()),
        chunks,
    })
}

/// An SCTP endpoint on `port` of its network namespace's addresses (create
/// it on a thread inside that namespace).
pub struct Endpoint {
    sock: Socket,
    port: u16,
    /// Packets to `port` whose CRC32c was wrong, by sender.
    pub bad_crcs: Vec<SocketAddrV4>,
}

impl Endpoint {
    pub fn bind(port: u16) -> Self {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_SCTP)))
            .expect("a raw IPPROTO_SCTP socket");
        Self {
            sock,
            port,
            bad_crcs: Vec::new(),
        }
    }

    fn send(&self, to: SocketAddrV4, vtag: u32, chunks: &[Chunk]) {
        let bytes = encode(self.port, to.port(), vtag, chunks);
        self.sock
            .send_to(&bytes, &SockAddr::from(SocketAddrV4::new(*to.ip(), 0)))
            .unwrap_or_else(|e| panic!("send SCTP to {to}: {e}"));
    }

    /// The next SCTP packet to this endpoint's port (a raw socket sees every
    /// SCTP packet of its namespace).
    fn recv(&mut self) -> Packet {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("port {}: no SCTP packet in {PATIENCE:?}", self.port));
            self.sock.set_read_timeout(Some(left)).unwrap();
            let n = (&self.sock)
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("port {}: waiting for SCTP: {e}", self.port));
            match decode(&buf[..n]) {
                Decoded::Packet(p) if p.dport == self.port => return p,
                Decoded::Packet(_) => {}
                Decoded::BadCrc(from) => self.bad_crcs.push(from),
                Decoded::Malformed(why) => panic!("port {}: {why}", self.port),
            }
        }
    }

    /// The next packet, which must start with a chunk of `kind` and carry
    /// `vtag`.
    fn expect(&mut self, kind: u8, vtag: u32) -> Packet {
        let p = self.recv();
        assert_eq!(p.first(), kind, "chunk type, in {p:?}");
        assert_eq!(p.vtag, vtag, "verification tag, in {p:?}");
        p
    }
}

fn init_value(tag: u32, tsn: u32, params: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&WINDOW.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    v.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    v.extend_from_slice(&tsn.to_be_bytes());
    v.extend_from_slice(params);
    v
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

fn data(tsn: u32, ssn: u16, payload: &[u8]) -> Chunk {
    let mut v = Vec::new();
    v.extend_from_slice(&tsn.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes()); // stream 0
    v.extend_from_slice(&ssn.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes()); // payload protocol
    v.extend_from_slice(payload);
    Chunk {
        kind: chunk::DATA,
        flags: DATA_WHOLE,
        value: v,
    }
}

/// A DATA chunk's TSN and user message.
fn data_of(c: &Chunk) -> (u32, Vec<u8>) {
    assert_eq!(c.kind, chunk::DATA, "{c:?}");
    (be32(&c.value), c.value[12..].to_vec())
}

fn sack(cumulative: u32) -> Chunk {
    let mut v = cumulative.to_be_bytes().to_vec();
    v.extend_from_slice(&WINDOW.to_be_bytes());
    v.extend_from_slice(&[0; 4]); // no gap blocks, no duplicates
    Chunk::new(chunk::SACK, v)
}

/// What a server saw of the association it served.
#[derive(Debug)]
pub struct Served {
    /// The client's address and port as they arrived at the server.
    pub client: SocketAddrV4,
    pub messages: usize,
    pub bad_crcs: Vec<SocketAddrV4>,
}

/// Serves one association on `ep`: answers the handshake, echoes each
/// message, acknowledges and completes the client's shutdown.
pub fn serve_echo(mut ep: Endpoint) -> Served {
    const TAG: u32 = 0x5e4_7e4a;
    const TSN: u32 = 7_000;
    let init = ep.expect(chunk::INIT, 0);
    let client = init.from;
    let peer_tag = be32(&init.chunks[0].value);
    let cookie = b"ferry-lab-cookie".to_vec();
    let mut param = STATE_COOKIE.to_be_bytes().to_vec();
    param.extend_from_slice(&(4 + cookie.len() as u16).to_be_bytes());
    param.extend_from_slice(&cookie);
    ep.send(
        client,
        peer_tag,
        &[Chunk::new(chunk::INIT_ACK, init_value(TAG, TSN, &param))],
    );
    let echo = ep.expect(chunk::COOKIE_ECHO, TAG);
    assert_eq!(echo.chunks[0].value, cookie, "the cookie came back");
    assert_eq!(echo.from, client);
    ep.send(client, peer_tag, &[Chunk::new(chunk::COOKIE_ACK, vec![])]);

    let mut tsn = TSN;
    let mut ssn = 0u16;
    let mut messages = 0;
    loop {
        let p = ep.recv();
        assert_eq!(p.vtag, TAG, "{p:?}");
        assert_eq!(p.from, client, "one client for the association");
        match p.first() {
            chunk::DATA => {
                let (their_tsn, message) = data_of(&p.chunks[0]);
                ep.send(
                    client,
                    peer_tag,
                    &[sack(their_tsn), data(tsn, ssn, &message)],
                );
                tsn += 1;
                ssn += 1;
                messages += 1;
            }
            // The client's acknowledgement of an echo.
            chunk::SACK => {}
            chunk::SHUTDOWN => {
                ep.send(client, peer_tag, &[Chunk::new(chunk::SHUTDOWN_ACK, vec![])]);
                ep.expect(chunk::SHUTDOWN_COMPLETE, TAG);
                break;
            }
            other => panic!("server: unexpected chunk {other} in {p:?}"),
        }
    }
    Served {
        client,
        messages,
        bad_crcs: ep.bad_crcs,
    }
}

/// What a client saw of its association.
#[derive(Debug)]
pub struct Echoed {
    /// Where every packet of the association came from (one address).
    pub from: SocketAddrV4,
    pub answers: Vec<Vec<u8>>,
    pub bad_crcs: Vec<SocketAddrV4>,
}

/// Opens an association from `ep` to `server`, sends each of `messages`
/// and waits for its echo, and shuts the association down. `between` runs
/// while the association is established, after the last echo.
pub fn echo(
    mut ep: Endpoint,
    server: SocketAddrV4,
    messages: &[Vec<u8>],
    between: impl FnOnce(),
) -> Echoed {
    const TAG: u32 = 0xc11e_0001;
    const TSN: u32 = 1_000;
    ep.send(
        server,
        0,
        &[Chunk::new(chunk::INIT, init_value(TAG, TSN, &[]))],
    );
    let ack = ep.expect(chunk::INIT_ACK, TAG);
    let from = ack.from;
    let value = &ack.chunks[0].value;
    let peer_tag = be32(value);
    let mut peer_tsn = be32(&value[12..]);
    let mut params = &value[16..];
    let mut cookie = None;
    while params.len() >= 4 {
        let kind = u16::from_be_bytes([params[0], params[1]]);
        let len = usize::from(u16::from_be_bytes([params[2], params[3]]));
        if kind == STATE_COOKIE {
            cookie = Some(params[4..len].to_vec());
        }
        params = &params[len.next_multiple_of(4).min(params.len())..];
    }
    let cookie = cookie.expect("the INIT ACK carries a state cookie");
    ep.send(server, peer_tag, &[Chunk::new(chunk::COOKIE_ECHO, cookie)]);
    ep.expect(chunk::COOKIE_ACK, TAG);

    let mut answers = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let tsn = TSN + i as u32;
        ep.send(server, peer_tag, &[data(tsn, i as u16, message)]);
        let p = ep.expect(chunk::SACK, TAG);
        assert_eq!(p.from, from, "{p:?}");
        assert_eq!(be32(&p.chunks[0].value), tsn, "the SACK acknowledges {tsn}");
        let (their_tsn, answer) = data_of(p.chunks.get(1).expect("the echo is bundled"));
        assert_eq!(their_tsn, peer_tsn);
        ep.send(server, peer_tag, &[sack(their_tsn)]);
        peer_tsn += 1;
        answers.push(answer);
    }
    between();
    let last = TSN.wrapping_add(messages.len() as u32).wrapping_sub(1);
    ep.send(
        server,
        peer_tag,
        &[Chunk::new(chunk::SHUTDOWN, last.to_be_bytes().to_vec())],
    );
    let p = ep.expect(chunk::SHUTDOWN_ACK, TAG);
    assert_eq!(p.from, from);
    ep.send(
        server,
        peer_tag,
        &[Chunk::new(chunk::SHUTDOWN_COMPLETE, vec![])],
    );
    Echoed {
        from,
        answers,
        bad_crcs: ep.bad_crcs,
    }
}
