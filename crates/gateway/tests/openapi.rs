//! `schemas/openapi.json` cannot drift from the router: every `.route(...)` of `src/http.rs`
//! (read as source text, so a new route fails here until it is described) must be an operation of
//! the document, every operation of the document must be a route, and every operation must be
//! complete enough to use (an `operationId`, at least one response, its path parameters, a
//! security requirement that matches whether the handler takes a `Caller`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

const HTTP_RS: &str = include_str!("../src/http.rs");
const OPENAPI: &str = include_str!("../../../schemas/openapi.json");

/// The methods axum's `routing` module has a function for (and OpenAPI an operation for).
const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// One method of one route: (method, path, handler).
type Route = (String, String, String);

/// A tiny cursor over the source text: just enough Rust to read `.route(...)` calls.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8, what: &str) {
        assert!(self.eat(c), "http.rs: expected `{}` {what} at byte {}: {:?}", c as char, self.i, self.context());
    }

    fn context(&self) -> String {
        String::from_utf8_lossy(&self.s[self.i..(self.i + 60).min(self.s.len())]).into_owned()
    }

    /// A string literal (no escapes needed for paths).
    fn string(&mut self) -> String {
        self.expect(b'"', "opening a path literal");
        let start = self.i;
        while self.peek().is_some_and(|c| c != b'"') {
            self.i += 1;
        }
        let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.expect(b'"', "closing a path literal");
        s
    }

    /// A path such as `get` or `axum::routing::put`; returns its last segment.
    fn path_ident(&mut self) -> String {
        self.skip_ws();
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':') {
            self.i += 1;
        }
        let full = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        assert!(!full.is_empty(), "http.rs: expected a method function at byte {}: {:?}", self.i, self.context());
        full.rsplit("::").next().unwrap_or_default().to_owned()
    }

    /// The text inside a balanced `( ... )`, string literals included.
    fn parens(&mut self) -> String {
        self.expect(b'(', "opening a call");
        let start = self.i;
        let mut depth = 1;
        while depth > 0 {
            let c = self.peek().unwrap_or_else(|| panic!("http.rs: unbalanced parentheses after byte {start}"));
            self.i += 1;
            match c {
                b'(' => depth += 1,
                b')' => depth -= 1,
                b'"' => {
                    while self.peek().is_some_and(|c| c != b'"') {
                        self.i += if self.peek() == Some(b'\\') { 2 } else { 1 };
                    }
                    self.i += 1;
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&self.s[start..self.i - 1]).trim().to_owned()
    }
}

/// Every (method, path, handler) of `.route("<path>", <method>(<handler>)[.<method>(...)]*)` in
/// http.rs; chained calls that are not methods (`.layer(...)`) are skipped.
fn routes_in_source(src: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for (at, _) in src.match_indices(".route(") {
        let line_start = src[..at].rfind('\n').map_or(0, |n| n + 1);
        if src[line_start..at].trim_start().starts_with("//") {
            continue;
        }
        let mut c = Cursor { s: src.as_bytes(), i: at + ".route(".len() };
        let path = c.string();
        c.expect(b',', "after the path");
        let mut methods = 0;
        loop {
            let name = c.path_ident();
            let args = c.parens();
            if METHODS.contains(&name.as_str()) {
                let handler = args.rsplit("::").next().unwrap_or_default().trim().to_owned();
                out.push((name.to_uppercase(), path.clone(), handler));
                methods += 1;
            }
            if !c.eat(b'.') {
                break;
            }
        }
        c.eat(b',');
        c.expect(b')', "closing .route(");
        assert!(methods > 0, "route {path} has no method this test recognises ({METHODS:?}); describe its form here");
    }
    out
}

/// Whether the handler `name` takes the authenticated `Caller` (parameters of its `async fn`).
fn takes_caller(src: &str, name: &str) -> bool {
    let sig = format!("async fn {name}(");
    let at = src.find(&sig).unwrap_or_else(|| panic!("http.rs: no `{sig}`"));
    let mut c = Cursor { s: src.as_bytes(), i: at + sig.len() - 1 };
    c.parens().contains("Caller")
}

fn document() -> Value {
    serde_json::from_str(OPENAPI).unwrap_or_else(|e| panic!("schemas/openapi.json is not JSON: {e}"))
}

/// Every (METHOD, path) operation of the document.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    let mut out = BTreeMap::new();
    for (path, item) in paths {
        let item = item.as_object().unwrap_or_else(|| panic!("path item {path} is not an object"));
        for (key, op) in item {
            if METHODS.contains(&key.as_str()) {
                out.insert((key.to_uppercase(), path.clone()), op.clone());
            }
        }
    }
    out
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("non-local $ref {r}"));
            doc.pointer(pointer).unwrap_or_else(|| panic!("$ref {r} points nowhere"))
        }
        None => v,
    }
}

