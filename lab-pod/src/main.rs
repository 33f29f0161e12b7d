//! `ferry-lab-pod`: the one binary of the lab's two small images.
//! - `ferry-lab-pod serve [NAME]`: the lab pods' server (TCP 8080, UDP 5353),
//!   answering with the pod's name (`NAME`, else `$POD_NAME`) and the client it saw;
//! - `ferry-lab-pod pause`: the pod sandbox's process, as Kubernetes' pause image;
//! - `ferry-lab-pod dial ADDR:PORT`: a client, for pods that test a Service
//!   (one TCP connection: prints the server's first line and the peer the socket
//!   reports, exits 0 if it was answered);
//! - `ferry-lab-pod webhook`: a validating admission webhook on HTTPS port
//!   8443, with the certificate and key in `$WEBHOOK_CERT` and `$WEBHOOK_KEY`.
//!
//! This file only reads the command line; `server`, `pause` and `webhook` do
//! the work.

mod pause;
mod server;
mod webhook;

use std::{
    env,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

/// The ports every lab pod serves, as the lab's Services target them.
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

const USAGE: &str = "usage: ferry-lab-pod serve [NAME]   (NAME defaults to $POD_NAME)\n       \
                     ferry-lab-pod pause\n       \
                     ferry-lab-pod dial ADDR:PORT\n       \
                     ferry-lab-pod webhook           (with $WEBHOOK_CERT and $WEBHOOK_KEY)";

#[derive(Debug, PartialEq)]
enum Mode {
    Serve { name: String },
    Pause,
    Dial { target: SocketAddr },
    Webhook,
}

/// The mode the arguments (after the program name) ask for; `pod_name_env` is
/// `$POD_NAME`, the name a Pod's downward API gives it.
fn parse(args: &[String], pod_name_env: Option<String>) -> Result<Mode, String> {
    match args {
        [mode] if mode == "pause" => Ok(Mode::Pause),
        [mode] if mode == "webhook" => Ok(Mode::Webhook),
        [mode, target] if mode == "dial" => target
            .parse()
            .map(|target| Mode::Dial { target })
            .map_err(|e| format!("dial {target}: {e}")),
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
        Mode::Webhook => {
            let pem = |name: &str| {
                env::var(name).map_err(|_| std::io::Error::other(format!("webhook: no ${name}")))
            };
            let config = webhook::tls_config(&pem("WEBHOOK_CERT")?, &pem("WEBHOOK_KEY")?)?;
            let listener = TcpListener::bind(("0.0.0.0", webhook::PORT))?;
            eprintln!("ferry-lab-pod: webhook serving HTTPS {}", webhook::PORT);
            webhook::serve(config, listener)
        }
        Mode::Dial { target } => {
            let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let peer = conn.peer_addr()?;
            // The lab's server greets with one line and keeps the connection.
            let mut answer = String::new();
            BufReader::new(conn).read_line(&mut answer)?;
            println!("answer={} peer={peer}", answer.trim_end());
            Ok(())
        }
        Mode::Serve { name } => {
            // `::` takes IPv4 too (as IPv4-mapped addresses): one socket
            // serves a dual-stack pod's two addresses.
            let tcp = TcpListener::bind(("::", TCP_PORT))?;
            let udp = UdpSocket::bind(("::", UDP_PORT))?;
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
    fn dial_takes_one_address_and_port() {
        assert_eq!(
            parse(&args(&["dial", "10.96.0.10:80"]), None),
            Ok(Mode::Dial {
                target: "10.96.0.10:80".parse().unwrap()
            })
        );
        assert!(parse(&args(&["dial", "10.96.0.10"]), None).is_err());
        assert!(parse(&args(&["dial"]), None).is_err());
    }

    #[test]
    fn pause_and_unknown_modes() {
        assert_eq!(parse(&args(&["pause"]), None), Ok(Mode::Pause));
        assert_eq!(parse(&args(&["webhook"]), None), Ok(Mode::Webhook));
        assert!(parse(&args(&["webhook", "extra"]), None).is_err());
        assert!(parse(&args(&["pause", "extra"]), None).is_err());
        assert!(parse(&args(&[]), Some("web-1".into())).is_err());
        assert!(parse(&args(&["web-1"]), None).is_err());
    }
}
