//! The rule sets kube-proxy writes for ClusterIP and NodePort Services, in its iptables mode
//! (`iptables-restore` input) and its nftables mode (`nft -f` input), so that the
//! benchmarks can load them into a namespace and compare Ferry with them on the
//! same traffic. The shapes follow kube-proxy's own expected-output tests
//! (pkg/proxy/iptables and pkg/proxy/nftables proxier_test.go): a jump per
//! Service port in KUBE-SERVICES, a KUBE-SVC chain choosing an endpoint with
//! `statistic --mode random`, a KUBE-SEP chain per endpoint with the DNAT; and in
//! nftables one verdict map from (address, protocol, port) to a per-Service chain
//! choosing an endpoint chain with `numgen random`. A NodePort adds an
//! external chain (KUBE-EXT; nftables `external-`) that marks the packet for
//! masquerading and goes on to the Service's chain. Pure text: no I/O here.

use std::{fmt::Write, net::Ipv4Addr};

/// The pod network, as kube-proxy's `--cluster-cidr`: traffic from outside it is
/// masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service network (nftables mode drops traffic to unallocated ClusterIPs).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A service port's protocol, as the rules name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One Service with one port, as the rule generators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name`, as kube-proxy names a service port.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// The port's NodePort, if it has one.
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// `count` Services `bench/svc-N:http` on 10.96.0.0/16 (from 10.96.0.1), TCP
/// port 80, each with the given endpoints.
pub fn services(count: u32, endpoints: &[(Ipv4Addr, u16)]) -> Vec<ServicePort> {
    assert!(count < 65_000, "the service network holds fewer addresses");
    (0..count)
        .map(|i| ServicePort {
            name: format!("bench/svc-{i}:http"),
            vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: None,
            endpoints: endpoints.to_vec(),
        })
        .collect()
}

