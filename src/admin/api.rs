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

/// Longest a change (revocation, grant, unlock) waits for the gate driver
/// to queue and apply it.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(4);

const TEXT: &str = "text/plain; charset=utf-8";
/// The Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON: &str = "application/json";

/// What is known about the connection a request came on.
#[derive(Debug, Clone)]
pub(super) struct Conn {
    pub peer: SocketAddr,
    /// Over TLS, with a client certificate verified against `client_ca`.
    pub client_verified: bool,
    /// Who that certificate names (`client-cert CN=...`), for audit lines.
    pub client: Option<Arc<str>>,
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

    /// Who may make a change, as its audit line names them (never the
    /// token itself); `None` when no one may.
    fn mutator(&self, headers: &HeaderMap, conn: &Conn) -> Option<Arc<str>> {
        if conn.client_verified {
            return Some(conn.client.clone().unwrap_or_else(|| Arc::from("client-cert")));
        }
        if self.token_presented(headers) {
            return Some(Arc::from("token"));
        }
        self.loopback_trusted
            .then(|| Arc::from(format!("loopback {}", conn.peer).as_str()))
    }

    fn may_read(&self, headers: &HeaderMap, conn: &Conn) -> bool {
        !self.reads_need_token || self.authenticated(headers, conn)
    }

    /// A verified client certificate, or the bearer token.
    fn authenticated(&self, headers: &HeaderMap, conn: &Conn) -> bool {
        conn.client_verified || self.token_presented(headers)
    }

