//! A scripted Kubernetes API server in the test process, under real `kube::Client`s: the
//! kube-rs mocked-service pattern (a tower service in place of the HTTP connection), with
//! just enough of the API server's behaviour for the operator's calls — CachePool list and
//! watch, JSON patches with `test` operations, server-side apply of the status and
//! annotations, `metadata.generation` on spec changes, deletion held by finalizers, Events,
//! and Leases with server-side-apply ownership conflicts (which leader election relies on).
//!
//! Every request is logged (who sent it, method, path, content type, body), so a test can
//! list the exact writes it expects and fail on a missing or extra one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use cachepool_crds::pool::CachePool;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Call {
    /// The client that sent it (`ApiServer::client(who)`).
    pub who: String,
    pub at: Instant,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    pub status: u16,
}

impl Call {
    /// `METHOD path` with the patch kind, for readable assertions.
    pub fn line(&self) -> String {
        let kind = match self.content_type.as_str() {
            "application/json-patch+json" => " (json-patch)",
            "application/apply-patch+yaml" => " (apply)",
            "application/merge-patch+json" => " (merge)",
            "application/strategic-merge-patch+json" => " (strategic)",
            _ => "",
        };
        format!("{} {}{kind}", self.method, self.path)
    }

    /// Whether it changed anything (every method but GET).
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Default)]
struct State {
    revision: u64,
    /// CachePools by `namespace/name`.
    pools: BTreeMap<String, Value>,
    /// Leases by `namespace/name`, with the field manager owning `holderIdentity`.
    leases: BTreeMap<String, (Value, Option<String>)>,
    /// Pods by `namespace/name` (the operator replicas' own, for the leader label).
    pods: BTreeMap<String, Value>,
    /// Secrets by `namespace/name` (the pod provider's admin tokens).
    secrets: BTreeMap<String, Value>,
    events: Vec<Value>,
    calls: Vec<Call>,
    /// Open CachePool watches: (namespace or all, sender of watch lines).
    watches: Vec<(Option<String>, mpsc::UnboundedSender<Bytes>)>,
    /// Changes to CachePools, for watches that start behind: (revision, type, object).
    changes: Vec<(u64, &'static str, Value)>,
    /// Requests that fail (a partition): (client, part of the path); they answer 503.
    cut_off: Vec<(String, String)>,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Records a change to a pool and tells the watches.
    fn changed(&mut self, kind: &'static str, object: &Value) {
        let revision = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(self.revision);
        self.changes.push((revision, kind, object.clone()));
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let line = watch_line(kind, object);
        self.watches.retain(|(ns, sender)| {
            if ns.is_some() && *ns != namespace {
                return !sender.is_closed();
            }
            sender.send(line.clone()).is_ok()
        });
    }

    /// Stores a pool with a new resourceVersion; a pool being deleted whose finalizers are
    /// all gone is removed instead.
    fn store_pool(&mut self, key: &str, mut object: Value) -> Value {
        let revision = self.bump();
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let finalizers_left = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if object["metadata"]["deletionTimestamp"].is_string() && !finalizers_left {
            self.pools.remove(key);
            self.changed("DELETED", &object);
        } else {
            self.pools.insert(key.to_owned(), object.clone());
            self.changed("MODIFIED", &object);
        }
        object
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The server (cheap to clone; every clone is the same server).
#[derive(Clone, Default)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap_or_default()
}

fn failure(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "code": code, "reason": reason, "message": message, "metadata": {},
        }),
    )
}

/// Merges `patch` into `target` (RFC 7386: null removes).
fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

