//! Removing everything Ferry put in the kernel: its tc filters in this network
//! namespace (and the clsact qdiscs they leave empty), its pinned maps and its
//! pinned XDP and cgroup links (unpinned, a link detaches its program).

use super::{attach::detach, *};

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub filters: Vec<String>,
    /// Interfaces whose clsact qdisc went with Ferry's filters.
    pub qdiscs: Vec<String>,
    pub pins: Vec<PathBuf>,
}

/// Removes every Ferry filter from every interface of this network namespace
/// (and the clsact qdisc where none is left), and every map and link pinned
/// under `pin_dir` (then the directory itself).
pub fn cleanup(pin_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    for super::rtnl::Link {
        index, name: iface, ..
    } in super::rtnl::links()?
    {
        let before = removed.filters.len();
        for (name, attach_type) in [
            (program_names::FROM_POD, TcAttachType::Ingress),
            (program_names::TO_POD, TcAttachType::Egress),
            (program_names::UPLINK_TC, TcAttachType::Ingress),
            (program_names::UPLINK_TC6, TcAttachType::Ingress),
        ] {
            if detach(&iface, attach_type, name)? {
                removed
                    .filters
                    .push(format!("{iface} {attach_type:?} {name}"));
            }
        }
        if removed.filters.len() > before && super::clsact::remove_if_empty(index)? {
            removed.qdiscs.push(iface);
        }
    }
    if pin_dir.exists() {
        for entry in fs::read_dir(pin_dir)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.pins.push(path);
        }
        fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(removed)
}
