//! Deterministic fault injection for an operator run as a child process:
//! a proxy on loopback in front of the real kube-apiserver. The operator's
//! kubeconfig points at the proxy, which forwards every request with the
//! admin client (`kube::Client::send`, watch responses streamed through)
//! and counts the mutating ones (POST, PUT, PATCH, DELETE).
//!
//! Armed with `(n, point)`, it SIGKILLs the operator at the `n`-th mutating
//! request: [`KillPoint::BeforeForwarding`] (the API server never sees it)
//! or [`KillPoint::AfterApplied`] (the API server applied it; the response
//! never reaches the operator). Every request the operator sent before it
//! died either reached the API server before the kill or never does:
//! connections are tagged with the operator incarnation that opened them,
//! and a dead incarnation's requests are refused.
//!
//! It also keeps a log of every mutating request and the object the API
//! server returned for it (what was applied), with the test's [`notes`]
//! as they were when the request arrived, so a test can check what the
//! operator wrote against what it could have known at that moment.
//!
//! [`notes`]: ApiServerProxy::note

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Body as AxumBody;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use kube::Client;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Where, relative to the API server applying it, the kill lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KillPoint {
    /// The request never reaches the API server.
    BeforeForwarding,
    /// The API server applied the request; its response never returns.
    AfterApplied,
}

/// One mutating request the operator sent, in arrival order.
#[derive(Clone, Debug)]
pub struct Mutation {
    /// 1 for the first mutating request of the run.
    pub index: u64,
    pub method: Method,
    pub path: String,
    /// The API server's status code; `None` when it never saw the request.
    pub status: Option<u16>,
    /// The object the API server returned (what it applied), on success.
    pub object: Option<serde_json::Value>,
    /// The test's notes when the request arrived.
    pub notes: BTreeSet<String>,
}

