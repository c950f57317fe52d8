//! The dashboard's HTTP face: access checks (token, CSRF, `Host`), the embedded assets,
//! and the JSON API. Every error is a JSON document `{"error": "one line"}` with the
//! status that fits it (400 bad input, 401/403 access, 404 unknown, 409 busy).

use super::state::State;
use serde_json::{json, Value};
use standby_engine::vault::PointSpec;
use standby_engine::Error;
use std::io::Read;
use std::sync::Arc;
use tiny_http::{Header, Method, Request, Response};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The cookie `/?token=T` sets, which the page's requests then carry.
const COOKIE: &str = "standby_token";
/// The header every POST carries the CSRF token in.
pub const CSRF_HEADER: &str = "X-Standby-CSRF";
/// A request body larger than this is refused.
const BODY_MAX_BYTES: u64 = 64 << 10;

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(v).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
    fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply::json(status, &json!({"error": msg.into()}))
    }
    fn asset(content_type: &'static str, body: &str) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: body.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }
}

/// The status an engine error is answered with.
fn from_error(e: &Error) -> Reply {
    let status = match e {
        Error::NotFound(_) => 404,
        Error::Invalid(_) => 400,
        Error::Conflict(_) | Error::Locked(_) => 409,
        _ => 500,
    };
    Reply::error(status, crate::output::one_line(e))
}

pub fn handle(state: &Arc<State>, mut req: Request) {
    let reply = answer(state, &mut req);
    let mut resp = Response::from_data(reply.body).with_status_code(reply.status);
    let mut headers = vec![
        ("Content-Type", reply.content_type.to_string()),
        ("Cache-Control", "no-store".to_string()),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("X-Frame-Options", "DENY".to_string()),
        (
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'".to_string(),
        ),
    ];
    headers.extend(reply.headers);
    for (k, v) in headers {
        if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            resp = resp.with_header(h);
        }
    }
    let _ = req.respond(resp);
}

fn header<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Compare secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a `Host` header names this machine's loopback (a page from elsewhere that
/// rebinds its name to 127.0.0.1 still sends its own name).
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn cookie<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    header(req, "Cookie")?.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A query's value of `key` (percent-decoded).
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answer(state: &Arc<State>, req: &mut Request) -> Reply {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let method = req.method().clone();

    match &state.token {
        None => {
            if let Some(host) = header(req, "Host") {
                if !loopback_host(host) {
                    return Reply::error(
                        403,
                        format!("Host '{host}' is not this machine's loopback"),
                    );
                }
            }
        }
        Some(token) => {
            if let Some(given) = query_value(query, "token") {
                if method == Method::Get && path == "/" && same(&given, token) {
                    // Trade the token in the address for a cookie, and drop it from the bar.
                    return Reply {
                        status: 303,
                        content_type: "text/plain",
                        body: b"see /".to_vec(),
                        headers: vec![
                            ("Location", "/".to_string()),
                            (
                                "Set-Cookie",
                                format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
                            ),
                        ],
                    };
                }
            }
            let bearer = header(req, "Authorization").and_then(|h| h.strip_prefix("Bearer "));
            let ok = bearer.is_some_and(|b| same(b.trim(), token))
                || cookie(req, COOKIE).is_some_and(|c| same(c, token));
            if !ok {
                return Reply::error(
                    401,
                    "this dashboard needs its token: send Authorization: Bearer TOKEN, or open /?token=TOKEN",
                );
            }
        }
    }

    if method != Method::Get && method != Method::Post {
        return Reply::error(405, format!("{method} is not allowed here"));
    }
    if method == Method::Post {
        let csrf = header(req, CSRF_HEADER).unwrap_or("");
        if !same(csrf, &state.csrf) {
            return Reply::error(
                403,
                format!("a POST needs this dashboard's CSRF token in the {CSRF_HEADER} header"),
            );
        }
    }

    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    match (&method, parts.as_slice()) {
        (Method::Get, [""]) => Reply::asset(
            "text/html; charset=utf-8",
            &INDEX_HTML.replace("{{CSRF}}", &state.csrf),
        ),
        (Method::Get, ["app.js"]) => Reply::asset("text/javascript; charset=utf-8", APP_JS),
        (Method::Get, ["app.css"]) => Reply::asset("text/css; charset=utf-8", APP_CSS),
        (Method::Get, ["api", "vms"]) => match state.status_all() {
            Ok(docs) => Reply::json(200, &json!({"vms": docs})),
            Err(e) => from_error(&e),
        },
        (Method::Get, ["api", "events"]) => Reply::json(200, &state.events()),
        (Method::Get, ["api", "vms", vm]) => match state.status_one(vm) {
            Ok(doc) => Reply::json(200, &doc),
            Err(e) => from_error(&e),
        },
        (Method::Get, ["api", "vms", vm, "points"]) => match state.points(vm) {
            Ok(doc) => Reply::json(200, &doc),
            Err(e) => from_error(&e),
        },
        (Method::Get, ["api", "vms", vm, "rpo"]) => {
            with_vm(state, vm, |s| Reply::json(200, &s.rpo_history(vm)))
        }
        (Method::Get, ["api", "vms", vm, "test-failover"]) => with_vm(state, vm, |s| {
            // The job first, then the status: a job reported finished has its effect in
            // the status read after it (read the other way round, a cleanup that ended in
            // between showed "succeeded" beside the test failover it had removed).
            let job = s.job(vm);
            let up = s
                .status_one(vm)
                .map(|d| d["test_failover"].clone())
                .unwrap_or(Value::Null);
            Reply::json(200, &json!({"vm": vm, "job": job, "test_failover": up}))
        }),
        (Method::Post, ["api", "vms", vm, "test-failover"]) => {
            let body = match read_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            with_vm(state, vm, |s| test_failover(s, vm, &body))
        }
        (Method::Post, ["api", "vms", vm, "test-failover-cleanup"]) => {
            with_vm(state, vm, |s| match s.start_cleanup(vm) {
                Ok(job) => Reply::json(202, &json!({"vm": vm, "job": job})),
                Err(e) => from_error(&e),
            })
        }
        // The vault's metrics (what `--metrics` serves), behind the same access checks.
        (Method::Get, ["metrics"]) => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::render_vault(&state.root, None).into_bytes(),
            headers: Vec::new(),
        },
        _ => Reply::error(404, format!("no such page: {method} {path}")),
    }
}