/// A stable 16-character chain suffix for `key`. kube-proxy takes base32 of a
/// SHA-256; any stable hash of the same length gives chains of the same shape.
fn chain_id(key: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in key.bytes() {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| ALPHABET[((hash >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// A Service port's chain in `table` (`SVC`, or `EXT` for its NodePort):
/// kube-proxy names both with the same hash of the port.
fn service_chain(table: &str, svc: &ServicePort) -> String {
    let id = chain_id(&format!("{}{}", svc.name, svc.protocol.name()));
    format!("KUBE-{table}-{id}")
}

fn svc_chain(svc: &ServicePort) -> String {
    service_chain("SVC", svc)
}

fn ext_chain(svc: &ServicePort) -> String {
    service_chain("EXT", svc)
}

fn sep_chain(svc: &ServicePort, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_id(&format!(
            "{}{}{}:{}",
            svc.name,
            svc.protocol.name(),
            ep.0,
            ep.1
        ))
    )
}

/// The KUBE-SVC and KUBE-SEP chains of one Service, their declarations and rules.
fn iptables_service(svc: &ServicePort, chains: &mut String, rules: &mut String) {
    let svc_chain = svc_chain(svc);
    let (vip, port, name, p) = (svc.vip, svc.port, &svc.name, svc.protocol.name());
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {vip} --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
    );
    if let Some(node_port) = svc.node_port {
        let ext = ext_chain(svc);
        let _ = writeln!(chains, ":{ext} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {node_port} -j {ext}"
        );
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(rules, "-A {ext} -j {svc_chain}");
    }
    let n = svc.endpoints.len();
    for (i, &ep) in svc.endpoints.iter().enumerate() {
        let sep = sep_chain(svc, ep);
        let statistic = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} -> {}:{}\"{statistic} -j {sep}",
            ep.0, ep.1
        );
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

fn iptables_service_jump(svc: &ServicePort) -> String {
    let p = svc.protocol.name();
    format!(
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {} --dport {} -j {}\n",
        svc.name,
        svc.vip,
        svc.port,
        svc_chain(svc)
    )
}

const IPTABLES_NODEPORTS_JUMP: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// kube-proxy's own filter chains and their fixed rules (declaring a chain in
/// `iptables-restore` input flushes it, so every sync writes them again).
const IPTABLES_FILTER: &str = ":KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
     :KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
     -A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
     -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
     -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
     -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";

/// The jumps into kube-proxy's filter chains, which it installs once in the
/// built-in chains.
const IPTABLES_FILTER_JUMPS: &str = ":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A INPUT -j KUBE-FIREWALL\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -j KUBE-FIREWALL\n";

/// kube-proxy's own nat chains and their fixed rules.
const IPTABLES_NAT: &str = ":KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
     -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
     -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
     -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
     -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";

/// The jumps into kube-proxy's nat chains from the built-in ones.
const IPTABLES_NAT_JUMPS: &str = ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";

/// An `iptables-restore` file: the filter table, then the nat table with the
/// Services' jumps (in KUBE-SERVICES, before the node-ports jump, which must
/// stay last) and their chains. `with_jumps` adds the built-in chains' jumps,
/// for a load into an empty namespace.
fn iptables_file(with_jumps: bool, jumps: &[&ServicePort], chains: &str, rules: &str) -> String {
    let (filter_jumps, nat_jumps) = if with_jumps {
        (IPTABLES_FILTER_JUMPS, IPTABLES_NAT_JUMPS)
    } else {
        ("", "")
    };
    let mut out =
        format!("*filter\n{IPTABLES_FILTER}{filter_jumps}COMMIT\n*nat\n{IPTABLES_NAT}{nat_jumps}");
    out.push_str(chains);
    for svc in jumps {
        out.push_str(&iptables_service_jump(svc));
    }
    out.push_str(IPTABLES_NODEPORTS_JUMP);
    out.push_str(rules);
    out.push_str("COMMIT\n");
    out
}

/// The whole rule set for `iptables-restore` (no `--noflush`): kube-proxy's filter
/// and nat chains, the jumps into them from the built-in chains, and every Service.
pub fn iptables_full(services: &[ServicePort]) -> String {
    let (mut chains, mut rules) = (String::new(), String::new());
    for svc in services {
        iptables_service(svc, &mut chains, &mut rules);
    }
    let all: Vec<&ServicePort> = services.iter().collect();
    iptables_file(true, &all, &chains, &rules)
}

/// What kube-proxy's iptables mode writes (with `iptables-restore --noflush`) in a
/// partial sync after one Service's endpoints changed from `before` to `after`:
/// KUBE-SERVICES whole (declaring a chain flushes it), the changed Service's
/// chains rewritten, and the chains of departed endpoints deleted.
pub fn iptables_one_service_change(
    services: &[ServicePort],
    before: &ServicePort,
    after: &ServicePort,
) -> String {
    let (mut chains, mut rules) = (String::new(), String::new());
    iptables_service(after, &mut chains, &mut rules);
    for &ep in &before.endpoints {
        if !after.endpoints.contains(&ep) {
            let _ = writeln!(chains, ":{} - [0:0]", sep_chain(before, ep));
            let _ = writeln!(rules, "-X {}", sep_chain(before, ep));
        }
    }
    let all: Vec<&ServicePort> = services.iter().collect();
    iptables_file(false, &all, &chains, &rules)
}

const NFT_BASE: &str = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { SERVICE_CIDR } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#;

/// `namespace/name/tcp/port-name`, kube-proxy's nftables name of a service port.
fn nft_port_name(svc: &ServicePort) -> String {
    let (ns_name, port) = svc.name.split_once(':').unwrap_or((&svc.name, ""));
    format!("{ns_name}/{}/{port}", svc.protocol.name())
}

/// A Service port's chain behind `prefix` (`service`, or `external` for
/// its NodePort): kube-proxy names both from the same base.
fn nft_chain(prefix: &str, svc: &ServicePort) -> String {
    let name = nft_port_name(svc);
    format!("{prefix}-{}-{name}", &chain_id(&name)[..8])
}

fn nft_service_chain(svc: &ServicePort) -> String {
    nft_chain("service", svc)
}

fn nft_external_chain(svc: &ServicePort) -> String {
    nft_chain("external", svc)
}

fn nft_endpoint_chain(svc: &ServicePort, ep: (Ipv4Addr, u16)) -> String {
    let name = format!("{}__{}/{}", nft_port_name(svc), ep.0, ep.1);
    format!("endpoint-{}-{name}", &chain_id(&name)[..8])
}

/// The service chain's rules (its chain must exist): masquerade what does not come
/// from a pod, then pick an endpoint chain at random.
fn nft_service_rules(svc: &ServicePort, out: &mut String) {
    let chain = nft_service_chain(svc);
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.vip
    );
    let targets: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, &ep)| format!("{i} : goto {}", nft_endpoint_chain(svc, ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        targets.join(" , ")
    );
}

fn nft_endpoint(svc: &ServicePort, ep: (Ipv4Addr, u16), out: &mut String) {
    let chain = nft_endpoint_chain(svc, ep);
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade",
        ep.0
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} meta l4proto {} dnat to {}:{}",
        svc.protocol.name(),
        ep.0,
        ep.1
    );
}

