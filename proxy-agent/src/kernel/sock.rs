//! The socket hooks: loading them (with a fallback for kernels before 5.18),
//! attaching them to a cgroup through pinned bpf_links that outlive the agent,
//! and swapping a newer agent's programs into those links in one step.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
};

use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr};
use proxy_common::{sock_flags, SockConfig};

use super::*;

/// Which sockets the hooks translate (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// None: the node's own connections to Services are not served.
    Off,
    /// The node's network namespace (host processes, hostNetwork pods).
    Host,
    /// Every socket under the cgroup, pods' too: their connections are
    /// translated once, at connect(), and skip the per-packet NAT.
    All,
}

impl std::str::FromStr for SocketLb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "host" => Ok(Self::Host),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown socket-lb mode {other:?}: host, all or off"
            )),
        }
    }
}

/// The hooks, each with the program that serves it: (pin name, program, fallback).
const HOOKS: [(&str, &str, Option<&str>); 8] = [
    (
        "cgroup_connect4",
        program_names::SOCK_CONNECT4,
        Some(program_names::SOCK_CONNECT4_COMPAT),
    ),
    (
        "cgroup_sendmsg4",
        program_names::SOCK_SENDMSG4,
        Some(program_names::SOCK_SENDMSG4_COMPAT),
    ),
    ("cgroup_recvmsg4", program_names::SOCK_RECVMSG4, None),
    (
        "cgroup_getpeername4",
        program_names::SOCK_GETPEERNAME4,
        None,
    ),
    (
        "cgroup_connect6",
        program_names::SOCK_CONNECT6,
        Some(program_names::SOCK_CONNECT6_COMPAT),
    ),
    (
        "cgroup_sendmsg6",
        program_names::SOCK_SENDMSG6,
        Some(program_names::SOCK_SENDMSG6_COMPAT),
    ),
    ("cgroup_recvmsg6", program_names::SOCK_RECVMSG6, None),
    (
        "cgroup_getpeername6",
        program_names::SOCK_GETPEERNAME6,
        None,
    ),
];

/// How the socket hooks loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockPrograms {
    /// With `bpf_set_retval`: a frontend without endpoints refuses with ECONNREFUSED.
    Errno,
    /// Without it (before 5.18): the refusal is EPERM.
    Eperm,
}

impl SockPrograms {
    /// The errno a dial to a frontend without endpoints gets.
    pub const fn refusal(self) -> &'static str {
        match self {
            Self::Errno => "ECONNREFUSED",
            Self::Eperm => "EPERM (kernel before 5.18)",
        }
    }
}

impl Dataplane {
    /// Loads the socket hooks' programs: the ones that set the refusal's errno,
    /// or on kernels without `bpf_set_retval` the compat ones.
    pub(super) fn load_sock_programs(ebpf: &mut Ebpf) -> Result<SockPrograms> {
        for (_, name, _) in HOOKS.iter().filter(|(_, _, compat)| compat.is_none()) {
            load_sock(ebpf, name)?;
        }
        let errno = HOOKS
            .iter()
            .filter(|(_, _, compat)| compat.is_some())
            .try_for_each(|(_, name, _)| load_sock(ebpf, name));
        match errno {
            Ok(()) => Ok(SockPrograms::Errno),
            Err(e) => {
                debug!(error = %format!("{e:#}"), "socket hooks without bpf_set_retval");
                for (_, _, compat) in HOOKS {
                    if let Some(compat) = compat {
                        load_sock(ebpf, compat)?;
                    }
                }
                Ok(SockPrograms::Eperm)
            }
        }
    }

    /// How the socket hooks loaded; None where the kernel refused them.
    pub fn sock_programs(&self) -> Option<SockPrograms> {
        self.sock_programs
    }

    /// The socket hooks' reverse entries: (socket cookie, backend) -> the
    /// frontend it dialled.
    pub fn sock_revnat(&self) -> Result<Vec<(SockRevKey4, RevNat4)>> {
        Ok(self.sock_revnat.iter().collect::<Result<_, _>>()?)
    }

    /// Detaches the socket hooks an earlier agent pinned (`--socket-lb off`).
    pub fn detach_sockets(&mut self) -> Result<()> {
        self.sock_links.clear();
        let Some(pin_dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        for (pin, _, _) in HOOKS {
            let path = pin_dir.join(pin);
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                info!(pin = %path.display(), "socket hook detached");
            }
        }
        Ok(())
    }