#[test]
fn the_source_parser_reads_every_form_of_route() {
    let src = r#"
        Router::new()
            .route("/a", get(a))
            // .route("/commented", get(nope))
            .route("/b/{id}", post(b_create).get(b_list))
            .route("/c", axum::routing::put(c).layer(DefaultBodyLimit::disable()))
            .route(
                "/d",
                delete(crate::x::d).patch(e),
            )
    "#;
    let routes = routes_in_source(src);
    let got: Vec<(&str, &str, &str)> = routes.iter().map(|(m, p, h)| (m.as_str(), p.as_str(), h.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("GET", "/a", "a"),
            ("POST", "/b/{id}", "b_create"),
            ("GET", "/b/{id}", "b_list"),
            ("PUT", "/c", "c"),
            ("DELETE", "/d", "d"),
            ("PATCH", "/d", "e"),
        ]
    );
}

#[test]
fn every_route_is_documented_and_every_operation_is_a_route() {
    let routes = routes_in_source(HTTP_RS);
    assert!(routes.len() >= 29, "found only {} routes in http.rs: is the parser still reading it? {routes:?}", routes.len());
    let in_source: BTreeSet<(String, String)> = routes.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    assert_eq!(in_source.len(), routes.len(), "a (method, path) is routed twice");
    let in_doc: BTreeSet<(String, String)> = operations(&document()).into_keys().collect();
    let undocumented: Vec<String> = in_source.difference(&in_doc).map(|(m, p)| format!("{m} {p}")).collect();
    let unrouted: Vec<String> = in_doc.difference(&in_source).map(|(m, p)| format!("{m} {p}")).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes of http.rs missing from schemas/openapi.json: {undocumented:?}; operations of schemas/openapi.json that http.rs does not route: {unrouted:?}"
    );
}

#[test]
fn every_operation_is_complete() {
    let doc = document();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "an OpenAPI 3.1 document");
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer", "a bearer security scheme");
    let mut ids = BTreeSet::new();
    for ((method, path), op) in operations(&doc) {
        let name = format!("{method} {path}");
        let id = op["operationId"].as_str().filter(|s| !s.is_empty()).unwrap_or_else(|| panic!("{name}: no operationId"));
        assert!(ids.insert(id.to_owned()), "{name}: operationId {id} is used twice");
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{name}: no responses"));
        assert!(!responses.is_empty(), "{name}: no responses");
        for (status, r) in responses {
            assert!(status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()), "{name}: response key {status} is not a status");
            assert!(resolve(&doc, r)["description"].is_string(), "{name} {status}: a response needs a description");
        }
        assert!(op["security"].is_array(), "{name}: state its security (`[]` for none)");
        // Every `{param}` of the path is a path parameter, and nothing else is.
        let in_path: BTreeSet<String> =
            path.split('/').filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).map(str::to_owned).collect();
        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .map(|ps| ps.iter().map(|p| resolve(&doc, p)).filter(|p| p["in"] == "path").filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        assert_eq!(in_path, declared, "{name}: path parameters");
    }
}

#[test]
fn security_matches_the_handlers() {
    let doc = document();
    let ops = operations(&doc);
    for (method, path, handler) in routes_in_source(HTTP_RS) {
        let Some(op) = ops.get(&(method.clone(), path.clone())) else { continue };
        let schemes: Vec<&str> =
            op["security"].as_array().into_iter().flatten().filter_map(|req| req.as_object()).flat_map(|req| req.keys().map(String::as_str)).collect();
        if takes_caller(HTTP_RS, &handler) {
            assert!(schemes.contains(&"bearer"), "{method} {path}: `{handler}` takes a Caller, so the operation needs bearer security");
        } else if schemes.is_empty() {
            // Documented as open: fine for a handler without a Caller.
        } else {
            // Only the WebSocket upgrade checks a token by hand (header or `access_token`).
            assert_eq!(path, "/v1/ws", "{method} {path}: `{handler}` takes no Caller but the operation requires a token");
        }
    }
}

#[test]
fn every_reference_resolves() {
    fn walk(doc: &Value, v: &Value, at: &str) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    let target = r.strip_prefix('#').and_then(|p| doc.pointer(p));
                    assert!(target.is_some(), "{at}: $ref {r} points nowhere");
                }
                for (k, child) in m {
                    walk(doc, child, &format!("{at}/{k}"));
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(doc, child, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    let doc = document();
    walk(&doc, &doc, "#");
}
