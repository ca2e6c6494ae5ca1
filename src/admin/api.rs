//! The admin endpoint's routes, who may use them, and which `Host` a
//! loopback listener answers. Pure request-to-response logic over the
//! shared [`Context`]: no sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::{Context, Phase};
use crate::config::Admin;
use crate::driver::DriverError;
use crate::gate::Method as GrantMethod;
use crate::secret::{ct_eq, Secret};

/// Longest a revocation waits for the gate driver to queue and apply it.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(4);

const TEXT: &str = "text/plain; charset=utf-8";
/// The Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON: &str = "application/json";

/// What is known about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conn {
    pub peer: SocketAddr,
    /// Over TLS, with a client certificate verified against `client_ca`.
    pub client_verified: bool,
    /// Taken from the room kept for probes: only `/healthz` and `/readyz`
    /// are answered.
    pub probes_only: bool,
}

/// Who may use which endpoints (see the module doc of `admin`).
#[derive(Debug)]
pub(super) struct Auth {
    /// The listener is bound to a loopback address: requests must name a
    /// loopback host (DNS rebinding).
    loopback_listener: bool,
    /// The listener is on loopback, the config trusts that, and no token
    /// is configured (a configured token is required everywhere).
    loopback_trusted: bool,
    token: Option<Secret>,
    /// `/metrics` and `/v1/grants` need what changes need, loopback trust
    /// aside.
    reads_need_token: bool,
}

impl Auth {
    pub(super) fn new(config: &Admin, local: SocketAddr) -> Self {
        let loopback_listener = local.ip().to_canonical().is_loopback();
        Self {
            loopback_listener,
            loopback_trusted: config.allow_loopback_mutations && loopback_listener && config.token.is_none(),
            token: config.token.clone(),
            reads_need_token: config.require_token_for_reads,
        }
    }

    fn may_mutate(&self, headers: &HeaderMap, conn: &Conn) -> bool {
        self.loopback_trusted || self.authenticated(headers, conn)
    }

    fn may_read(&self, headers: &HeaderMap, conn: &Conn) -> bool {
        !self.reads_need_token || self.authenticated(headers, conn)
    }

    /// A verified client certificate, or the bearer token.
    fn authenticated(&self, headers: &HeaderMap, conn: &Conn) -> bool {
        if conn.client_verified {
            return true;
        }
        match (&self.token, bearer(headers)) {
            (Some(token), Some(presented)) => ct_eq(token.expose(), presented),
            _ => false,
        }
    }

    /// Whether a request may be answered on this listener: on loopback,
    /// only one that names a loopback host. A web page a local browser
    /// opened can reach a loopback port through a DNS name rebound to
    /// 127.0.0.1, but its requests still carry that name. Clients that
    /// send no `Host` at all are not browsers.
    fn host_allowed<B>(&self, req: &Request<B>) -> bool {
        if !self.loopback_listener {
            return true;
        }
        let host = match req.uri().authority() {
            Some(a) => Some(a.host().as_bytes()),
            None => req.headers().get(header::HOST).map(|h| h.as_bytes()),
        };
        host.is_none_or(is_loopback_host)
    }
}

/// `localhost`, a name under `.localhost` (RFC 6761: resolved locally,
/// never through DNS), or a loopback address; a port may follow.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => {
                return v6
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|a| IpAddr::V6(a).to_canonical().is_loopback());
            }
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// The credentials of an `Authorization: Bearer ...` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

/// One active grant as `GET /v1/grants` lists it.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct GrantView {
    service: String,
    source: IpAddr,
    method: &'static str,
    /// The SPA user, for SPA grants.
    user: Option<String>,
    expires_in_ms: u64,
    /// The replica that gave it, when several share one gate.
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
}

