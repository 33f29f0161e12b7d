//! What the agent serves to operators and load balancers: /healthz, /livez,
//! /metrics (with its latency histograms) and healthCheckNodePorts.

pub mod health;
pub mod latency;
