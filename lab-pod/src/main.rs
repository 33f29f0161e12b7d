//! `ferry-lab-pod`: the one binary of the lab's two small images.
//! - `ferry-lab-pod serve [NAME]`: the lab pods' server (TCP 8080, UDP 5353),
//!   answering with the pod's name (`NAME`, else `$POD_NAME`) and the client it saw;
//! - `ferry-lab-pod pause`: the pod sandbox's process, as Kubernetes' pause image.
//!
//! This file only reads the command line; `server` and `pause` do the work.

mod pause;
mod server;

use std::{
    env,
    net::{TcpListener, UdpSocket},
    process::ExitCode,
};

/// The ports every lab pod serves, as the lab's Services target them.
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

const USAGE: &str = "usage: ferry-lab-pod serve [NAME]   (NAME defaults to $POD_NAME)\n       \
                     ferry-lab-pod pause";

#[derive(Debug, PartialEq)]
enum Mode {
    Serve { name: String },
    Pause,
}

/// The mode the arguments (after the program name) ask for; `pod_name_env` is
/// `$POD_NAME`, the name a Pod's downward API gives it.
fn parse(args: &[String], pod_name_env: Option<String>) -> Result<Mode, String> {
    match args {
        [mode] if mode == "pause" => Ok(Mode::Pause),
        [mode] if mode == "serve" => match pod_name_env.filter(|n| !n.is_empty()) {
            Some(name) => Ok(Mode::Serve { name }),
            None => Err("serve: no pod name: give it as an argument or set POD_NAME".into()),
        },
        [mode, name] if mode == "serve" && !name.is_empty() => {
            Ok(Mode::Serve { name: name.clone() })
        }
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

fn run(mode: Mode) -> std::io::Result<()> {
    match mode {
        Mode::Pause => pause::run(),
        Mode::Serve { name } => {
            let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
            let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
            eprintln!("ferry-lab-pod: {name} serving TCP {TCP_PORT} and UDP {UDP_PORT}");
            server::serve(&name, tcp, udp)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let mode = match parse(&args, env::var("POD_NAME").ok()) {
        Ok(mode) => mode,
        Err(err) => {
            eprintln!("ferry-lab-pod: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry-lab-pod: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serve_takes_the_name_from_the_argument_before_the_environment() {
        assert_eq!(
            parse(&args(&["serve", "web-1"]), Some("env-name".into())),
            Ok(Mode::Serve {
                name: "web-1".into()
            })
        );
    }

    #[test]
    fn serve_takes_the_name_from_pod_name_without_an_argument() {
        assert_eq!(
            parse(&args(&["serve"]), Some("web-2".into())),
            Ok(Mode::Serve {
                name: "web-2".into()
            })
        );
    }

    #[test]
    fn serve_without_any_name_is_an_error() {
        assert!(parse(&args(&["serve"]), None).is_err());
        assert!(parse(&args(&["serve"]), Some(String::new())).is_err());
        assert!(parse(&args(&["serve", ""]), None).is_err());
    }

    #[test]
    fn pause_and_unknown_modes() {
        assert_eq!(parse(&args(&["pause"]), None), Ok(Mode::Pause));
        assert!(parse(&args(&["pause", "extra"]), None).is_err());
        assert!(parse(&args(&[]), Some("web-1".into())).is_err());
        assert!(parse(&args(&["web-1"]), None).is_err());
    }
}
