//! Debian's apt, the one place xtask uses it: packages installed only where
//! missing, candidate versions, `.deb` downloads and unpacking, and private apt
//! configurations made from this machine's own sources (so no mirror is named
//! in this code and `/etc/apt` and the machine's package lists stay as they are).

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::sys::exec;

/// The packages of `packages` not installed. One `dpkg-query` for all: it prints
/// the packages it knows and complains on stderr about the others.
pub fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    let installed = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\n")
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    packages
        .iter()
        .copied()
        .filter(|p| {
            !installed
                .lines()
                .any(|line| line == format!("{p} installed"))
        })
        .collect()
}

/// Installs what is missing of `packages`, saying so with `who` as the prefix.
/// Returns whether anything was missing.
pub fn install(who: &'static str, packages: &[&str]) -> Result<bool> {
    Apt::new(who).install_missing(packages)
}

/// The machine's apt, through its ordinary client; `apt-get update` runs at
/// most once, and only when something is missing.
pub struct Apt {
    who: &'static str,
    updated: bool,
}

impl Apt {
    pub fn new(who: &'static str) -> Self {
        Self {
            who,
            updated: false,
        }
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            exec(
                Command::new("apt-get")
                    .stdout(io::stderr())
                    .args(["update", "-q"]),
            )?;
            self.updated = true;
        }
        Ok(())
    }

    /// Installs what is missing of `packages`; returns whether anything was.
    pub fn install_missing(&mut self, packages: &[&str]) -> Result<bool> {
        let missing = missing_packages(packages);
        if missing.is_empty() {
            return Ok(false);
        }
        eprintln!("{}: installing {}", self.who, missing.join(" "));
        self.update()?;
        exec(
            Command::new("apt-get")
                .stdout(io::stderr())
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
        Ok(true)
    }

    /// The version `apt-get install` would take, after an update if there is none.
    pub fn candidate(&mut self, package: &str) -> Result<Option<String>> {
        let policy = |package: &str| -> Result<Option<String>> {
            let out = Command::new("apt-cache")
                .args(["policy", package])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| line.trim().strip_prefix("Candidate:"))
                .map(str::trim)
                .filter(|v| *v != "(none)")
                .map(String::from))
        };
        match policy(package)? {
            None if !self.updated => {
                self.update()?;
                policy(package)
            }
            found => Ok(found),
        }
    }
}

/// Downloads `package` (`name` or `name=version`) from the machine's sources
/// into `dir` (without installing it) and returns the `.deb`.
pub fn download(dir: &Path, package: &str) -> Result<PathBuf> {
    exec(
        Command::new("apt-get")
            .current_dir(dir)
            // The directory is root's; without this apt only warns that `_apt`
            // cannot write there and downloads as root anyway.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(package),
    )?;
    let name = package.split('=').next().unwrap_or(package);
    find_file(dir, &format!("{name}_"), ".deb")
}

/// Unpacks a `.deb` under `root` (`dpkg-deb -x`).
pub fn extract(deb: &Path, root: &Path) -> Result<()> {
    exec(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))
}

/// The one file in `dir` named `prefix*suffix`.
pub fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one {prefix}*{suffix} in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// This machine's Debian apt sources: a file name (relative to `/etc/apt`) and
/// its contents.
pub fn machine_sources() -> Result<(&'static str, String)> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if deb822.is_file() {
        return Ok(("sources.list.d/debian.sources", fs::read_to_string(deb822)?));
    }
    let text = fs::read_to_string("/etc/apt/sources.list")
        .context("no /etc/apt/sources.list.d/debian.sources nor /etc/apt/sources.list")?;
    Ok(("sources.list", text))
}

/// An apt configuration of its own under a directory: its sources, lists and
/// caches, so the machine's stay as they are.
pub struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// Under `dir`, with one sources file `file_name` holding `sources`.
    pub fn create(dir: &Path, file_name: &str, sources: &str) -> Result<Self> {
        let parts = dir.join("sources.list.d");
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        for sub in [
            &parts,
            &lists.join("partial"),
            &cache.join("archives/partial"),
        ] {
            fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        fs::write(parts.join(file_name), sources)?;
        let options = vec![
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            format!("Dir::Cache::archives={}", cache.join("archives").display()),
            // The directory is root's; apt would only warn that `_apt` cannot write there.
            "APT::Sandbox::User=root".to_string(),
        ];
        Ok(Self { options })
    }

    /// `program` (`apt-get`, `apt-cache`) with this configuration. apt-get's
    /// progress goes to stderr, so that stdout keeps a task's own output alone.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if program == "apt-get" {
            cmd.stdout(io::stderr());
        }
        cmd.arg("-q");
        for option in &self.options {
            cmd.arg("-o").arg(option);
        }
        cmd
    }
}