impl ApiServer {
    pub fn new() -> ApiServer {
        ApiServer::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client whose requests are logged as `who`'s.
    pub fn client(&self, who: &str) -> kube::Client {
        kube::Client::new(
            Connection {
                server: self.clone(),
                who: who.to_owned(),
            },
            "default",
        )
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The writes (non-GET) so far, optionally only `who`'s.
    pub fn writes(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::is_write).collect()
    }

    /// Requests from `who` whose path contains `path` fail with 503 from now on.
    pub fn cut_off(&self, who: &str, path: &str) {
        self.lock().cut_off.push((who.to_owned(), path.to_owned()));
    }

    /// `kubectl apply` of a new pool.
    pub fn create(&self, pool: &CachePool) {
        let mut object = serde_json::to_value(pool).unwrap_or_default();
        let mut state = self.lock();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["uid"] = json!(format!("uid-{name}-{}", state.revision));
        object["metadata"]["generation"] = json!(1);
        object["metadata"]["creationTimestamp"] = json!("2026-12-04T00:00:00Z");
        let key = format!("{namespace}/{name}");
        let revision = state.bump();
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        state.pools.insert(key, object.clone());
        state.changed("ADDED", &object);
    }

    /// `kubectl edit`/`kubectl scale`: changes the spec (a new generation).
    pub fn edit_spec(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut state = self.lock();
        let key = format!("{namespace}/{name}");
        let Some(mut object) = state.pools.get(&key).cloned() else {
            panic!("no pool {key}");
        };
        change(&mut object["spec"]);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
        object["metadata"]["generation"] = json!(generation + 1);
        state.store_pool(&key, object);
    }

    /// `kubectl delete`: held by finalizers, else gone at once.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut state = self.lock();
        let key = format!("{namespace}/{name}");
        let Some(mut object) = state.pools.get(&key).cloned() else {
            panic!("no pool {key}");
        };
        object["metadata"]["deletionTimestamp"] = json!("2026-12-04T00:00:01Z");
        state.store_pool(&key, object);
    }

    /// The pool as stored, if it exists.
    pub fn pool(&self, namespace: &str, name: &str) -> Option<CachePool> {
        let state = self.lock();
        let object = state.pools.get(&format!("{namespace}/{name}"))?;
        serde_json::from_value(object.clone()).ok()
    }

    /// The Events posted so far: (reason, note).
    pub fn events(&self) -> Vec<(String, String)> {
        self.lock()
            .events
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                    e["note"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The holder of a Lease.
    /// Adds a pod (an operator replica's own) with no labels.
    pub fn add_pod(&self, namespace: &str, name: &str) {
        let mut state = self.lock();
        let revision = state.bump();
        state.pods.insert(
            format!("{namespace}/{name}"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": namespace, "labels": {},
                                "resourceVersion": revision.to_string()}}),
        );
    }

    /// The value of label `key` on a pod, if both exist.
    pub fn pod_label(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let state = self.lock();
        state.pods.get(&format!("{namespace}/{name}"))?["metadata"]["labels"][key]
            .as_str()
            .map(str::to_owned)
    }

    pub fn lease_holder(&self, namespace: &str, name: &str) -> Option<String> {
        let state = self.lock();
        let (lease, _) = state.leases.get(&format!("{namespace}/{name}"))?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    }

    fn handle(&self, who: &str, request: &Request<Bytes>) -> (StatusCode, Result<Value, Body>) {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = serde_json::from_slice(request.body()).unwrap_or(Value::Null);
        let mut state = self.lock();
        let cut = state
            .cut_off
            .iter()
            .any(|(w, p)| w == who && path.contains(p.as_str()));
        let (status, answer) = if cut {
            let (s, b) = failure(503, "ServiceUnavailable", "partitioned by the test");
            (s, Ok(b))
        } else {
            route(
                &mut state,
                request.method(),
                &path,
                &query,
                &content_type,
                &body,
            )
        };
        state.calls.push(Call {
            who: who.to_owned(),
            at: Instant::now(),
            method: request.method().clone(),
            path,
            query,
            content_type,
            body,
            status: status.as_u16(),
        });
        (status, answer)
    }
}