/// The whole rule set for `nft -f` into a namespace without a kube-proxy table;
/// NodePorts answer on `node_ips` (kube-proxy's `--nodeport-addresses`).
pub fn nft_full(services: &[ServicePort], node_ips: &[Ipv4Addr]) -> String {
    let mut out = NFT_BASE.replace("SERVICE_CIDR", SERVICE_CIDR);
    for ip in node_ips {
        let _ = writeln!(out, "add element ip kube-proxy nodeport-ips {{ {ip} }}");
    }
    for svc in services {
        // Endpoint chains first: the service chain's verdict map names them.
        for &ep in &svc.endpoints {
            nft_endpoint(svc, ep, &mut out);
        }
        let _ = writeln!(out, "add chain ip kube-proxy {}", nft_service_chain(svc));
        nft_service_rules(svc, &mut out);
        let _ = writeln!(
            out,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            svc.vip
        );
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {} }}",
            svc.vip,
            svc.protocol.name(),
            svc.port,
            nft_service_chain(svc)
        );
        if let Some(node_port) = svc.node_port {
            let external = nft_external_chain(svc);
            let _ = writeln!(out, "add chain ip kube-proxy {external}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {external} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {external} goto {}",
                nft_service_chain(svc)
            );
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-nodeports {{ {} . {node_port} : goto {external} }}",
                svc.protocol.name()
            );
        }
    }
    out
}

