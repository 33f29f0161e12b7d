//! Packets and bytes per Service and per backend, from the programs'
//! per-(frontend, backend) counters (`traffic_v1`, see the programs'
//! `traffic`): which Service each frontend id belongs to, which address
//! each backend id is, and the counts of pairs whose entries are gone, so
//! that a counter never goes back when a backend or a frontend leaves.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use proxy_common::{Traffic, TrafficKey};

/// The Service a frontend's name belongs to: `namespace/name` of
/// `namespace/name:port (what address)`; a services file's label up to
/// its first ` (`.
pub fn service_of(frontend_name: &str) -> &str {
    let base = frontend_name.split(" (").next().unwrap_or(frontend_name);
    match base.rsplit_once(':') {
        Some((service, port)) if service.contains('/') && !port.contains('/') => service,
        _ => base,
    }
}

fn add(sum: &mut Traffic, t: &Traffic) {
    sum.to_backend_packets += t.to_backend_packets;
    sum.to_backend_bytes += t.to_backend_bytes;
    sum.to_client_packets += t.to_client_packets;
    sum.to_client_bytes += t.to_client_bytes;
}

/// What the counters' ids stand for, and what pairs gone from the map had
/// counted.
#[derive(Debug, Default)]
pub struct Book {
    services: HashMap<u32, Arc<str>>,
    backends: HashMap<u32, Arc<str>>,
    retired_services: BTreeMap<Arc<str>, Traffic>,
    retired_backends: BTreeMap<Arc<str>, Traffic>,
    /// Serve per-backend series too (one per backend the node sends to).
    pub per_backend: bool,
}

impl Book {
    /// Frontend `id` belongs to Service `service`.
    pub fn name_frontend(&mut self, id: u32, service: &str) {
        if self.services.get(&id).is_none_or(|s| &**s != service) {
            self.services.insert(id, service.into());
        }
    }

    /// Backend `id` is `backend` (`address:port/PROTOCOL`).
    pub fn name_backend(&mut self, id: u32, backend: &str) {
        if self.backends.get(&id).is_none_or(|b| &**b != backend) {
            self.backends.insert(id, backend.into());
        }
    }

    /// `gone` were removed from the map with these counts: they stay in
    /// the totals. Ids `live_frontend`/`live_backend` refuse lose their
    /// names (their pairs are all gone now).
    pub fn retire(
        &mut self,
        gone: &[(TrafficKey, Traffic)],
        live_frontend: impl Fn(u32) -> bool,
        live_backend: impl Fn(u32) -> bool,
    ) {
        for (key, counts) in gone {
            if let Some(service) = self.services.get(&key.rev_nat_id) {
                add(
                    self.retired_services.entry(service.clone()).or_default(),
                    counts,
                );
            }
            if let Some(backend) = self.backends.get(&key.backend_id) {
                add(
                    self.retired_backends.entry(backend.clone()).or_default(),
                    counts,
                );
            }
        }
        self.services.retain(|id, _| live_frontend(*id));
        self.backends.retain(|id, _| live_backend(*id));
    }

    /// The totals by Service and by backend, with the map's pairs `live`.
    /// A pair whose ids have no name yet (programmed a moment ago) waits
    /// for the next scrape.
    pub fn totals(
        &self,
        live: &[(TrafficKey, Traffic)],
    ) -> (BTreeMap<Arc<str>, Traffic>, BTreeMap<Arc<str>, Traffic>) {
        let mut services = self.retired_services.clone();
        let mut backends = self.retired_backends.clone();
        for (key, counts) in live {
            if let Some(service) = self.services.get(&key.rev_nat_id) {
                add(services.entry(service.clone()).or_default(), counts);
            }
            if let Some(backend) = self.backends.get(&key.backend_id) {
                add(backends.entry(backend.clone()).or_default(), counts);
            }
        }
        (services, backends)
    }
}

/// Serves the totals at each scrape, reading the pinned map.
#[derive(Debug)]
pub struct TrafficCollector {
    pub pin_dir: PathBuf,
    pub book: Arc<Mutex<Book>>,
}

