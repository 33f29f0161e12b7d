//! `ferry-lab-pod webhook`: a validating admission webhook, as a cluster's
//! policy agents run them: HTTPS on [`PORT`] with the certificate the Pod is
//! given (`$WEBHOOK_CERT`, `$WEBHOOK_KEY`, PEM), HTTP/1.1, one
//! `AdmissionReview` per connection (it closes each after its answer, so that
//! every call is a new connection that the caller's node translates). It
//! denies objects whose name starts with [`DENIED_PREFIX`] and allows every
//! other: what the lab's test needs to see that the API server reached it.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::Arc,
    thread,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::{json, Value};

pub const PORT: u16 = 8443;
pub const DENIED_PREFIX: &str = "denied-";
/// A review larger than this is refused (the lab's are a few KiB).
const MAX_BODY: usize = 4 << 20;

/// The TLS configuration of the certificate chain and key in PEM.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> io::Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::other(format!("WEBHOOK_CERT: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| io::Error::other(format!("WEBHOOK_KEY: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    Ok(Arc::new(config))
}

/// Serves reviews on `listener`, a thread per connection.
pub fn serve(config: Arc<ServerConfig>, listener: TcpListener) -> io::Result<()> {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let config = config.clone();
        thread::spawn(move || {
            let Ok(conn) = ServerConnection::new(config) else {
                return;
            };
            let mut tls = StreamOwned::new(conn, stream);
            if let Err(e) = converse(&mut tls) {
                eprintln!("ferry-lab-pod webhook: {e}");
            }
        });
    }
    Ok(())
}

/// Answers the one request of a connection.
fn converse(stream: &mut (impl Read + Write)) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(io::Error::other)?;
            }
        }
    }
    if length > MAX_BODY {
        return Err(io::Error::other(format!("a body of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let (status, answer) = match serde_json::from_slice::<Value>(&body) {
        Ok(request) => ("200 OK", review(&request).to_string()),
        Err(e) => ("400 Bad Request", format!("not an AdmissionReview: {e}")),
    };
    eprintln!(
        "ferry-lab-pod webhook: {} -> {status}",
        request_line.trim_end()
    );
    let out = reader.get_mut();
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    out.flush()
}

/// The answer to an `AdmissionReview` request: the same uid, allowed unless
/// the object's name starts with [`DENIED_PREFIX`].
pub fn review(request: &Value) -> Value {
    let req = &request["request"];
    let name = req["object"]["metadata"]["name"]
        .as_str()
        .or_else(|| req["name"].as_str())
        .unwrap_or("");
    let allowed = !name.starts_with(DENIED_PREFIX);
    let mut response = json!({"uid": req["uid"], "allowed": allowed});
    if !allowed {
        response["status"] = json!({
            "code": 403,
            "message": format!("the ferry-lab webhook denies {name}: its name starts with {DENIED_PREFIX}"),
        });
    }
    json!({
        "apiVersion": request["apiVersion"].as_str().unwrap_or("admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "7f0b", "object": {"metadata": {"name": name}}},
        })
    }

    #[test]
    fn a_denied_name_is_denied_with_a_message_and_the_uid() {
        let answer = review(&request("denied-one"));
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "7f0b");
        assert_eq!(answer["response"]["allowed"], false);
        assert!(answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("denied-one"));
    }

    #[test]
    fn other_names_are_allowed() {
        let answer = review(&request("allowed-one"));
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["uid"], "7f0b");
        assert!(answer["response"]["status"].is_null());
    }

    #[test]
    fn a_connection_gets_one_answer_and_is_closed() {
        let body = request("denied-x").to_string();
        let one = format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = Duplex {
            input: io::Cursor::new(format!("{one}{one}").into_bytes()),
            output: Vec::new(),
        };
        converse(&mut stream).unwrap();
        let out = String::from_utf8(stream.output).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 1, "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert_eq!(out.matches("\"allowed\":false").count(), 1, "{out}");
    }

    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
