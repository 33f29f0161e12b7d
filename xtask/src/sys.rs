//! Process plumbing for every task: the workspace root, running commands
//! (echoed or quiet), detached long-lived processes with pid files, the root
//! check, PATH look-ups and self-removing temporary directories.

use std::{
    env, fs,
    io::{self, Write as _},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The repository root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Fails with `why` unless this process runs as root.
pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}");
    }
    Ok(())
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn exec(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// A command as a shell line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command quietly (stdin closed) and returns its stdout; fails with
/// its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    quiet(cmd).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Runs a command quietly (stdin closed) and returns its stdout as bytes;
/// fails with its stderr.
pub fn quiet(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Runs `cmd` with `input` on its stdin and returns its stdout; fails with its
/// stderr.
pub fn output_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            show(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a long-lived process in a session of its own (no controlling
/// terminal, so neither Ctrl-C nor a closing terminal reaches it, and it
/// outlives this process), output to `log`, and records its pid in `pid_file`.
pub fn spawn_detached(cmd: &mut Command, log: &Path, pid_file: &Path) -> Result<Child> {
    let log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    fs::write(pid_file, child.id().to_string())?;
    Ok(child)
}

/// The pid `pid_file` holds, if that process is alive.
pub fn live_pid(pid_file: &Path) -> Option<i32> {
    let pid = fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Stops the process whose pid `pid_file` holds (SIGTERM, then SIGKILL after
/// 5 s) and removes the file. A missing file or a dead process is fine.
pub fn stop_pid_file(pid_file: &Path) {
    if let Some(pid) = live_pid(pid_file) {
        // SAFETY: signals to a pid we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && unsafe { libc::kill(pid, 0) } == 0 {
            // Reap it if it is our child; otherwise just wait for it to go.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            thread::sleep(Duration::from_millis(20));
        }
        if unsafe { libc::kill(pid, 0) } == 0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = fs::remove_file(pid_file);
}

/// The first `name` on PATH, then in the sbin and bin directories (which a
/// root environment may lack on PATH).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// A directory removed when dropped (so also when a task fails half way).
pub struct TempDir {
    path: PathBuf,
    /// Who says so in messages (`setup`, `vm-test`).
    who: &'static str,
}

impl TempDir {
    /// `path` itself; a leftover there from a killed run is removed first.
    pub fn at(path: impl Into<PathBuf>, who: &'static str) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            eprintln!("{who}: removing {} left by an earlier run", path.display());
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, who })
    }

    /// `<temp dir>/<name>.<pid>`; ones left by processes that are gone are
    /// removed first.
    pub fn per_process(name: &str, who: &'static str) -> Result<Self> {
        let tmp = env::temp_dir();
        let prefix = format!("{name}.");
        for entry in fs::read_dir(&tmp)?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = file_name.strip_prefix(&prefix) {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Self::at(tmp.join(format!("{name}.{}", std::process::id())), who)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "{}: could not remove {}: {err}",
                self.who,
                self.path.display()
            );
        }
    }
}

/// Makes `cmd`'s process join the v2 cgroup `cgroup` before it runs
/// (`0` written to `cgroup.procs` moves the writer).
pub fn join_cgroup_on_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: open, write and close are async-signal-safe, as code between
    // fork and exec must be; nothing is allocated there.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
            Ok(())
        });
    }
    Ok(())
}