impl Collector for TrafficCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Unreadable (the maps are being replaced): this scrape goes without.
        let Ok(live) = proxy_common::pinned::Pinned::new(&self.pin_dir).traffic() else {
            return Ok(());
        };
        let book = self.book.lock().unwrap();
        let (services, backends) = book.totals(&live);
        let mut families = vec![("service", "Service", services)];
        if book.per_backend {
            families.push(("backend", "backend", backends));
        }
        drop(book);
        for (label, what, totals) in families {
            type Value = fn(&Traffic) -> [u64; 2];
            let rows: [(&str, &str, Value); 2] = [
                ("packets", "Packets", |t| {
                    [t.to_backend_packets, t.to_client_packets]
                }),
                (
                    "bytes",
                    "Bytes (as each packet arrived, Ethernet header included)",
                    |t| [t.to_backend_bytes, t.to_client_bytes],
                ),
            ];
            for (unit, help, value) in rows {
                let name = format!("{label}_{unit}");
                let help = format!(
                    "{help} the programs translated, by {what} and direction (to_backend: the client's; to_client: the replies)"
                );
                let mut family =
                    encoder.encode_descriptor(&name, &help, None, MetricType::Counter)?;
                for (key, counts) in &totals {
                    let [to_backend, to_client] = value(counts);
                    for (direction, n) in [("to_backend", to_backend), ("to_client", to_client)] {
                        let labels = [(label, &**key), ("direction", direction)];
                        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rev_nat_id: u32, backend_id: u32) -> TrafficKey {
        TrafficKey {
            rev_nat_id,
            backend_id,
        }
    }

    fn counts(packets: u64) -> Traffic {
        Traffic {
            to_backend_packets: packets,
            to_backend_bytes: 100 * packets,
            to_client_packets: packets,
            to_client_bytes: 200 * packets,
        }
    }

    #[test]
    fn a_services_frontends_add_up_to_it() {
        assert_eq!(service_of("default/web:http"), "default/web");
        assert_eq!(service_of("default/web"), "default/web");
        assert_eq!(
            service_of("default/web:http (nodeport 10.0.0.1:30080)"),
            "default/web"
        );
        assert_eq!(service_of("default/web:dns (fd00::10)"), "default/web");
        assert_eq!(service_of("web"), "web");
    }

    #[test]
    fn totals_outlive_the_pairs_that_made_them() {
        let mut book = Book::default();
        book.name_frontend(1, "default/web");
        book.name_frontend(2, "default/web");
        book.name_frontend(3, "default/db");
        book.name_backend(10, "10.244.1.2:8080/TCP");
        book.name_backend(11, "10.244.2.2:8080/TCP");
        let live = [
            (pair(1, 10), counts(3)),
            (pair(2, 11), counts(4)),
            (pair(3, 11), counts(5)),
            // Not named yet: counted at a later scrape.
            (pair(4, 12), counts(9)),
        ];
        let (services, backends) = book.totals(&live);
        assert_eq!(services[&Arc::from("default/web")], counts(7));
        assert_eq!(services[&Arc::from("default/db")], counts(5));
        assert_eq!(backends[&Arc::from("10.244.2.2:8080/TCP")], counts(9));
        assert_eq!(services.len(), 2);

        // Backend 10 leaves: its pair goes from the map, its counts stay.
        book.retire(&[(pair(1, 10), counts(3))], |_| true, |id| id != 10);
        let (services, backends) = book.totals(&live[1..3]);
        assert_eq!(services[&Arc::from("default/web")], counts(7));
        assert_eq!(backends[&Arc::from("10.244.1.2:8080/TCP")], counts(3));
        // Its id is free: a new backend under it starts from nothing.
        book.name_backend(10, "10.244.3.3:8080/TCP");
        let (_, backends) = book.totals(&[(pair(1, 10), counts(1))]);
        assert_eq!(backends[&Arc::from("10.244.3.3:8080/TCP")], counts(1));
        assert_eq!(backends[&Arc::from("10.244.1.2:8080/TCP")], counts(3));
    }
}