    /// The configured bearer token was presented.
    fn token_presented(&self, headers: &HeaderMap) -> bool {
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
    /// Who asked, for manual grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    expires_in_ms: u64,
    /// The replica that gave it, when several share one gate.
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
}

impl GrantView {
    fn new(g: &crate::gate::Grant, now: std::time::Instant, replica: Option<Arc<str>>) -> Self {
        let (user, by) = match &g.method {
            GrantMethod::Spa { user } => (Some(user.to_string()), None),
            GrantMethod::Manual { by } => (None, Some(by.to_string())),
            GrantMethod::Knock => (None, None),
        };
        Self {
            service: g.service.to_string(),
            source: g.source,
            method: g.method.as_label(),
            user,
            by,
            expires_in_ms: millis(g.expires_at.saturating_duration_since(now)),
            replica: replica.map(|r| r.to_string()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One lockout as `GET /v1/lockouts` lists it.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct LockoutView {
    /// The address, or the IPv6 prefix lockouts are kept per.
    source: IpAddr,
    /// `trap` or `strikes`.
    reason: &'static str,
    /// When it began and when it ends, RFC 3339 (UTC, to the second).
    since: String,
    until: String,
    expires_in_ms: u64,
}

/// The longest manual grant: a break-glass grant is for an incident, not
/// a standing rule (that belongs in the config).
pub(super) const MAX_MANUAL_GRANT: Duration = Duration::from_secs(24 * 60 * 60);

/// The body of `POST /v1/grants`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    service: String,
    source: String,
    /// `"30s"`, `"2h"` or a number of seconds.
    duration: DurationSpec,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum DurationSpec {
    Secs(u64),
    Text(String),
}

impl DurationSpec {
    fn parse(&self) -> Result<Duration, String> {
        let d = match self {
            DurationSpec::Secs(n) => Duration::from_secs(*n),
            DurationSpec::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| format!("duration {t:?}: {e}"))?,
        };
        if d.is_zero() {
            return Err("duration must be more than zero".into());
        }
        if d > MAX_MANUAL_GRANT {
            return Err(format!(
                "duration {} is over the {}h a manual grant may last",
                humantime::format_duration(d),
                MAX_MANUAL_GRANT.as_secs() / 3600
            ));
        }
        Ok(d)
    }
}

/// Answers one request.
pub(super) async fn handle(req: &Request<Bytes>, ctx: &Context, auth: &Auth, conn: &Conn) -> Response<Full<Bytes>> {
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
    let listing = path == "/metrics" || path == "/v1/grants" || path == "/v1/lockouts";
    if read && listing && !auth.may_read(req.headers(), conn) {
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
        "/v1/grants" if method == Method::POST => match mutator(req, auth, conn) {
            Some(by) => manual_grant(ctx, req.body(), by, conn).await,
            None => forbidden(),
        },
        "/v1/grants" if !read => not_allowed("GET, HEAD, POST"),
        "/metrics" | "/healthz" | "/readyz" | "/v1/lockouts" if !read => not_allowed("GET, HEAD"),
        "/metrics" => {
            crate::metrics::lockouts_active(ctx.guard.lockouts_active(ctx.clock.now()));
            match crate::metrics::render() {
                Some(text) => respond(StatusCode::OK, PROMETHEUS_TEXT, text),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder is installed\n"),
            }
        }
        "/healthz" if ctx.readiness.is_healthy() => text(StatusCode::OK, "ok\n"),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "failed\n"),
        "/readyz" => match ctx.readiness.phase() {
            Phase::Ready => text(StatusCode::OK, "ready\n"),
            phase => text(StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", phase.as_str())),
        },
        "/v1/grants" => grants(ctx),
        "/v1/lockouts" => lockouts(ctx),
        _ => {
            if let Some(source) = path
                .strip_prefix("/v1/lockouts/")
                .filter(|s| !s.is_empty() && !s.contains('/'))
            {
                if method != Method::DELETE {
                    return not_allowed("DELETE");
                }
                return match mutator(req, auth, conn) {
                    Some(by) => unlock(ctx, &percent_decode(source), by, conn).await,
                    None => forbidden(),
                };
            }
            match path.strip_prefix("/v1/grants/").and_then(|rest| rest.split_once('/')) {
                Some((service, source)) if !service.is_empty() && !source.contains('/') => {
                    if method != Method::DELETE {
                        return not_allowed("DELETE");
                    }
                    match mutator(req, auth, conn) {
                        Some(by) => revoke(ctx, &percent_decode(service), &percent_decode(source), by, conn).await,
                        None => forbidden(),
                    }
                }
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    }
}

/// Who makes a change; `None` (logged) when no one may.
fn mutator(req: &Request<Bytes>, auth: &Auth, conn: &Conn) -> Option<Arc<str>> {
    let by = auth.mutator(req.headers(), conn);
    if by.is_none() {
        tracing::info!(peer = %conn.peer, path = req.uri().path(), "admin: mutating request refused");
    }
    by
}

fn forbidden() -> Response<Full<Bytes>> {
    text(
        StatusCode::FORBIDDEN,
        "forbidden: changes need the bearer token, a verified client certificate, or a trusted loopback admin listener\n",
    )
}

fn grants(ctx: &Context) -> Response<Full<Bytes>> {
    let now = ctx.clock.now();
    let mut list: Vec<GrantView> = ctx
        .store
        .snapshot()
        .into_iter()
        .filter(|g| g.expires_at > now)
        .map(|g| GrantView::new(&g, now, ctx.store.given_by(&g.service, g.source)))
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

async fn revoke(ctx: &Context, service: &str, source: &str, by: Arc<str>, conn: &Conn) -> Response<Full<Bytes>> {
    let Ok(source) = source.parse::<IpAddr>().map(|s| s.to_canonical()) else {
        return text(StatusCode::BAD_REQUEST, "the source must be an IP address\n");
    };
    if !ctx.store.allows(service, source, ctx.clock.now()) {
        return text(StatusCode::NOT_FOUND, "no such grant\n");
    }
    tracing::info!(peer = %conn.peer, %service, %source, by = %by, "admin: revoking a grant");
    // The driver answers once the store refuses the source, so a 204 means
    // new connections from it are already refused.
    match ctx
        .driver
        .revoke_by(Arc::from(service), source, by, REVOKE_TIMEOUT)
        .await
    {
        Ok(Some(_)) => empty(StatusCode::NO_CONTENT),
        Ok(None) => text(StatusCode::NOT_FOUND, "no such grant\n"),
        Err(e) => driver_error(e),
    }
}

fn driver_error(e: DriverError) -> Response<Full<Bytes>> {
    match e {
        DriverError::Busy => text(StatusCode::SERVICE_UNAVAILABLE, "the gate is busy: try again\n"),
        DriverError::Stopped => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        DriverError::Refused => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "refused: the state store is unavailable, and nothing that opens is given without it; try again\n",
        ),
    }
}

/// `POST /v1/grants`: an operator's break-glass grant, given through the
/// gate like any other (so a replicated log carries it) and answered once
/// the store admits the source: 201 with the grant.
async fn manual_grant(ctx: &Context, body: &Bytes, by: Arc<str>, conn: &Conn) -> Response<Full<Bytes>> {
    let request: GrantRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the body must be JSON like {{\"service\": \"NAME\", \"source\": \"IP\", \"duration\": \"30m\"}}: {e}\n"),
            )
        }
    };
    let Ok(source) = request.source.trim().parse::<IpAddr>().map(|s| s.to_canonical()) else {
        return text(StatusCode::BAD_REQUEST, "source must be an IP address\n");
    };
    let duration = match request.duration.parse() {
        Ok(d) => d,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let service = request.service;
    tracing::info!(peer = %conn.peer, %service, %source, by = %by, "admin: granting");
    match ctx
        .driver
        .grant(Arc::from(service.as_str()), source, by, duration, REVOKE_TIMEOUT)
        .await
    {
        Ok(Some(grant)) => match serde_json::to_string(&GrantView::new(
            &grant,
            ctx.clock.now(),
            ctx.store.given_by(&grant.service, grant.source),
        )) {
            Ok(json) => respond(StatusCode::CREATED, JSON, json),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the grant: {e}\n"),
            ),
        },
        Ok(None) => text(StatusCode::NOT_FOUND, format!("no service {service:?}\n")),
        Err(e) => driver_error(e),
    }
}

fn lockouts(ctx: &Context) -> Response<Full<Bytes>> {
    let now = ctx.clock.now();
    let wall = ctx.clock.wall();
    let at = |instant: std::time::Instant| {
        let t = if instant <= now {
            wall.checked_sub(now.duration_since(instant))
        } else {
            wall.checked_add(instant.duration_since(now))
        };
        t.map_or_else(String::new, |t| humantime::format_rfc3339_seconds(t).to_string())
    };
    let list: Vec<LockoutView> = ctx
        .guard
        .lockouts(now)
        .into_iter()
        .map(|l| LockoutView {
            source: l.source,
            reason: l.why.as_label(),
            since: at(l.since),
            until: at(l.until),
            expires_in_ms: millis(l.until.saturating_duration_since(now)),
        })
        .collect();
    match serde_json::to_string(&list) {
        Ok(json) => respond(StatusCode::OK, JSON, json),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the lockouts: {e}\n"),
        ),
    }
}

/// `DELETE /v1/lockouts/{source}`: 204 once the source may knock again.
async fn unlock(ctx: &Context, source: &str, by: Arc<str>, conn: &Conn) -> Response<Full<Bytes>> {
    let Ok(source) = source.parse::<IpAddr>().map(|s| s.to_canonical()) else {
        return text(StatusCode::BAD_REQUEST, "the source must be an IP address\n");
    };
    tracing::info!(peer = %conn.peer, %source, by = %by, "admin: clearing a lockout");
    match ctx.driver.unlock(source, by, REVOKE_TIMEOUT).await {
        Ok(Some(_)) => empty(StatusCode::NO_CONTENT),
        Ok(None) => text(StatusCode::NOT_FOUND, "no such lockout\n"),
        Err(e) => driver_error(e),
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

pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
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
            guard: Arc::new(crate::guard::SourceGuard::new(crate::config::Limits {
                per_source_rate: 1000,
                per_source_burst: 1000,
                lockout_after: 3,
                lockout_for: Duration::from_secs(60),
                max_tracked_sources: 16,
                ipv6_prefix: 64,
            })),
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
            client: None,
            probes_only: false,
        }
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::new()).unwrap()
    }