impl Mutation {
    /// Whether the API server applied it.
    pub fn applied(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

/// Where a kill landed.
#[derive(Clone, Debug)]
pub struct Kill {
    pub point: KillPoint,
    /// The mutating request it landed on.
    pub at: Mutation,
}

/// Whether a request (method, path) is one to kill at.
pub type Accepts = Arc<dyn Fn(&Method, &str) -> bool + Send + Sync>;

/// Which mutating request a kill lands on.
#[derive(Clone)]
pub enum Target {
    /// The n-th of the run (1 for the first).
    Nth(u64),
    /// The first whose method and path the predicate accepts.
    First(Accepts),
}

impl Target {
    fn hits(&self, index: u64, method: &Method, path: &str) -> bool {
        match self {
            Self::Nth(n) => *n == index,
            Self::First(accepts) => accepts(method, path),
        }
    }
}

struct ProxyState {
    mutations: u64,
    arm: Option<(Target, KillPoint)>,
    victim: Option<Child>,
    notes: BTreeSet<String>,
    log: Vec<Mutation>,
    kills: Vec<Kill>,
}

struct Shared {
    client: Client,
    /// The operator incarnation: bumped once a killed operator is reaped.
    incarnation: Arc<AtomicU64>,
    state: Mutex<ProxyState>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The proxy; stops serving when dropped.
pub struct ApiServerProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ApiServerProxy {
    /// Serves on a free loopback port, forwarding with `client`.
    pub async fn start(client: Client) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let incarnation = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            client,
            incarnation: incarnation.clone(),
            state: Mutex::new(ProxyState {
                mutations: 0,
                arm: None,
                victim: None,
                notes: BTreeSet::new(),
                log: Vec::new(),
                kills: Vec::new(),
            }),
        });
        let router = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let listener = TaggingListener {
            inner: listener,
            incarnation,
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<ConnectionTag>(),
            )
            .await;
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// A kubeconfig that points at the proxy (plain HTTP, no credentials:
    /// the proxy authenticates upstream).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{}\n\
             users:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\n\
             current-context: proxy\n",
            self.addr
        )
    }

    /// Kills the operator at the `n`-th mutating request (counted from the
    /// start of the run), once.
    pub fn arm(&self, n: u64, point: KillPoint) {
        self.arm_at(Target::Nth(n), point);
    }

    /// Kills the operator at the first mutating request `target` names,
    /// once.
    pub fn arm_at(&self, target: Target, point: KillPoint) {
        self.shared.state().arm = Some((target, point));
    }

    /// No kill from now on (one that already landed stays in `kills`).
    pub fn disarm(&self) {
        self.shared.state().arm = None;
    }

    /// The operator process the proxy kills when armed; it replaces one
    /// that was killed.
    pub fn set_victim(&self, child: Child) {
        let mut state = self.shared.state();
        if let Some(mut old) = state.victim.replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// Whether the operator process still runs.
    pub fn victim_alive(&self) -> bool {
        self.shared
            .state()
            .victim
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the operator (the end of a run, not a fault).
    pub fn stop_victim(&self) {
        if let Some(mut child) = self.shared.state().victim.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Records a fact; every later request carries it in its `notes`. The
    /// note is taken under the same lock that admits requests, so a request
    /// either arrived before the note or carries it.
    pub fn note(&self, note: impl Into<String>) {
        self.shared.state().notes.insert(note.into());
    }

    /// How many mutating requests the operator has sent so far.
    pub fn mutations(&self) -> u64 {
        self.shared.state().mutations
    }

    /// Every mutating request so far, in arrival order.
    pub fn log(&self) -> Vec<Mutation> {
        let mut log = self.shared.state().log.clone();
        log.sort_by_key(|mutation| mutation.index);
        log
    }

    /// The kills so far.
    pub fn kills(&self) -> Vec<Kill> {
        self.shared.state().kills.clone()
    }
}

impl Drop for ApiServerProxy {
    fn drop(&mut self) {
        self.server.abort();
        self.stop_victim();
    }
}

/// A listener that tags each connection with the operator incarnation that
/// was current when it was accepted.
struct TaggingListener {
    inner: TcpListener,
    incarnation: Arc<AtomicU64>,
}

#[derive(Clone, Copy, Debug)]
struct ConnectionTag {
    incarnation: u64,
}

impl Listener for TaggingListener {
    type Io = TcpStream;
    type Addr = ConnectionTag;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((stream, _)) = self.inner.accept().await {
                let _ = stream.set_nodelay(true);
                let tag = ConnectionTag {
                    incarnation: self.incarnation.load(Ordering::SeqCst),
                };
                return (stream, tag);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ConnectionTag {
            incarnation: self.incarnation.load(Ordering::SeqCst),
        })
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TaggingListener>> for ConnectionTag {
    fn connect_info(stream: IncomingStream<'_, TaggingListener>) -> Self {
        *stream.remote_addr()
    }
}

fn is_mutating(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

fn refused() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "operator killed").into_response()
}

/// What to do with a mutating request, decided when it arrives.
enum Admission {
    Refuse,
    Forward { index: u64, notes: BTreeSet<String> },
    KillBefore,
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(tag): ConnectInfo<ConnectionTag>,
    request: Request,
) -> Response {
    let current = || shared.incarnation.load(Ordering::SeqCst) == tag.incarnation;
    if !current() {
        return refused();
    }
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), ToString::to_string);
    let mutating = is_mutating(&parts.method);

    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return (StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    let admission = if mutating {
        let mut state = shared.state();
        if !current() {
            Admission::Refuse
        } else {
            state.mutations += 1;
            let index = state.mutations;
            let notes = state.notes.clone();
            if armed(
                &state,
                index,
                &parts.method,
                &path,
                KillPoint::BeforeForwarding,
            ) {
                let at = Mutation {
                    index,
                    method: parts.method.clone(),
                    path: path.clone(),
                    status: None,
                    object: None,
                    notes,
                };
                kill_locked(&shared, &mut state, KillPoint::BeforeForwarding, at);
                Admission::KillBefore
            } else {
                Admission::Forward { index, notes }
            }
        }
    } else {
        Admission::Forward {
            index: 0,
            notes: BTreeSet::new(),
        }
    };
    let (index, notes) = match admission {
        Admission::Refuse | Admission::KillBefore => return refused(),
        Admission::Forward { index, notes } => (index, notes),
    };

    let mut upstream = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(&path);
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT] {
        if let Some(value) = parts.headers.get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .body(kube::client::Body::from(body))
        .expect("a request the operator sent is a valid request");
    let response = match shared.client.send(upstream).await {
        Ok(response) => response,
        Err(error) => {
            if mutating {
                record(&shared, index, &parts.method, &path, None, None, notes);
            }
            return (StatusCode::BAD_GATEWAY, error.to_string()).into_response();
        }
    };
    let (response_parts, response_body) = response.into_parts();
    let headers = forwarded_headers(&response_parts.headers);
    if !mutating {
        // Watches stream through as the API server sends them.
        let mut response = Response::new(AxumBody::new(response_body));
        *response.status_mut() = response_parts.status;
        *response.headers_mut() = headers;
        return response;
    }

    let Ok(bytes) = axum::body::to_bytes(AxumBody::new(response_body), 64 << 20).await else {
        record(&shared, index, &parts.method, &path, None, None, notes);
        return (StatusCode::BAD_GATEWAY, "response cut short").into_response();
    };
    let status = response_parts.status.as_u16();
    let object = response_parts
        .status
        .is_success()
        .then(|| serde_json::from_slice(&bytes).ok())
        .flatten();
    let mutation = Mutation {
        index,
        method: parts.method.clone(),
        path,
        status: Some(status),
        object,
        notes,
    };
    {
        let mut state = shared.state();
        state.log.push(mutation.clone());
        if armed(
            &state,
            index,
            &mutation.method,
            &mutation.path,
            KillPoint::AfterApplied,
        ) {
            kill_locked(&shared, &mut state, KillPoint::AfterApplied, mutation);
            return refused();
        }
    }
    let mut response = Response::new(AxumBody::from(bytes));
    *response.status_mut() = response_parts.status;
    *response.headers_mut() = headers;
    response
}

/// Whether the armed kill lands on this request at this point.
fn armed(state: &ProxyState, index: u64, method: &Method, path: &str, point: KillPoint) -> bool {
    state
        .arm
        .as_ref()
        .is_some_and(|(target, at)| *at == point && target.hits(index, method, path))
}

fn record(
    shared: &Shared,
    index: u64,
    method: &Method,
    path: &str,
    status: Option<u16>,
    object: Option<serde_json::Value>,
    notes: BTreeSet<String>,
) {
    shared.state().log.push(Mutation {
        index,
        method: method.clone(),
        path: path.to_string(),
        status,
        object,
        notes,
    });
}

/// SIGKILLs the operator and waits until it is reaped, then moves to the
/// next incarnation: every connection the dead one opened is refused from
/// now on. Runs under the state lock, so no other request of the dead
/// incarnation is admitted meanwhile.
fn kill_locked(shared: &Shared, state: &mut ProxyState, point: KillPoint, at: Mutation) {
    state.arm = None;
    if let Some(mut child) = state.victim.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    shared.incarnation.fetch_add(1, Ordering::SeqCst);
    state.kills.push(Kill { point, at });
}

fn forwarded_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(value) = from.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    headers
        .entry(header::CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    headers
}