/// Answer with `f` if the vault has `vm`, else 404.
fn with_vm(state: &Arc<State>, vm: &str, f: impl FnOnce(&Arc<State>) -> Reply) -> Reply {
    match state.vm_names() {
        Ok(names) if names.iter().any(|n| n == vm) => f(state),
        Ok(_) => Reply::error(404, format!("no VM named '{vm}' in the vault")),
        Err(e) => from_error(&e),
    }
}

/// The request's body as a JSON object (an empty body is `{}`); else a 400 reply.
fn read_json(req: &mut Request) -> Result<Value, Reply> {
    let mut body = Vec::new();
    if let Err(e) = req
        .as_reader()
        .take(BODY_MAX_BYTES + 1)
        .read_to_end(&mut body)
    {
        return Err(Reply::error(400, format!("cannot read the body: {e}")));
    }
    if body.len() as u64 > BODY_MAX_BYTES {
        return Err(Reply::error(
            400,
            format!("the body is larger than {BODY_MAX_BYTES} bytes"),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(Reply::error(400, "the body must be a JSON object")),
        Err(e) => Err(Reply::error(400, format!("the body is not JSON: {e}"))),
    }
}

/// `{"point": SPEC, "network": NET?}` → a background test failover (202 with its job).
fn test_failover(state: &Arc<State>, vm: &str, body: &Value) -> Reply {
    let point = match &body["point"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => {
            return Reply::error(
                400,
                "the body needs \"point\" (e.g. \"latest-processed\" or a point id)",
            )
        }
        other => return Reply::error(400, format!("\"point\" must be a string, not {other}")),
    };
    let spec: PointSpec = match point.parse() {
        Ok(s) => s,
        Err(e) => return from_error(&e),
    };
    let network = match &body["network"] {
        Value::Null => None,
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        other => {
            return Reply::error(
                400,
                format!("\"network\" must be a non-empty string, not {other}"),
            )
        }
    };
    match state.start_test_failover(vm, spec, point, network) {
        Ok(job) => Reply::json(202, &json!({"vm": vm, "job": job})),
        Err(e) => from_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert!(loopback_host("127.0.0.1:8080"));
        assert!(loopback_host("localhost:8080"));
        assert!(loopback_host("[::1]:8080"));
        assert!(loopback_host("127.0.0.2"));
        assert!(!loopback_host("evil.example:8080"));
        assert!(!loopback_host("10.0.0.1:8080"));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            query_value("a=1&token=x%2By", "token").as_deref(),
            Some("x+y")
        );
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
