//! A proxy in front of the test registry: counts the bytes it serves and misbehaves on
//! request, as registries and the networks in front of them do.
//!
//! The daemon is pointed at it as a mirror of the registry (its own `hosts.toml`), so
//! its requests go through the proxy while containerd's full pulls reach the registry
//! directly. What it can do wrong ([`Fault`]): ignore `Range` (a `200` with the whole
//! blob), drop the connection halfway through a range, or demand credentials nobody
//! has.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures::StreamExt as _;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Client, Request, Response, StatusCode};

/// How the proxy misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// It does not.
    #[default]
    None,
    /// Range requests are forwarded without `Range`: the whole blob comes back, `200`.
    IgnoreRange,
    /// A range request's answer stops halfway and the connection is dropped.
    DropMidRange,
    /// Every request is answered `401` with a basic-auth challenge.
    RequireAuth,
    /// Requests without these basic-auth credentials (`user`, `password`) are answered
    /// `401` with a basic-auth challenge.
    RequireCredentials(&'static str, &'static str),
}

struct State {
    upstream: String,
    fault: Mutex<Fault>,
    body_bytes: AtomicU64,
    requests: AtomicU64,
    range_requests: AtomicU64,
}

/// The running proxy; stops when dropped.
pub struct RegistryProxy {
    /// `127.0.0.1:PORT`
    pub addr: String,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegistryProxy {
    /// A proxy of the registry at `upstream` (`host:port`, plain HTTP).
    pub fn start(upstream: &str) -> Result<RegistryProxy> {
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            fault: Mutex::new(Fault::None),
            body_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            range_requests: AtomicU64::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("registry-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let client = Client::new();
                    let make = make_service_fn(move |_| {
                        let (s, client) = (s.clone(), client.clone());
                        async move {
                            Ok::<_, Infallible>(service_fn(move |req| {
                                handle(s.clone(), client.clone(), req)
                            }))
                        }
                    });
                    let server = hyper::Server::from_tcp(listener)
                        .expect("proxy listener")
                        .serve(make)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        });
                    let _ = server.await;
                });
            })
            .context("starting the registry proxy")?;
        Ok(RegistryProxy {
            addr: addr.to_string(),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// From now on, misbehave so.
    pub fn set_fault(&self, f: Fault) {
        *self.state.fault.lock().unwrap() = f;
    }

    /// Response body bytes served so far.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::Relaxed)
    }

    /// Requests so far, and of them the range requests.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.state.requests.load(Ordering::Relaxed),
            self.state.range_requests.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RegistryProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    s: Arc<State>,
    client: Client<hyper::client::HttpConnector>,
    req: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    let fault = *s.fault.lock().unwrap();
    s.requests.fetch_add(1, Ordering::Relaxed);
    let ranged = req.headers().contains_key(hyper::header::RANGE);
    if ranged {
        s.range_requests.fetch_add(1, Ordering::Relaxed);
    }
    let authorized = match fault {
        Fault::RequireAuth => false,
        Fault::RequireCredentials(user, password) => {
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            req.headers()
                .get(hyper::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        }
        _ => true,
    };
    if !authorized {
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"cas-test\"")
            .body(Body::from("{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}"))
            .unwrap());
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let mut up = Request::builder()
        .method(req.method().clone())
        .uri(format!("http://{}{path}", s.upstream));
    for (k, v) in req.headers() {
        if k == hyper::header::HOST || (fault == Fault::IgnoreRange && k == hyper::header::RANGE) {
            continue;
        }
        up = up.header(k, v);
    }
    let up = up.body(req.into_body()).unwrap();
    let resp = match client.request(up).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(e.to_string()))
                .unwrap())
        }
    };
    let (parts, body) = resp.into_parts();
    let counted = s.clone();
    let drop_after = (fault == Fault::DropMidRange && ranged)
        .then(|| {
            parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(|n| n / 2)
        })
        .flatten();
    let mut sent = 0u64;
    let stream = body.map(move |chunk| {
        let mut chunk = chunk?;
        if let Some(limit) = drop_after {
            if sent + chunk.len() as u64 > limit {
                let keep = (limit - sent) as usize;
                if keep == 0 {
                    return Err(Box::<dyn std::error::Error + Send + Sync>::from(
                        "connection dropped by the test proxy",
                    ));
                }
                chunk = chunk.slice(..keep);
            }
        }
        sent += chunk.len() as u64;
        counted
            .body_bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(chunk)
    });
    Ok(Response::from_parts(parts, Body::wrap_stream(stream)))
}