/// Answers one request: a JSON body, or a watch stream.
fn route(
    state: &mut State,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &str,
    body: &Value,
) -> (StatusCode, Result<Value, Body>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ok = |v: Value| (StatusCode::OK, Ok(v));
    let fail = |code, reason: &str, message: &str| {
        let (s, b) = failure(code, reason, message);
        (s, Ok(b))
    };
    match (method, parts.as_slice()) {
        // CachePools, all namespaces or one.
        (&Method::GET, ["apis", "cachepool.io", "v1alpha1", "cachepools"]) => {
            pools(state, None, query)
        }
        (
            &Method::GET,
            [
                "apis",
                "cachepool.io",
                "v1alpha1",
                "namespaces",
                ns,
                "cachepools",
            ],
        ) => pools(state, Some(ns), query),
        (
            method,
            [
                "apis",
                "cachepool.io",
                "v1alpha1",
                "namespaces",
                ns,
                "cachepools",
                name,
                rest @ ..,
            ],
        ) => {
            let key = format!("{ns}/{name}");
            let Some(mut object) = state.pools.get(&key).cloned() else {
                return fail(404, "NotFound", &format!("cachepools \"{name}\" not found"));
            };
            match (method, rest) {
                (&Method::GET, []) => ok(object),
                (&Method::PATCH, ["status"]) if content_type == "application/apply-patch+yaml" => {
                    object["status"] = body["status"].clone();
                    ok(state.store_pool(&key, object))
                }
                (&Method::PATCH, []) if content_type == "application/apply-patch+yaml" => {
                    if let Some(annotations) = body["metadata"].get("annotations") {
                        let target = &mut object["metadata"]["annotations"];
                        if target.is_null() {
                            *target = json!({});
                        }
                        merge(target, annotations);
                    }
                    ok(state.store_pool(&key, object))
                }
                (&Method::PATCH, []) if content_type == "application/json-patch+json" => {
                    let Ok(patch) = serde_json::from_value::<json_patch::Patch>(body.clone())
                    else {
                        return fail(400, "BadRequest", "not a JSON patch");
                    };
                    // As the API server's JSON patch does (and kube's finalizer helper relies
                    // on): a `test` for `null` passes where the path is absent.
                    let patch = json_patch::Patch(
                        patch
                            .0
                            .into_iter()
                            .filter(|op| match op {
                                json_patch::PatchOperation::Test(t) => {
                                    !(t.value.is_null()
                                        && object.pointer(t.path.as_str()).is_none())
                                }
                                _ => true,
                            })
                            .collect(),
                    );
                    let spec_before = object["spec"].clone();
                    if let Err(e) = json_patch::patch(&mut object, &patch) {
                        return fail(422, "Invalid", &format!("the patch failed: {e}"));
                    }
                    if object["spec"] != spec_before {
                        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
                        object["metadata"]["generation"] = json!(generation + 1);
                    }
                    ok(state.store_pool(&key, object))
                }
                _ => fail(405, "MethodNotAllowed", "not served by the test API server"),
            }
        }
        // Events.
        (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
            state.events.push(body.clone());
            (StatusCode::CREATED, Ok(body.clone()))
        }
        (&Method::PATCH, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => {
            ok(body.clone())
        }
        // Leases.
        (
            &Method::GET,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ],
        ) => match state.leases.get(&format!("{ns}/{name}")) {
            Some((lease, _)) => ok(lease.clone()),
            None => fail(404, "NotFound", &format!("leases \"{name}\" not found")),
        },
        (
            &Method::POST,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
            ],
        ) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let key = format!("{ns}/{name}");
            if state.leases.contains_key(&key) {
                return fail(409, "AlreadyExists", "the lease exists");
            }
            let mut lease = body.clone();
            lease["metadata"]["namespace"] = json!(ns);
            lease["metadata"]["resourceVersion"] = json!(state.bump().to_string());
            state.leases.insert(key, (lease.clone(), None));
            (StatusCode::CREATED, Ok(lease))
        }
        (
            &Method::PATCH,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ],
        ) => {
            let key = format!("{ns}/{name}");
            let manager = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldManager="))
                .unwrap_or_default()
                .to_owned();
            let revision = state.bump();
            let Some((lease, owner)) = state.leases.get_mut(&key) else {
                return fail(404, "NotFound", &format!("leases \"{name}\" not found"));
            };
            let holder = lease["spec"]["holderIdentity"].clone();
            let wanted = &body["spec"]["holderIdentity"];
            if content_type == "application/apply-patch+yaml"
                && holder.is_string()
                && wanted.is_string()
                && *wanted != holder
                && owner.as_deref() != Some(manager.as_str())
            {
                return fail(
                    409,
                    "Conflict",
                    "Apply failed with 1 conflict: .spec.holderIdentity",
                );
            }
            if lease["spec"].is_null() {
                lease["spec"] = json!({});
            }
            merge(&mut lease["spec"], &body["spec"]);
            if wanted.is_string() {
                *owner = Some(manager);
            } else if wanted.is_null() && body["spec"].get("holderIdentity").is_some() {
                *owner = None;
            }
            lease["metadata"]["resourceVersion"] = json!(revision.to_string());
            ok(lease.clone())
        }
        // Pods: listed by an equality label selector, labels changed by a merge patch.
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|s| s.replace("%3D", "=").replace("%2F", "/"))
                .unwrap_or_default();
            let wanted: Vec<(&str, &str)> = selector
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let items: Vec<Value> = state
                .pods
                .iter()
                .filter(|(key, _)| key.starts_with(&format!("{ns}/")))
                .map(|(_, pod)| pod.clone())
                .filter(|pod| {
                    wanted
                        .iter()
                        .all(|(k, v)| pod["metadata"]["labels"][*k].as_str() == Some(*v))
                })
                .collect();
            ok(json!({"apiVersion": "v1", "kind": "PodList",
                      "metadata": {"resourceVersion": state.revision.to_string()},
                      "items": items}))
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            let key = format!("{ns}/{name}");
            if state.pods.contains_key(&key) {
                return fail(
                    409,
                    "AlreadyExists",
                    &format!("pods \"{name}\" already exists"),
                );
            }
            let mut pod = body.clone();
            pod["metadata"]["namespace"] = json!(ns);
            pod["metadata"]["resourceVersion"] = json!(state.bump().to_string());
            state.pods.insert(key, pod.clone());
            (StatusCode::CREATED, Ok(pod))
        }
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match state.pods.remove(&format!("{ns}/{name}")) {
                Some(pod) => ok(pod),
                None => fail(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match state.secrets.get(&format!("{ns}/{name}")) {
                Some(secret) => ok(secret.clone()),
                None => fail(404, "NotFound", &format!("secrets \"{name}\" not found")),
            }
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "secrets"]) => {
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            let key = format!("{ns}/{name}");
            if state.secrets.contains_key(&key) {
                return fail(
                    409,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                );
            }
            let mut secret = body.clone();
            secret["metadata"]["namespace"] = json!(ns);
            state.secrets.insert(key, secret.clone());
            (StatusCode::CREATED, Ok(secret))
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name])
            if content_type == "application/merge-patch+json" =>
        {
            let revision = state.bump();
            match state.pods.get_mut(&format!("{ns}/{name}")) {
                Some(pod) => {
                    json_patch::merge(pod, body);
                    pod["metadata"]["resourceVersion"] = json!(revision.to_string());
                    ok(pod.clone())
                }
                None => fail(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        _ => fail(
            404,
            "NotFound",
            &format!("{method} {path} is not served by the test API server"),
        ),
    }
}

/// A CachePool list, or a watch stream from the revision asked for.
fn pools(
    state: &mut State,
    namespace: Option<&str>,
    query: &str,
) -> (StatusCode, Result<Value, Body>) {
    let in_scope = |object: &Value| {
        namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
    };
    if query.split('&').any(|kv| kv == "watch=true") {
        let from: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
        for (revision, kind, object) in &state.changes {
            if *revision > from && in_scope(object) {
                let _ = sender.send(watch_line(kind, object));
            }
        }
        state.watches.push((namespace.map(str::to_owned), sender));
        let stream = futures_util::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))))
        });
        return (StatusCode::OK, Err(StreamBody::new(stream).boxed_unsync()));
    }
    let items: Vec<Value> = state
        .pools
        .values()
        .filter(|o| in_scope(o))
        .cloned()
        .collect();
    (
        StatusCode::OK,
        Ok(json!({
            "apiVersion": "cachepool.io/v1alpha1",
            "kind": "CachePoolList",
            "metadata": {"resourceVersion": state.revision.to_string()},
            "items": items,
        })),
    )
}

/// One client's connection to the server.
#[derive(Clone)]
struct Connection {
    server: ApiServer,
    who: String,
}

impl tower::Service<Request<kube::client::Body>> for Connection {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let server = self.server.clone();
        let who = self.who.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let request = Request::from_parts(parts, bytes);
            let (status, answer) = server.handle(&who, &request);
            Ok(match answer {
                Ok(value) => respond(status, &value),
                Err(stream) => Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(stream)
                    .unwrap_or_default(),
            })
        })
    }
}