    async fn call(f: &Fixture, auth: &Auth, c: &Conn, req: Request<Bytes>) -> (StatusCode, HeaderMap, String) {
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
                match request {
                    DriverRequest::Revoke { service, source, reply }
                    | DriverRequest::RevokeBy {
                        service, source, reply, ..
                    } => {
                        let _ = reply.send(store.revoke(&service, source));
                    }
                    _ => {}
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
            ("DELETE", "/v1/grants", "GET, HEAD, POST"),
            ("POST", "/v1/lockouts", "GET, HEAD"),
            ("GET", "/v1/lockouts/127.0.0.1", "DELETE"),
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
        let c = &conn(false);
        let call = |path: &str| {
            let req = request("DELETE", path, &[]);
            let ctx = ctx.clone();
            let auth = &auth;
            async move { handle(&req, &ctx, auth, c).await.status() }
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
                ..c.clone()
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
        for path in ["/v1/grants", "/v1/lockouts", "/metrics"] {
            let (status, headers, _) = call(&f, &auth, &c, request("GET", path, &[])).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        let with = request("GET", "/v1/grants", &[("authorization", &bearer)]);
        assert_eq!(call(&f, &auth, &c, with).await.0, StatusCode::OK);
        let with = request("GET", "/v1/lockouts", &[("authorization", &bearer)]);
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
    fn a_change_is_audited_as_made_by_its_credential_never_the_token() {
        let token = "0123456789abcdef";
        let bearer = format!("Bearer {token}");
        let with_token = request("DELETE", "/", &[("authorization", &bearer)]);
        let without = request("DELETE", "/", &[]);
        let trusted = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let tokened = Auth::new(&admin(true, Some(token)), LOOPBACK.parse().unwrap());
        let plain = conn(false);
        let who = |auth: &Auth, req: &Request<Bytes>, c: &Conn| auth.mutator(req.headers(), c).map(|b| b.to_string());
        assert_eq!(
            who(&trusted, &without, &plain).as_deref(),
            Some("loopback 127.0.0.1:40000")
        );
        assert_eq!(who(&tokened, &with_token, &plain).as_deref(), Some("token"));
        assert_eq!(who(&tokened, &without, &plain), None);
        let named = Conn {
            client: Some("client-cert CN=ops".into()),
            ..conn(true)
        };
        assert_eq!(who(&tokened, &without, &named).as_deref(), Some("client-cert CN=ops"));
        assert_eq!(who(&tokened, &without, &conn(true)).as_deref(), Some("client-cert"));
    }

    /// Plays the gate for manual grants: grants every service but "nope".
    fn granting_gate(mut f: Fixture) -> Context {
        let clock = f.clock.clone();
        tokio::spawn(async move {
            while let Some(request) = f.gate.recv().await {
                if let DriverRequest::Grant {
                    service,
                    source,
                    by,
                    duration,
                    reply,
                } = request
                {
                    let grant = (&*service != "nope").then(|| Grant {
                        service,
                        source,
                        method: GrantMethod::Manual { by },
                        expires_at: clock.now() + duration,
                    });
                    let _ = reply.send(grant);
                }
            }
        });
        f.ctx
    }

    #[tokio::test]
    async fn a_manual_grant_is_validated_then_given_through_the_gate() {
        let ctx = granting_gate(fixture());
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        let post = |body: &str| {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/grants")
                .body(Bytes::from(body.to_owned()))
                .unwrap();
            let (ctx, auth) = (ctx.clone(), &auth);
            async move {
                let response = handle(&req, &ctx, auth, &conn(false)).await;
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let (status, body) = post(r#"{"service": "echo", "source": "127.0.0.5", "duration": "90s"}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"service": "echo", "source": "127.0.0.5", "method": "manual", "user": null,
                "by": "loopback 127.0.0.1:40000", "expires_in_ms": 90_000})
        );
        let (status, _) = post(r#"{"service": "echo", "source": "::1", "duration": 600}"#).await;
        assert_eq!(status, StatusCode::CREATED, "seconds as a number");
        for (body, want) in [
            (
                r#"{"service": "nope", "source": "127.0.0.5", "duration": "1m"}"#,
                StatusCode::NOT_FOUND,
            ),
            (
                r#"{"service": "echo", "source": "127.0.0.5", "duration": "25h"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                r#"{"service": "echo", "source": "127.0.0.5", "duration": 0}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                r#"{"service": "echo", "source": "127.0.0.5", "duration": "soon"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                r#"{"service": "echo", "source": "somewhere", "duration": "1m"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"{"service": "echo", "source": "127.0.0.5"}"#, StatusCode::BAD_REQUEST),
            (
                r#"{"service": "echo", "source": "127.0.0.5", "duration": "1m", "x": 1}"#,
                StatusCode::BAD_REQUEST,
            ),
            ("", StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(post(body).await.0, want, "{body}");
        }
        // Refused without credentials, like every change.
        let refusing = Auth::new(&admin(false, None), LOOPBACK.parse().unwrap());
        let req = Request::builder()
            .method("POST")
            .uri("/v1/grants")
            .body(Bytes::from(
                r#"{"service": "echo", "source": "127.0.0.5", "duration": "1m"}"#,
            ))
            .unwrap();
        assert_eq!(
            handle(&req, &ctx, &refusing, &conn(false)).await.status(),
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn lockouts_are_listed_with_their_reason_and_times() {
        let f = fixture();
        let auth = Auth::new(&admin(true, None), LOOPBACK.parse().unwrap());
        f.ctx.guard.lock_out("127.0.0.7".parse().unwrap(), f.clock.now());
        f.clock.advance(Duration::from_secs(10));
        let (status, headers, body) = call(&f, &auth, &conn(false), request("GET", "/v1/lockouts", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], JSON);
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        let list = got.as_array().unwrap();
        assert_eq!(list.len(), 1, "{body}");
        assert_eq!(list[0]["source"], "127.0.0.7");
        assert_eq!(list[0]["reason"], "trap");
        assert_eq!(list[0]["expires_in_ms"], 50_000);
        let since = humantime::parse_rfc3339(list[0]["since"].as_str().unwrap()).unwrap();
        let until = humantime::parse_rfc3339(list[0]["until"].as_str().unwrap()).unwrap();
        assert_eq!(until.duration_since(since).unwrap(), Duration::from_secs(60));
    }

    #[test]
    fn percent_decoding_handles_escapes_and_keeps_malformed_text() {
        assert_eq!(percent_decode("%3A%3a1"), "::1");
        assert_eq!(percent_decode("127.0.0.1"), "127.0.0.1");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
