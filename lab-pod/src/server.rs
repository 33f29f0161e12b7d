//! The lab pods' server: every TCP connection and UDP datagram is answered with
//! `<pod name> <client address:port>\n`, so a test sees which backend a Service
//! chose and which client address reached it. A TCP connection stays open,
//! answered again on each read, for tests that hold established flows.
//!
//! It installs no signal handler: run as a container's PID 1 it ignores SIGTERM
//! and keeps serving through a pod's grace period (a Terminating endpoint still
//! serves) until the kubelet kills it.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

/// What the server says to `peer`: its IPv4 address as such, not as the
/// IPv4-mapped IPv6 address a dual-stack socket sees.
pub fn answer(name: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("{name} {peer}\n")
}

/// Serves `tcp` and `udp` until the TCP listener fails.
pub fn serve(name: &str, tcp: TcpListener, udp: UdpSocket) -> io::Result<()> {
    let udp_name = name.to_string();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(answer(&udp_name, peer).as_bytes(), peer);
        }
    });
    for stream in tcp.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_string();
        thread::spawn(move || converse(&name, stream));
    }
    Ok(())
}

/// Greets a TCP client, then answers each read until the client closes.
fn converse(name: &str, mut stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else { return };
    let reply = answer(name, peer);
    if stream.write_all(reply.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        net::Ipv4Addr,
        time::Duration,
    };

    use super::*;

    /// A server on loopback ports of the kernel's choice.
    fn start(name: &str) -> (SocketAddr, SocketAddr) {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addrs = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let name = name.to_string();
        thread::spawn(move || serve(&name, tcp, udp));
        addrs
    }

    #[test]
    fn tcp_greets_then_answers_each_line_on_the_same_connection() {
        let (tcp, _) = start("web-1");
        let stream = TcpStream::connect(tcp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let expected = format!("web-1 {}\n", stream.local_addr().unwrap());
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        for round in 0..3 {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, expected, "answer {round}");
            (&stream).write_all(b"again\n").unwrap();
        }
    }

    #[test]
    fn udp_answers_each_datagram_with_the_sender() {
        let (_, udp) = start("dns-1");
        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let expected = format!("dns-1 {}\n", client.local_addr().unwrap());
        for _ in 0..2 {
            client.send_to(b"?", udp).unwrap();
            let mut buf = [0u8; 128];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, udp);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), expected);
        }
    }
}
