//! The HTTP side of `kiln serve`, on hyper: HTTP/1.1 with keep-alive and chunked bodies,
//! timeouts per connection, `--api-key` and `--cors-origin`, the routes, Server-Sent Events,
//! and a graceful stop on SIGTERM or Ctrl-C. It never generates: completions become jobs for
//! the slots, and their events become the answer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, bad_request, error_body, Answer, HttpError, Stream};
use super::log;
use super::metrics::{Metrics, Outcome};
use super::slots::{Event, Refused, Slots};

/// Largest request body accepted (a prompt of a few hundred thousand characters).
const MAX_BODY: usize = 8 << 20;
/// Largest request head (request line and headers); hyper answers 431 beyond it.
const MAX_HEAD: usize = 64 << 10;
/// How long a client may take to send a request's head, and may stay idle between requests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connections get to finish their last answer after the slots stopped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

type HttpBody = BoxBody<Bytes, Infallible>;

/// Everything a request is answered from.
pub struct App {
    pub api: api::Context,
    pub slots: Slots,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    pub cors_origins: Vec<String>,
    /// Completion requests so far, for their ids.
    pub served: AtomicU64,
}

/// Serves `listener` until SIGTERM or Ctrl-C, then stops taking requests, lets running and
/// queued generations finish for up to `grace`, cancels what is left and closes.
pub async fn serve(
    listener: std::net::TcpListener,
    app: Arc<App>,
    grace: Duration,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let app = Arc::clone(&app);
                    let service = service_fn(move |req| {
                        let app = Arc::clone(&app);
                        async move { Ok::<_, Infallible>(handle(&app, req).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        // A client's broken connection is its own business.
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close.
                    log(format_args!("accepting a connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut stop => break,
        }
    }
    drop(listener);
    app.slots.stop_accepting();
    let load = app.slots.load();
    log(format_args!(
        "stopping: {} running, {} queued; {:.1} s to finish",
        load.busy,
        load.queued,
        grace.as_secs_f64()
    ));
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        let load = app.slots.load();
        if load.busy == 0 && load.queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.slots.cancel_all();
    if tokio::time::timeout(CLOSE_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        log("closing connections that did not finish");
    }
    Ok(())
}

/// Resolves on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<HttpBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, value: &Value) -> Response<HttpBody> {
    full(status, "application/json", value.to_string())
}

fn error_response(e: &HttpError) -> Response<HttpBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, &error_body(e));
    match e.status {
        401 => {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        503 => {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    r
}

/// Answers one request, with CORS headers when its origin is allowed.
async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<HttpBody> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let mut response = route(app, req).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        log(format_args!("{method} {path}: {}", response.status()));
    }
    let allowed = origin.filter(|o| {
        app.cors_origins
            .iter()
            .any(|allowed| allowed == "*" || o.as_bytes() == allowed.as_bytes())
    });
    if let Some(origin) = allowed {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if method == Method::OPTIONS {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Authorization, Content-Type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    response
}

const ENDPOINTS: &str = "GET /health, GET /metrics, GET /v1/models, POST /v1/completions, \
                         POST /v1/chat/completions";

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<HttpBody> {
    let path = req.uri().path().to_owned();
    let known = matches!(
        path.as_str(),
        "/health"
            | "/metrics"
            | "/v1/models"
            | "/models"
            | "/v1/completions"
            | "/completion"
            | "/completions"
            | "/v1/chat/completions"
            | "/chat/completions"
    );
    if !known {
        return error_response(&HttpError {
            status: 404,
            message: format!("no endpoint {path} ({ENDPOINTS})"),
        });
    }
    if req.method() == Method::OPTIONS {
        let mut r = full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        return r;
    }
    if path != "/health" && !authorized(app, &req) {
        return error_response(&HttpError {
            status: 401,
            message: "a valid `Authorization: Bearer <key>` header is needed (--api-key)".into(),
        });
    }
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/health") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.metrics.render(&app.slots.load()),
        ),
        (Method::GET, "/v1/models" | "/models") => {
            let facts = app.api.model.facts();
            json_response(
                StatusCode::OK,
                &json!({ "object": "list", "data": [{
                    "id": facts.name, "object": "model", "owned_by": "kiln",
                    "meta": { "n_ctx": app.slots.context, "n_vocab": facts.vocab_size },
                }]}),
            )
        }
        (Method::POST, "/v1/completions" | "/completion" | "/completions") => {
            completion(app, req, false).await
        }
        (Method::POST, "/v1/chat/completions" | "/chat/completions") => {
            completion(app, req, true).await
        }
        (method, _) => error_response(&HttpError {
            status: 405,
            message: format!("{method} is not allowed on {path}"),
        }),
    }
}

/// Whether the request carries the server's key (always, when it has none).
fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    let Some(key) = &app.api_key else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compared in full whatever the first difference, so timing tells nothing.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Reads a body of at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn read_body(body: Incoming) -> Result<Bytes, HttpError> {
    let limited = Limited::new(body, MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(HttpError {
            status: 408,
            message: format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        }),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(HttpError {
            status: 413,
            message: format!("the body is larger than the {MAX_BODY} bytes accepted"),
        }),
        Ok(Err(e)) => Err(bad_request(format!("reading the body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Sets a request's cancel flag when dropped before [`CancelOnDrop::finish`]: the client went
/// away (hyper drops the answer's future or body), so its generation stops.
struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    fn finish(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A completion request: checked off the async threads, queued for a slot, answered whole
/// or streamed.
async fn completion(app: &Arc<App>, req: Request<Incoming>, chat: bool) -> Response<HttpBody> {
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let checker = Arc::clone(app);
    let parsed = tokio::task::spawn_blocking(move || api::parse(&checker.api, &body, chat)).await;
    let parsed = match parsed {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            app.metrics.count(Outcome::Failed);
            return error_response(&e);
        }
        Err(_) => {
            app.metrics.count(Outcome::Failed);
            return error_response(&HttpError {
                status: 500,
                message: "checking the request failed unexpectedly".into(),
            });
        }
    };
    let serial = app.served.fetch_add(1, Ordering::Relaxed) + 1;
    let id = format!("{}-{serial}", if chat { "chatcmpl" } else { "cmpl" });
    let (events, mut rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let (job, shape) = parsed.job(id.clone(), events, Arc::clone(&cancel));
    if let Err(refused) = app.slots.submit(job) {
        app.metrics.count(Outcome::Rejected);
        let message = match refused {
            Refused::Full(queued) => {
                format!("every slot is busy and {queued} requests are waiting; retry later")
            }
            Refused::Stopping => "the server is shutting down".into(),
        };
        return error_response(&HttpError {
            status: 503,
            message,
        });
    }
    let mut guard = CancelOnDrop(Some(cancel));
    let answer = Answer {
        shape,
        model: Arc::clone(&app.api.model),
        id,
        serial,
        created: unix_time(),
    };
    if answer.shape.stream {
        let mut r = Response::new(
            Sse {
                rx,
                stream: Stream::new(answer),
                pending: VecDeque::new(),
                done: false,
                guard,
                metrics: Arc::clone(&app.metrics),
            }
            .boxed(),
        );
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return r;
    }
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(_) => {}
            Event::Done(done) => {
                guard.finish();
                app.metrics.count(Outcome::Answered);
                return json_response(StatusCode::OK, &answer.complete(&done));
            }
            Event::Failed(message) => {
                guard.finish();
                app.metrics.count(Outcome::Failed);
                return error_response(&bad_request(message));
            }
        }
    }
    app.metrics.count(Outcome::Failed);
    error_response(&HttpError {
        status: 500,
        message: "the slot ended without an answer".into(),
    })
}

/// A streamed answer: each event of the slot becomes `data: {json}` lines, `data: [DONE]`
/// last. Dropped early (the client went away), it cancels the generation.
struct Sse {
    rx: UnboundedReceiver<Event>,
    stream: Stream,
    /// Events formatted, not yet sent.
    pending: VecDeque<Bytes>,
    done: bool,
    guard: CancelOnDrop,
    metrics: Arc<Metrics>,
}

impl Sse {
    fn queue(&mut self, values: impl IntoIterator<Item = Value>) {
        for v in values {
            self.pending
                .push_back(Bytes::from(format!("data: {v}\n\n")));
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.pending
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
        self.guard.finish();
        self.metrics.count(outcome);
    }
}

impl Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Event::Text(piece))) => {
                    let chunk = this.stream.text(&piece);
                    this.queue(chunk);
                }
                Poll::Ready(Some(Event::Done(done))) => {
                    let chunks = this.stream.done(&done);
                    this.queue(chunks);
                    this.finish(Outcome::Answered);
                }
                Poll::Ready(Some(Event::Failed(message))) => {
                    this.queue([error_body(&bad_request(message))]);
                    this.finish(Outcome::Failed);
                }
                Poll::Ready(None) => {
                    this.queue([error_body(&HttpError {
                        status: 500,
                        message: "the slot ended without an answer".into(),
                    })]);
                    this.finish(Outcome::Failed);
                }
            }
        }
    }
}