    /// Attaches the socket hooks to the cgroup v2 directory `cgroup` (every
    /// process under it), in `mode`. A hook an earlier agent pinned gets this
    /// agent's program in one step (`BPF_LINK_UPDATE`), so connect() never
    /// goes untranslated during a restart or an upgrade.
    pub fn attach_sockets(&mut self, cgroup: &Path, mode: SocketLb) -> Result<SockPrograms> {
        self.attach_sockets_as(cgroup, mode, own_netns_cookie())
    }

    /// [`Dataplane::attach_sockets`] with the node's namespace named by its
    /// cookie (0: the initial namespace), for callers in another namespace.
    pub fn attach_sockets_as(
        &mut self,
        cgroup: &Path,
        mode: SocketLb,
        host_netns_cookie: u64,
    ) -> Result<SockPrograms> {
        let Some(loaded) = self.sock_programs else {
            bail!("the socket hooks did not load on this kernel");
        };
        let pin_dir = self.pin_dir.clone();
        if mode == SocketLb::Off {
            bail!("attach_sockets with mode off: call detach_sockets");
        }
        self.sock_config.set(
            0,
            SockConfig {
                host_netns_cookie,
                flags: if mode == SocketLb::All {
                    sock_flags::ALL_NAMESPACES
                } else {
                    0
                },
                _pad: 0,
            },
            0,
        )?;
        let dir = File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for (pin, name, compat) in HOOKS {
            let name = match (loaded, compat) {
                (SockPrograms::Eperm, Some(compat)) => compat,
                _ => name,
            };
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            let path = pin_dir.as_ref().map(|d| d.join(pin));
            if let Some(path) = path.as_ref().filter(|p| p.exists()) {
                let link = obj_get(path).with_context(|| format!("opening {}", path.display()))?;
                link_update(&link, program.fd()?.as_fd().as_raw_fd())
                    .with_context(|| format!("replacing the program in {}", path.display()))?;
                continue;
            }
            // Through bpf_link_create (5.7), where links always sit beside
            // others: the kernel refuses an attach flag there.
            let link_id = program
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link = program.take_link(link_id)?;
            match (FdLink::try_from(link), path) {
                (Ok(fd_link), Some(path)) => {
                    fd_link
                        .pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                }
                // Private maps: the hooks go with this value.
                (Ok(fd_link), None) => self.sock_links.push(fd_link),
                (Err(_), _) => bail!("the kernel attached {name} without a bpf_link"),
            }
        }
        info!(
            cgroup = %cgroup.display(),
            mode = ?mode,
            refusal = loaded.refusal(),
            "socket hooks attached"
        );
        Ok(loaded)
    }
}

fn load_sock(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the verifier rejected {name}"))
}

/// The cookie of the agent's own network namespace (the node's, as the agent
/// runs with the host network), or 0, which the hooks read as the initial
/// namespace, on kernels before 5.14 (no SO_NETNS_COOKIE).
pub fn own_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket is created, queried and closed; nothing else is touched.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 0;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let ok = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        ) == 0;
        libc::close(fd);
        if ok {
            cookie
        } else {
            0
        }
    }
}

/// BPF_OBJ_GET: the pinned object at `path`.
fn obj_get(path: &Path) -> Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the kernel reads `attr` and the path it points to, both alive.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("BPF_OBJ_GET");
    }
    // SAFETY: a new descriptor the kernel gave this process alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: `link` runs `prog_fd` from now on, with no gap.
fn link_update(link: &OwnedFd, prog_fd: i32) -> Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the kernel reads `size_of::<LinkUpdate>()` bytes of `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("BPF_LINK_UPDATE");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lb_modes_parse_as_the_flag_documents() {
        assert_eq!("host".parse::<SocketLb>(), Ok(SocketLb::Host));
        assert_eq!("all".parse::<SocketLb>(), Ok(SocketLb::All));
        assert_eq!("off".parse::<SocketLb>(), Ok(SocketLb::Off));
        assert!("pods".parse::<SocketLb>().is_err());
    }

    #[test]
    fn every_hook_has_its_own_pin_and_only_the_refusing_ones_a_fallback() {
        let pins: std::collections::BTreeSet<_> = HOOKS.iter().map(|(pin, _, _)| pin).collect();
        assert_eq!(pins.len(), HOOKS.len());
        for (_, name, compat) in HOOKS {
            let refuses = name.contains("connect") || name.contains("sendmsg");
            assert_eq!(compat.is_some(), refuses, "{name}");
        }
    }
}
