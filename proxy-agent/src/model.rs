//! The agent's description of the services it must serve, independent of where
//! it came from (a file today, the Kubernetes API next).

use std::net::Ipv4Addr;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
        }
    }
}

/// An address and port clients dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// A backend serving a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
}

/// One frontend of a service and the endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Service {
    /// For logs: `namespace/name:port` or any label.
    pub name: String,
    #[serde(flatten)]
    pub frontend: Frontend,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// The file format of `proxy-agent serve --services`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceFile {
    pub services: Vec<Service>,
}
