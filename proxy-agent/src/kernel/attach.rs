//! Attaching the programs: XDP (or tc) on the uplinks, tc on pod interfaces,
//! with fixed tc priorities so a restarted agent replaces its own filters.

use super::*;

/// Logs what the verifier walked for a program it took.
fn log_verified(name: &str, info: Option<aya::programs::ProgramInfo>) {
    let instructions = info.and_then(|i| i.verified_instruction_count());
    debug!(program = name, ?instructions, "verified");
}

impl Dataplane {
    /// The uplink XDP program, loaded (verified) if it was not yet.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(program_names::UPLINK_XDP)
            .context("no uplink_xdp program")?
            .try_into()?;
        if program.fd().is_err() {
            program.load().context("the verifier rejected uplink_xdp")?;
            log_verified(program_names::UPLINK_XDP, program.info().ok());
        }
        Ok(program)
    }

    /// Attaches the uplink programs to the node's uplink: XDP (native if the
    /// driver has it, else generic) with the tc program behind it, or the tc
    /// program alone when XDP cannot attach. `wanted` limits the choice.
    /// `to_pod` goes on the uplink's egress: the node's own stack answers
    /// for hostNetwork backends, and those answers to clients from outside
    /// leave there, to be given their frontend's address as a pod's are on
    /// its veth.
    pub fn attach_uplink(&mut self, iface: &str, wanted: Option<UplinkMode>) -> Result<UplinkMode> {
        // The tc programs run in every mode: alone, or behind XDP for what
        // XDP hands on (IPv6 all of it).
        self.attach_tc(iface, program_names::UPLINK_TC, TcAttachType::Ingress)?;
        self.attach_tc(iface, program_names::UPLINK_TC6, TcAttachType::Ingress)?;
        self.attach_tc(iface, program_names::TO_POD, TcAttachType::Egress)?;
        let tries: &[(UplinkMode, XdpMode)] = match wanted {
            Some(UplinkMode::Tc) => &[],
            Some(UplinkMode::Native) => &[(UplinkMode::Native, XdpMode::Driver)],
            Some(UplinkMode::Generic) => &[(UplinkMode::Generic, XdpMode::Skb)],
            None => &[
                (UplinkMode::Native, XdpMode::Driver),
                (UplinkMode::Generic, XdpMode::Skb),
            ],
        };
        // The pin's name says the mode: `xdp_<mode>_<iface>`.
        let pin_dir = self.pin_dir.clone();
        let pin = |mode: UplinkMode| {
            pin_dir
                .as_ref()
                .map(|d| d.join(format!("xdp_{}_{iface}", mode.name())))
        };
        // An XDP link an earlier agent pinned: swap our program into it in one step.
        for mode in [UplinkMode::Native, UplinkMode::Generic] {
            let Some(path) = pin(mode).filter(|p| p.exists()) else {
                continue;
            };
            if wanted.is_some_and(|w| w != mode) {
                bail!(
                    "{iface} has a {} XDP link pinned at {}; run cleanup first",
                    mode.name(),
                    path.display()
                );
            }
            let fd_link: FdLink = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?
                .into();
            let program = self.xdp_program()?;
            let link_id = program.attach_to_link(XdpLink::try_from(fd_link)?)?;
            std::mem::forget(program.take_link(link_id)?);
            info!(
                iface,
                mode = mode.name(),
                "uplink XDP program replaced in its pinned link"
            );
            return Ok(mode);
        }
        for (mode, xdp_mode) in tries {
            let program = self.xdp_program()?;
            match program.attach(iface, *xdp_mode) {
                Ok(link_id) => {
                    let link = program.take_link(link_id)?;
                    match (FdLink::try_from(link), pin(*mode)) {
                        // A bpf_link lives while a file descriptor or a pin holds it:
                        // pinned, it outlives the agent as the tc filters do.
                        (Ok(fd_link), Some(path)) => {
                            fd_link
                                .pin(&path)
                                .with_context(|| format!("pinning {}", path.display()))?;
                        }
                        (Ok(fd_link), None) => std::mem::forget(fd_link),
                        // Kernels before 5.9 attach through netlink: that stays by itself.
                        (Err(_), _) => {}
                    }
                    info!(iface, mode = mode.name(), "uplink attached");
                    return Ok(*mode);
                }
                Err(e) => warn!(iface, mode = mode.name(), error = %e, "XDP attach failed"),
            }
        }
        if wanted.is_some_and(|w| w != UplinkMode::Tc) {
            bail!("XDP could not attach to {iface} in the requested mode");
        }
        info!(iface, mode = "tc", "uplink attached");
        Ok(UplinkMode::Tc)
    }

    /// One of the tc programs, by name (see `proxy_common::program_names`),
    /// loaded (verified) if it was not yet.
    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
            log_verified(name, program.info().ok());
        }
        Ok(program)
    }

    /// Attaches `from_pod` to tc ingress and `to_pod` to tc egress of a pod's
    /// host-side interface, replacing Ferry's filters if they are there. The
    /// filters stay after this process exits; `cleanup` removes them. Returns
    /// whether a filter was missing (and is there now).
    pub fn attach_pod_interface(&mut self, iface: &str) -> Result<bool> {
        let ingress = self.attach_tc(iface, program_names::FROM_POD, TcAttachType::Ingress)?;
        let egress = self.attach_tc(iface, program_names::TO_POD, TcAttachType::Egress)?;
        debug!(iface, "attached");
        Ok(ingress || egress)
    }

    /// Attaches one tc program. Ferry's filters sit at a fixed priority and
    /// handle, so a filter an earlier agent left there is replaced in one step,
    /// without a gap. Netlink filters, not tcx links: they work from 5.10 on and
    /// outlive the agent. Returns whether the filter was not there before.
    fn attach_tc(&mut self, iface: &str, name: &str, attach_type: TcAttachType) -> Result<bool> {
        match qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding clsact to {iface}")),
        }
        let handle = tc_handle(name);
        let program = self.program(name)?;
        let options = NlOptions {
            priority: TC_PRIORITY,
            handle,
            ..NlOptions::default()
        };
        let mut created = true;
        let link_id = match program.attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => Ok(id),
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                created = false;
                let existing =
                    SchedClassifierLink::attached(iface, attach_type, TC_PRIORITY, handle, None)?;
                program.attach_to_link(existing)
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("attaching {name} to {iface}"))?;
        let link = program.take_link(link_id)?;
        // Dropping the link would detach it; the filter must stay.
        std::mem::forget(link);
        Ok(created)
    }
}

/// The handle of program `name`'s filter: the uplink's two tc programs sit
/// side by side on one hook, at Ferry's priority.
fn tc_handle(name: &str) -> TcHandle {
    if name == program_names::UPLINK_TC6 {
        TC_HANDLE_UPLINK6
    } else {
        TC_HANDLE
    }
}

/// Detaches every filter named `name` from one hook of `iface`; none is fine.
pub(super) fn detach(iface: &str, attach_type: TcAttachType, name: &str) -> Result<bool> {
    match qdisc_detach_program(iface, attach_type, name) {
        Ok(()) => Ok(true),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // No clsact qdisc on this interface: nothing of ours can be there.
        Err(TcError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("detaching {name} from {iface}")),
    }
}
