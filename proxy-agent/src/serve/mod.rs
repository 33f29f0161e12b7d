//! What the agent serves to operators and load balancers: /healthz, /livez,
//! /metrics, /statusz and healthCheckNodePorts, over one small HTTP server.

pub mod health;
pub mod http;
pub mod latency;
pub mod metrics;
pub mod traffic;
