//! The per-CPU statistics counters: one per verdict and per drop reason. Each
//! counter's index in the `stats_v1` array and its printed name are written
//! once, in the table below; the programs count under a `Stat`, the agent
//! prints `Stat::name`.

/// Defines `Stat` from one table of (variant, index, name), so that an index
/// and its name can never drift apart.
macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal,)*) => {
        /// A statistics counter: its discriminant is its index in the `stats_v1`
        /// per-CPU array, so existing indexes must never change.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[$doc])* $variant = $index,)*
        }

        impl Stat {
            /// Every counter, by index.
            pub const ALL: [Stat; COUNT as usize] = [$(Stat::$variant,)*];

            /// The counter's name, as the agent prints it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }
        }
    };
}

stats! {
    PassNotIp = 0 => "pass_not_ip",
    PassNotTcpUdp = 1 => "pass_not_tcp_udp",
    PassFragment = 2 => "pass_fragment",
    PassNotService = 3 => "pass_not_service",
    PassTruncatedL4 = 4 => "pass_truncated_l4",
    FwdNew = 5 => "fwd_new",
    FwdEstablished = 6 => "fwd_established",
    RevNat = 7 => "rev_nat",
    PassNoConntrack = 8 => "pass_no_conntrack",
    RejectNoBackend = 9 => "reject_no_backend",
    DropMalformedIp = 10 => "drop_malformed_ip",
    DropNoBackendEntry = 11 => "drop_no_backend_entry",
    DropCtInsert = 12 => "drop_ct_insert",
    DropRewrite = 13 => "drop_rewrite",
    DropRejectFailed = 14 => "drop_reject_failed",
    DropNoRevnat = 15 => "drop_no_revnat",
    FwdLocal = 16 => "fwd_local",
    FwdSnat = 17 => "fwd_snat",
    RevSnat = 18 => "rev_snat",
    DropNoLocalBackend = 19 => "drop_no_local_backend",
    DropSourceRange = 20 => "drop_source_range",
    /// A new flow found no port: none of the NAT ports towards its remote
    /// backend, or (for a flow whose client tuple another frontend's flow
    /// holds at its backend) none of the remapped client ports it tries.
    DropNatPorts = 21 => "drop_nat_ports",
    DropFib = 22 => "drop_fib",
    PassNoNeigh = 23 => "pass_no_neigh",
    FwdHairpin = 24 => "fwd_hairpin",
    /// A TCP packet other than a SYN found no conntrack entry and started
    /// one (scheduled as a new flow): its entry was evicted from a full
    /// conntrack map, or its connection began before Ferry served it.
    FwdNewMidFlow = 25 => "fwd_new_mid_flow",
    /// An IPv6 packet XDP handed to the tc program behind it, which serves
    /// the uplink's IPv6 frontends.
    PassIpv6ToTc = 26 => "pass_ipv6_to_tc",
    /// The per-CPU scratch slot could not be had (a per-CPU array always
    /// has it: counted rather than assumed).
    DropScratch = 27 => "drop_scratch",
    /// An ICMP (ICMPv6) error about a translated flow (a backend's side of
    /// a DNATed flow, or a SNATed flow's node port), translated back for
    /// its client: outer and quoted headers (see the programs' `icmp`).
    RevNatIcmp = 28 => "rev_nat_icmp",
    /// A new flow (TCP SYN, or UDP) to an address in the node's service
    /// CIDRs that no frontend serves: an unallocated ClusterIP, or a port
    /// its ClusterIP does not serve. Refused with an ICMP port unreachable.
    RejectNoService = 29 => "reject_no_service",
    /// An SCTP packet XDP handed to the tc program behind it, which serves
    /// SCTP on the uplink (its checksum's fix would not fit XDP's program
    /// within the verifier's budget).
    PassSctpToTc = 30 => "pass_sctp_to_tc",
}

/// Number of counters (the size of the stats array).
pub const COUNT: u32 = 31;

impl Stat {
    /// The counter's index in the stats array.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A reject: the packet turned into an ICMP error to its client.
    #[inline(always)]
    pub const fn is_reject(self) -> bool {
        matches!(self, Stat::RejectNoBackend | Stat::RejectNoService)
    }

    /// A packet the programs translated and sent on (the `fwd_` and `rev_`
    /// verdicts): what a monitor that asks for traces is shown.
    #[inline(always)]
    pub const fn is_translation(self) -> bool {
        matches!(
            self,
            Stat::FwdNew
                | Stat::FwdEstablished
                | Stat::FwdNewMidFlow
                | Stat::FwdLocal
                | Stat::FwdSnat
                | Stat::FwdHairpin
                | Stat::RevNat
                | Stat::RevSnat
                | Stat::RevNatIcmp
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translations_are_the_fwd_and_rev_verdicts() {
        for stat in Stat::ALL {
            let name = stat.name();
            assert_eq!(
                stat.is_translation(),
                name.starts_with("fwd_") || name.starts_with("rev_"),
                "{name}"
            );
        }
    }

    #[test]
    fn every_index_once_in_order() {
        for (index, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, index, "{stat:?}");
        }
    }

    #[test]
    fn rejects_are_the_reject_counters() {
        for stat in Stat::ALL {
            assert_eq!(
                stat.is_reject(),
                stat.name().starts_with("reject_"),
                "{}",
                stat.name()
            );
        }
    }

    /// The indexes and names as they were before the enum: a pinned `stats_v1`
    /// array and every reader of it depend on them.
    #[test]
    fn indexes_and_names_unchanged() {
        let names: [&str; COUNT as usize] = [
            "pass_not_ip",
            "pass_not_tcp_udp",
            "pass_fragment",
            "pass_not_service",
            "pass_truncated_l4",
            "fwd_new",
            "fwd_established",
            "rev_nat",
            "pass_no_conntrack",
            "reject_no_backend",
            "drop_malformed_ip",
            "drop_no_backend_entry",
            "drop_ct_insert",
            "drop_rewrite",
            "drop_reject_failed",
            "drop_no_revnat",
            "fwd_local",
            "fwd_snat",
            "rev_snat",
            "drop_no_local_backend",
            "drop_source_range",
            "drop_nat_ports",
            "drop_fib",
            "pass_no_neigh",
            "fwd_hairpin",
            "fwd_new_mid_flow",
            "pass_ipv6_to_tc",
            "drop_scratch",
            "rev_nat_icmp",
            "reject_no_service",
            "pass_sctp_to_tc",
        ];
        let now: [&str; COUNT as usize] = Stat::ALL.map(Stat::name);
        assert_eq!(now, names);
    }
}