/// Answers one request.
pub(super) async fn handle<B>(req: &Request<B>, ctx: &Context, auth: &Auth, conn: &Conn) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    let read = method == Method::GET || method == Method::HEAD;
    if !auth.host_allowed(req) {
        tracing::info!(peer = %conn.peer, "admin: request for a host that is not loopback refused");
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: this admin endpoint listens on loopback and answers only requests for localhost or a loopback address\n",
        );
    }
    let probe = path == "/healthz" || path == "/readyz";
    if conn.probes_only && !probe {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: every admin connection is taken; only /healthz and /readyz are answered now\n",
        );
    }
    if read && (path == "/metrics" || path == "/v1/grants") && !auth.may_read(req.headers(), conn) {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: reads need the bearer token or a verified client certificate\n",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    match path {
        "/metrics" | "/healthz" | "/readyz" | "/v1/grants" if !read => not_allowed("GET, HEAD"),
        "/metrics" => match crate::metrics::render() {
            Some(text) => respond(StatusCode::OK, PROMETHEUS_TEXT, text),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder is installed\n"),
        },
        "/healthz" if ctx.readiness.is_healthy() => text(StatusCode::OK, "ok\n"),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "failed\n"),
        "/readyz" => match ctx.readiness.phase() {
            Phase::Ready => text(StatusCode::OK, "ready\n"),
            phase => text(StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", phase.as_str())),
        },
        "/v1/grants" => grants(ctx),
        _ => match path.strip_prefix("/v1/grants/").and_then(|rest| rest.split_once('/')) {
            Some((service, source)) if !service.is_empty() && !source.contains('/') => {
                if method != Method::DELETE {
                    return not_allowed("DELETE");
                }
                if !auth.may_mutate(req.headers(), conn) {
                    tracing::info!(peer = %conn.peer, path, "admin: mutating request refused");
                    return text(
                        StatusCode::FORBIDDEN,
                        "forbidden: changes need the bearer token, a verified client certificate, or a trusted loopback admin listener\n",
                    );
                }
                revoke(ctx, &percent_decode(service), &percent_decode(source), conn).await
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

fn grants(ctx: &Context) -> Response<Full<Bytes>> {
    let now = ctx.clock.now();
    let mut list: Vec<GrantView> = ctx
        .store
        .snapshot()
        .into_iter()
        .filter(|g| g.expires_at > now)
        .map(|g| GrantView {
            service: g.service.to_string(),
            source: g.source,
            method: g.method.as_label(),
            user: match &g.method {
                GrantMethod::Spa { user } => Some(user.to_string()),
                GrantMethod::Knock => None,
            },
            expires_in_ms: u64::try_from(g.expires_at.duration_since(now).as_millis()).unwrap_or(u64::MAX),
            replica: ctx.store.given_by(&g.service, g.source).map(|r| r.to_string()),
        })
        .collect();
    list.sort_by(|a, b| (&a.service, a.source).cmp(&(&b.service, b.source)));
    match serde_json::to_string(&list) {
        Ok(json) => respond(StatusCode::OK, JSON, json),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the grants: {e}\n"),
        ),
    }
}

async fn revoke(ctx: &Context, service: &str, source: &str, conn: &Conn) -> Response<Full<Bytes>> {
    let Ok(source) = source.parse::<IpAddr>().map(|s| s.to_canonical()) else {
        return text(StatusCode::BAD_REQUEST, "the source must be an IP address\n");
    };
    if !ctx.store.allows(service, source, ctx.clock.now()) {
        return text(StatusCode::NOT_FOUND, "no such grant\n");
    }
    tracing::info!(peer = %conn.peer, %service, %source, "admin: revoking a grant");
    // The driver answers once the store refuses the source, so a 204 means
    // new connections from it are already refused.
    match ctx.driver.revoke(Arc::from(service), source, REVOKE_TIMEOUT).await {
        Ok(Some(_)) => empty(StatusCode::NO_CONTENT),
        Ok(None) => text(StatusCode::NOT_FOUND, "no such grant\n"),
        Err(DriverError::Busy) => text(StatusCode::SERVICE_UNAVAILABLE, "the gate is busy: try again\n"),
        Err(DriverError::Stopped) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

/// Decodes `%XX` escapes (an IPv6 source may arrive as `%3A`); anything
/// malformed is kept as written and fails to parse later.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    respond(status, TEXT, body)
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Readiness;
    use crate::clock::{Clock, ManualClock};
    use crate::driver::{DriverHandle, Request as DriverRequest};
    use crate::gate::Grant;
    use crate::store::{GrantStore, MemoryStore};
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;

    struct Fixture {
        ctx: Context,
        clock: ManualClock,
        store: Arc<MemoryStore>,
        gate: mpsc::Receiver<DriverRequest>,
    }

    fn fixture() -> Fixture {
        let clock = ManualClock::new();
        let store = Arc::new(MemoryStore::new());
        let (driver, gate) = DriverHandle::channel();
        let ctx = Context {
            store: store.clone(),
            clock: Arc::new(clock.clone()),
            driver,
            readiness: Readiness::new(),
        };
        Fixture {
            ctx,
            clock,
            store,
            gate,
        }
    }

    fn admin(allow_loopback_mutations: bool, token: Option<&str>) -> Admin {
        Admin {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            token: token.map(|t| Secret::from_slice(t.as_bytes())),
            allow_loopback_mutations,
            require_token_for_reads: false,
        }
    }

    const LOOPBACK: &str = "127.0.0.1:9464";

    fn conn(client_verified: bool) -> Conn {
        Conn {
            peer: "127.0.0.1:40000".parse().unwrap(),
            client_verified,
            probes_only: false,
        }
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    async fn call(f: &Fixture, auth: &Auth, c: &Conn, req: Request<()>) -> (StatusCode, HeaderMap, String) {
        let response = handle(&req, &f.ctx, auth, c).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn grant(f: &Fixture, service: &str, source: &str, method: GrantMethod, secs: u64) {
        f.store.insert(&Grant {
            service: service.into(),
            source: source.parse().unwrap(),
            method,
            expires_at: f.clock.now() + Duration::from_secs(secs),
        });
    }

    /// Plays the gate: applies each revocation to the store.
    fn gate(mut f: Fixture) -> (Context, ManualClock, Arc<MemoryStore>) {
        let store = f.store.clone();
        tokio::spawn(async move {
            while let Some(request) = f.gate.recv().await {
                if let DriverRequest::Revoke { service, source, reply } = request {
                    let _ = reply.send(store.revoke(&service, source));
                }
            }
        });
        (f.ctx, f.clock, f.store)
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
        let f = fixture();
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let c = conn(false);
        for path in [
            "/",
            "/nope",
            "/v1",
            "/v1/grants/echo",
            "/v1/grants/echo/1.2.3.4/x",
            "/v1/grants//1.2.3.4",
        ] {
            let (status, _, _) = call(&f, &auth, &c, request("GET", path, &[])).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
        for (method, path, allow) in [
            ("POST", "/metrics", "GET, HEAD"),
            ("DELETE", "/healthz", "GET, HEAD"),
            ("PUT", "/readyz", "GET, HEAD"),
            ("DELETE", "/v1/grants", "GET, HEAD"),
            ("GET", "/v1/grants/echo/127.0.0.1", "DELETE"),
        ] {
            let (status, headers, _) = call(&f, &auth, &c, request(method, path, &[])).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers[header::ALLOW], allow, "{method} {path}");
        }
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_latch_and_healthz_is_always_ok() {
        let f = fixture();
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let c = conn(false);
        let get = |path| request("GET", path, &[]);
        assert_eq!(call(&f, &auth, &c, get("/readyz")).await.2, "starting\n");
        assert_eq!(
            call(&f, &auth, &c, get("/readyz")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(call(&f, &auth, &c, get("/healthz")).await.0, StatusCode::OK);
        f.ctx.readiness.set_ready();
        assert_eq!(call(&f, &auth, &c, get("/readyz")).await.0, StatusCode::OK);
        f.ctx.readiness.set_draining();
        let (status, _, body) = call(&f, &auth, &c, get("/readyz")).await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
        assert_eq!(call(&f, &auth, &c, get("/healthz")).await.0, StatusCode::OK);
        // A core task died: liveness fails, so a supervisor restarts us.
        f.ctx.readiness.set_failed();
        let (status, _, body) = call(&f, &auth, &c, get("/healthz")).await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "failed\n"));
    }

    #[tokio::test]
    async fn grants_lists_active_grants_sorted_with_their_remaining_time() {
        let f = fixture();
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        grant(&f, "pg", "127.0.0.9", GrantMethod::Knock, 30);
        grant(&f, "echo", "::1", GrantMethod::Spa { user: "alice".into() }, 10);
        grant(&f, "echo", "127.0.0.2", GrantMethod::Knock, 2);
        f.clock.advance(Duration::from_millis(2_500));
        let (status, headers, body) = call(&f, &auth, &conn(false), request("GET", "/v1/grants", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], JSON);
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            got,
            serde_json::json!([
                {"service": "echo", "source": "::1", "method": "spa", "user": "alice", "expires_in_ms": 7500},
                {"service": "pg", "source": "127.0.0.9", "method": "knock", "user": null, "expires_in_ms": 27500},
            ]),
            "the expired grant of 127.0.0.2 is not listed"
        );
    }

    #[tokio::test]
    async fn revoke_applies_through_the_gate_and_answers_204_then_404() {
        let f = fixture();
        grant(&f, "echo", "127.0.0.1", GrantMethod::Knock, 30);
        grant(&f, "echo", "::1", GrantMethod::Knock, 30);
        let (ctx, clock, store) = gate(f);
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let c = conn(false);
        let call = |path: &str| {
            let req = request("DELETE", path, &[]);
            let ctx = ctx.clone();
            let auth = &auth;
            async move { handle(&req, &ctx, auth, &c).await.status() }
        };
        assert_eq!(call("/v1/grants/echo/127.0.0.1").await, StatusCode::NO_CONTENT);
        assert!(!store.allows("echo", "127.0.0.1".parse().unwrap(), clock.now()));
        assert!(store.allows("echo", "::1".parse().unwrap(), clock.now()));
        assert_eq!(call("/v1/grants/echo/127.0.0.1").await, StatusCode::NOT_FOUND);
        assert_eq!(call("/v1/grants/other/%3A%3A1").await, StatusCode::NOT_FOUND);
        assert_eq!(call("/v1/grants/echo/%3A%3A1").await, StatusCode::NO_CONTENT);
        assert_eq!(call("/v1/grants/echo/not-an-ip").await, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn mutations_need_a_trusted_loopback_a_token_or_a_verified_client() {
        let f = fixture();
        let token = "0123456789abcdef";
        let c = conn(false);
        // Nothing is granted: an authorised request gets 404, a refused one 403.
        let delete = |auth: Option<&str>| {
            let value = auth.map(|a| a.to_string());
            let headers: Vec<(&str, String)> = value.iter().map(|v| ("authorization", v.clone())).collect();
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request("DELETE", "/v1/grants/echo/127.0.0.1", &headers)
        };
        let cases: [(Auth, Option<String>, bool, StatusCode); 11] = [
            // A configured token is required on loopback too.
            (
                Auth::new(&admin(true, Some(token)), LOOPBACK.parse().unwrap()),
                None,
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(true, Some(token)), LOOPBACK.parse().unwrap()),
                Some(format!("Bearer {token}")),
                false,
                StatusCode::NOT_FOUND,
            ),
            (
                Auth::new(&admin(true, None), LOOPBACK.parse().unwrap()),
                None,
                false,
                StatusCode::NOT_FOUND,
            ),
            (
                Auth::new(&admin(true, None), "0.0.0.0:9464".parse().unwrap()),
                None,
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(true, None), "[::1]:9464".parse().unwrap()),
                None,
                false,
                StatusCode::NOT_FOUND,
            ),
            (
                Auth::new(&admin(false, None), LOOPBACK.parse().unwrap()),
                None,
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(false, Some(token)), LOOPBACK.parse().unwrap()),
                None,
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(false, Some(token)), LOOPBACK.parse().unwrap()),
                Some(format!("Bearer {token}x")),
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(false, Some(token)), LOOPBACK.parse().unwrap()),
                Some(format!("bearer  {token} ")),
                false,
                StatusCode::NOT_FOUND,
            ),
            (
                Auth::new(&admin(false, None), LOOPBACK.parse().unwrap()),
                Some(format!("Bearer {token}")),
                false,
                StatusCode::FORBIDDEN,
            ),
            (
                Auth::new(&admin(false, None), "10.0.0.1:9464".parse().unwrap()),
                None,
                true,
                StatusCode::NOT_FOUND,
            ),
        ];
        for (i, (auth, header, verified, want)) in cases.iter().enumerate() {
            let c = Conn {
                client_verified: *verified,
                ..c
            };
            let (status, _, _) = call(&f, auth, &c, delete(header.as_deref())).await;
            assert_eq!(status, *want, "case {i}");
        }
        // Reads need nothing.
        let auth = Auth::new(&admin(false, Some(token)), "0.0.0.0:9464".parse().unwrap());
        assert_eq!(
            call(&f, &auth, &c, request("GET", "/v1/grants", &[])).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_loopback_listener_answers_only_loopback_hosts() {
        let f = fixture();
        let c = conn(false);
        let loopback = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let public = Auth::new(&admin(true, None), "0.0.0.0:9464".parse().unwrap());
        let cases = [
            ("localhost", true),
            ("LOCALHOST:9464", true),
            ("localhost.", true),
            ("admin.localhost:9464", true),
            ("127.0.0.1:9464", true),
            ("127.3.2.1", true),
            ("[::1]:9464", true),
            ("[::1]", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("attacker.example", false),
            ("attacker.example:9464", false),
            ("localhost.attacker.example", false),
            ("127.0.0.1.nip.io", false),
            ("10.0.0.1:9464", false),
            ("[2001:db8::1]:9464", false),
            ("[::1", false),
        ];
        for (host, ok) in cases {
            let req = request("GET", "/healthz", &[("host", host)]);
            let (status, _, _) = call(&f, &loopback, &c, req).await;
            let want = if ok { StatusCode::OK } else { StatusCode::FORBIDDEN };
            assert_eq!(status, want, "Host: {host}");
            let req = request("GET", "/healthz", &[("host", host)]);
            assert_eq!(
                call(&f, &public, &c, req).await.0,
                StatusCode::OK,
                "Host: {host} off loopback"
            );
        }
        // Absolute-form targets carry the host in the URI.
        let req = request("GET", "http://attacker.example/healthz", &[("host", "localhost")]);
        assert_eq!(call(&f, &loopback, &c, req).await.0, StatusCode::FORBIDDEN);
        // No Host at all (not a browser) is answered.
        assert_eq!(
            call(&f, &loopback, &c, request("GET", "/healthz", &[])).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn reads_may_need_the_token_and_probes_never_do() {
        let f = fixture();
        let token = "0123456789abcdef";
        let config = Admin {
            require_token_for_reads: true,
            ..admin(true, Some(token))
        };
        let auth = Auth::new(&config, "0.0.0.0:9464".parse().unwrap());
        let c = conn(false);
        let bearer = format!("Bearer {token}");
        for path in ["/v1/grants", "/metrics"] {
            let (status, headers, _) = call(&f, &auth, &c, request("GET", path, &[])).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        let with = request("GET", "/v1/grants", &[("authorization", &bearer)]);
        assert_eq!(call(&f, &auth, &c, with).await.0, StatusCode::OK);
        let verified = conn(true);
        assert_eq!(
            call(&f, &auth, &verified, request("GET", "/v1/grants", &[])).await.0,
            StatusCode::OK
        );
        for path in ["/healthz", "/readyz"] {
            let (status, _, _) = call(&f, &auth, &c, request("GET", path, &[])).await;
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{path}");
        }
    }

    #[tokio::test]
    async fn a_connection_from_the_probe_reserve_is_answered_for_probes_only() {
        let f = fixture();
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let c = Conn {
            probes_only: true,
            ..conn(false)
        };
        assert_eq!(
            call(&f, &auth, &c, request("GET", "/healthz", &[])).await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(&f, &auth, &c, request("GET", "/v1/grants", &[])).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn percent_decoding_handles_escapes_and_keeps_malformed_text() {
        assert_eq!(percent_decode("%3A%3a1"), "::1");
        assert_eq!(percent_decode("127.0.0.1"), "127.0.0.1");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