/// The transaction kube-proxy's nftables mode sends when one Service's endpoints
/// changed from `before` to `after`: new endpoint chains, the service chain
/// flushed and refilled, departed endpoint chains flushed and deleted.
pub fn nft_one_service_change(before: &ServicePort, after: &ServicePort) -> String {
    let mut out = String::new();
    for &ep in &after.endpoints {
        if !before.endpoints.contains(&ep) {
            nft_endpoint(after, ep, &mut out);
        }
    }
    let _ = writeln!(
        out,
        "flush chain ip kube-proxy {}",
        nft_service_chain(after)
    );
    nft_service_rules(after, &mut out);
    for &ep in &before.endpoints {
        if !after.endpoints.contains(&ep) {
            let chain = nft_endpoint_chain(before, ep);
            let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
            let _ = writeln!(out, "delete chain ip kube-proxy {chain}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_endpoints() -> Vec<(Ipv4Addr, u16)> {
        vec![
            (Ipv4Addr::new(10, 244, 2, 10), 8080),
            (Ipv4Addr::new(10, 244, 2, 11), 8080),
        ]
    }

    #[test]
    fn services_are_numbered_from_the_first_service_address() {
        let s = services(3, &two_endpoints());
        assert_eq!(s[0].vip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(s[2].vip, Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(s[1].name, "bench/svc-1:http");
    }

    #[test]
    fn chain_names_are_stable_distinct_and_kube_proxy_sized() {
        let s = services(2, &two_endpoints());
        assert_eq!(svc_chain(&s[0]), svc_chain(&s[0].clone()));
        assert_ne!(svc_chain(&s[0]), svc_chain(&s[1]));
        assert_eq!(svc_chain(&s[0]).len(), "KUBE-SVC-".len() + 16);
        // iptables keeps chain names under 29 characters.
        assert!(sep_chain(&s[0], s[0].endpoints[0]).len() <= 28);
    }

    #[test]
    fn iptables_service_chain_is_kube_proxys() {
        let s = &services(1, &two_endpoints())[0];
        let text = iptables_full(std::slice::from_ref(s));
        let svc = svc_chain(s);
        let sep0 = sep_chain(s, s.endpoints[0]);
        let sep1 = sep_chain(s, s.endpoints[1]);
        for line in [
            format!("-A KUBE-SERVICES -m comment --comment \"bench/svc-0:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j {svc}"),
            format!("-A {svc} -m comment --comment \"bench/svc-0:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"),
            format!("-A {svc} -m comment --comment \"bench/svc-0:http -> 10.244.2.10:8080\" -m statistic --mode random --probability 0.5000000000 -j {sep0}"),
            format!("-A {svc} -m comment --comment \"bench/svc-0:http -> 10.244.2.11:8080\" -j {sep1}"),
            format!("-A {sep1} -m comment --comment bench/svc-0:http -s 10.244.2.11 -j KUBE-MARK-MASQ"),
            format!("-A {sep1} -m comment --comment bench/svc-0:http -m tcp -p tcp -j DNAT --to-destination 10.244.2.11:8080"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        // The node-ports jump stays the last rule of KUBE-SERVICES.
        let jumps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert!(jumps.last().unwrap().ends_with("-j KUBE-NODEPORTS"));
        assert_eq!(text.matches("COMMIT").count(), 2);
    }

    #[test]
    fn iptables_probabilities_spread_evenly_over_ten_endpoints() {
        let eps: Vec<_> = (0..10)
            .map(|i| (Ipv4Addr::new(10, 244, 2, 10 + i), 8080))
            .collect();
        let text = iptables_full(&services(1, &eps));
        let probabilities: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            probabilities.len(),
            9,
            "the last endpoint takes what is left"
        );
        assert_eq!(probabilities[0], "0.1000000000");
        assert_eq!(probabilities[8], "0.5000000000");
    }

    #[test]
    fn iptables_change_rewrites_one_service_and_deletes_the_departed_endpoint() {
        let all = services(3, &two_endpoints());
        let mut after = all[1].clone();
        after.endpoints[1] = (Ipv4Addr::new(10, 244, 2, 12), 8080);
        let text = iptables_one_service_change(&all, &all[1], &after);
        // Every Service keeps its jump; only the changed one has its chains here.
        assert_eq!(text.matches("-A KUBE-SERVICES").count(), 4);
        assert!(text.contains(&format!(":{} - [0:0]", svc_chain(&after))));
        assert!(text.contains(&format!("-X {}", sep_chain(&all[1], all[1].endpoints[1]))));
        assert!(text.contains("--to-destination 10.244.2.12:8080"));
        assert!(!text.contains(&format!(":{} ", svc_chain(&all[0]))));
    }

    #[test]
    fn nft_rules_are_kube_proxys() {
        let s = &services(1, &two_endpoints())[0];
        let text = nft_full(std::slice::from_ref(s), &[]);
        let chain = nft_service_chain(s);
        let ep0 = nft_endpoint_chain(s, s.endpoints[0]);
        let ep1 = nft_endpoint_chain(s, s.endpoints[1]);
        assert!(chain.starts_with("service-") && chain.ends_with("-bench/svc-0/tcp/http"));
        assert!(ep1.ends_with("-bench/svc-0/tcp/http__10.244.2.11/8080"));
        for line in [
            format!("add rule ip kube-proxy {chain} ip daddr 10.96.0.1 ip saddr != 10.244.0.0/16 jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {chain} numgen random mod 2 vmap {{ 0 : goto {ep0} , 1 : goto {ep1} }}"),
            format!("add rule ip kube-proxy {ep1} ip saddr 10.244.2.11 jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {ep1} meta l4proto tcp dnat to 10.244.2.11:8080"),
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto ".to_string() + &chain + " }",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        // Endpoint chains exist before the verdict map that names them.
        let first_use = text.find(&format!("goto {ep0}")).unwrap();
        assert!(
            text.find(&format!("add chain ip kube-proxy {ep0}"))
                .unwrap()
                < first_use
        );
    }

    fn udp_node_port() -> ServicePort {
        ServicePort {
            name: "bench/np:dns".into(),
            vip: Ipv4Addr::new(10, 96, 0, 9),
            port: 53,
            protocol: Protocol::Udp,
            node_port: Some(30053),
            endpoints: two_endpoints(),
        }
    }

    #[test]
    fn iptables_node_port_goes_through_its_external_chain() {
        let s = udp_node_port();
        let text = iptables_full(std::slice::from_ref(&s));
        let (svc, ext) = (svc_chain(&s), ext_chain(&s));
        assert_eq!(svc["KUBE-SVC-".len()..], ext["KUBE-EXT-".len()..]);
        for line in [
            format!(":{ext} - [0:0]"),
            format!("-A KUBE-NODEPORTS -m comment --comment bench/np:dns -m udp -p udp --dport 30053 -j {ext}"),
            format!("-A {ext} -m comment --comment \"masquerade traffic for bench/np:dns external destinations\" -j KUBE-MARK-MASQ"),
            format!("-A {ext} -j {svc}"),
            format!("-A KUBE-SERVICES -m comment --comment \"bench/np:dns cluster IP\" -m udp -p udp -d 10.96.0.9 --dport 53 -j {svc}"),
            format!("-A {} -m comment --comment bench/np:dns -m udp -p udp -j DNAT --to-destination 10.244.2.11:8080", sep_chain(&s, s.endpoints[1])),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        assert!(!text.contains("-p tcp -j DNAT"));
    }

    #[test]
    fn nft_node_port_is_an_element_of_the_node_port_map() {
        let s = udp_node_port();
        let text = nft_full(std::slice::from_ref(&s), &[Ipv4Addr::new(172, 30, 1, 1)]);
        let (chain, external) = (nft_service_chain(&s), nft_external_chain(&s));
        assert!(external.starts_with("external-") && external.ends_with("-bench/np/udp/dns"));
        for line in [
            "add element ip kube-proxy nodeport-ips { 172.30.1.1 }".to_string(),
            format!("add chain ip kube-proxy {external}"),
            format!("add rule ip kube-proxy {external} jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {external} goto {chain}"),
            format!(
                "add element ip kube-proxy service-nodeports {{ udp . 30053 : goto {external} }}"
            ),
            format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.9 . udp . 53 : goto {chain} }}"
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        // The service chain exists before the external chain names it.
        assert!(
            text.find(&format!("add chain ip kube-proxy {chain}"))
                .unwrap()
                < text.find(&format!("goto {chain}")).unwrap()
        );
    }

    #[test]
    fn nft_change_adds_new_chains_before_use_and_deletes_departed_ones_after() {
        let before = services(1, &two_endpoints()).remove(0);
        let mut after = before.clone();
        after.endpoints[1] = (Ipv4Addr::new(10, 244, 2, 12), 8080);
        let text = nft_one_service_change(&before, &after);
        let new_chain = nft_endpoint_chain(&after, after.endpoints[1]);
        let old_chain = nft_endpoint_chain(&before, before.endpoints[1]);
        let added = text
            .find(&format!("add chain ip kube-proxy {new_chain}"))
            .unwrap();
        let flushed = text
            .find(&format!(
                "flush chain ip kube-proxy {}",
                nft_service_chain(&after)
            ))
            .unwrap();
        let deleted = text
            .find(&format!("delete chain ip kube-proxy {old_chain}"))
            .unwrap();
        assert!(added < flushed && flushed < deleted);
        // The unchanged endpoint's chain is left alone.
        let kept = nft_endpoint_chain(&before, before.endpoints[0]);
        assert!(!text.contains(&format!("add chain ip kube-proxy {kept}")));
        assert!(!text.contains(&format!("delete chain ip kube-proxy {kept}")));
    }
}
