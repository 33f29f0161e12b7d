//! Ferry's node agent: from Kubernetes objects to eBPF maps, one folder per
//! stage of the data.
//!
//! - [`k8s`]: watches Services, EndpointSlices and this Node into stores, and
//!   turns them into [`frontend::FrontendSpec`]s as kube-proxy reads them
//!   (traffic policies, topology, terminating endpoints), recomputing only the
//!   Services that changed.
//! - [`desired`]: pure. Frontends become map contents (ids, slots, Maglev
//!   tables), and a diff against what the maps hold becomes ordered writes; the
//!   conntrack and NAT garbage-collection plan.
//! - [`kernel`]: the only stage that touches the kernel: loads and pins the
//!   programs and maps, attaches them to interfaces, reads and writes maps,
//!   cleans up.
//! - [`serve`]: what operators and load balancers query: /healthz, /livez,
//!   /metrics, latency histograms, healthCheckNodePorts.
//! - [`cli`]: `simulate` and `inspect`.
//! - `harness` (feature `harness`, on by default): the real programs in private
//!   maps, a frame through a hook; `simulate`, the packet tests and the benches
//!   share it.
//!
//! [`agent`] is the thin loop in between; [`frontend`] is the type the stages
//! hand each other; [`settings`] fills the defaults every caller shares and
//! builds the node settings; [`uplink`] chooses the node's uplinks.

pub mod agent;
pub mod cli;
pub mod desired;
pub mod frontend;
#[cfg(feature = "harness")]
pub mod harness;
pub mod k8s;
pub mod kernel;
pub mod serve;
pub mod settings;
pub mod uplink;
