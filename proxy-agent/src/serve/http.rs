//! The agent's HTTP endpoints on hyper's HTTP/1 server: each listener
//! answers GET (and HEAD) requests by path through one handler.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    body::Bytes, client, header, server::conn::http1, service::service_fn, Method, Request,
    Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::debug;

/// What a handler answers.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }

    pub fn json(healthy: bool, body: String) -> Self {
        Self {
            status: if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            content_type: "application/json",
            body,
        }
    }

    pub fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            content_type: "text/plain; charset=utf-8",
            body: "404 page not found\n".into(),
        }
    }
}

/// A request slower than this to send its headers is dropped, and a
/// connection is closed after this long whatever it does: nothing here
/// takes long to answer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds `addr` and serves it in a background task.
pub async fn listen<F>(addr: SocketAddr, handler: F) -> Result<JoinHandle<()>>
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    Ok(serve(listener, handler))
}

/// Serves a bound listener in a background task, until the task is aborted.
pub fn serve<F>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    debug!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = respond(&request, handler.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    debug!(error = %e, "HTTP connection");
                }
            });
        }
    })
}

fn respond<B>(request: &Request<B>, handler: &dyn Fn(&str) -> Reply) -> Response<Full<Bytes>> {
    let reply = match *request.method() {
        Method::GET | Method::HEAD => handler(request.uri().path()),
        _ => Reply {
            status: StatusCode::METHOD_NOT_ALLOWED,
            content_type: "text/plain; charset=utf-8",
            body: "only GET\n".into(),
        },
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// GETs `path` from the HTTP server at `addr`: the body of a 200 answer,
/// within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let request = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) = client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        anyhow::ensure!(status == StatusCode::OK, "{status}");
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
        .with_context(|| format!("GET http://{addr}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_by_path_and_refuses_other_methods() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = serve(listener, |path| match path {
            "/a" => Reply::ok("text/plain", "A\n".into()),
            _ => Reply::not_found(),
        });
        let ask = |request: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let a = ask("GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("content-type: text/plain\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nA\n"), "{a}");
        let b = ask("GET /b HTTP/1.0\r\n\r\n").await;
        assert!(b.starts_with("HTTP/1.0 404 Not Found\r\n"), "{b}");
        let c = ask("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
        assert!(c.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{c}");
        task.abort();
    }

    #[tokio::test]
    async fn get_reads_a_200_body_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = serve(listener, |path| match path {
            "/a" => Reply::ok("application/json", "{}".into()),
            _ => Reply::not_found(),
        });
        let wait = Duration::from_secs(2);
        assert_eq!(get(addr, "/a", wait).await.unwrap(), "{}");
        let missing = get(addr, "/b", wait).await.unwrap_err();
        assert!(format!("{missing:#}").contains("404"), "{missing:#}");
        task.abort();
        // Nothing listens there any more.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(get(gone, "/a", wait).await.is_err());
    }
}
