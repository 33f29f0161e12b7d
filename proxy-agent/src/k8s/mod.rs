//! Stage 1: Kubernetes objects in, frontends out. The client and the watches
//! (the only API I/O), EndpointSlice and Node parsing, kube-proxy's topology
//! rules, and the cache that recomputes only the Services a change touched.

pub mod cache;
pub mod client;
pub mod frontends;
pub mod manifests;
pub mod nodes;
pub mod services;
pub mod slices;
pub mod topology;
pub mod watch;
