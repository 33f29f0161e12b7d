//! Indexes of the per-CPU statistics array: one counter per verdict and per drop
//! reason. The agent prints them by these names.

pub const PASS_NOT_IPV4: u32 = 0;
pub const PASS_NOT_TCP_UDP: u32 = 1;
pub const PASS_FRAGMENT: u32 = 2;
pub const PASS_NOT_SERVICE: u32 = 3;
pub const PASS_TRUNCATED_L4: u32 = 4;
pub const FWD_NEW: u32 = 5;
pub const FWD_ESTABLISHED: u32 = 6;
pub const REV_NAT: u32 = 7;
pub const PASS_NO_CONNTRACK: u32 = 8;
pub const REJECT_NO_BACKEND: u32 = 9;
pub const DROP_MALFORMED_IP: u32 = 10;
pub const DROP_NO_BACKEND_ENTRY: u32 = 11;
pub const DROP_CT_INSERT: u32 = 12;
pub const DROP_REWRITE: u32 = 13;
pub const DROP_REJECT_FAILED: u32 = 14;
pub const DROP_NO_REVNAT: u32 = 15;
pub const FWD_LOCAL: u32 = 16;
pub const FWD_SNAT: u32 = 17;
pub const REV_SNAT: u32 = 18;
pub const DROP_NO_LOCAL_BACKEND: u32 = 19;
pub const DROP_SOURCE_RANGE: u32 = 20;
pub const DROP_NAT_PORTS: u32 = 21;
pub const DROP_FIB: u32 = 22;
pub const PASS_NO_NEIGH: u32 = 23;
pub const FWD_HAIRPIN: u32 = 24;

/// Number of counters (the size of the stats array).
pub const COUNT: u32 = 25;

/// Name of each counter, by index.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ipv4",
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
];
