//! A running site on one backend and the HTTP calls the cases make (cachepool-web's API and
//! app tests).

use std::sync::Arc;

use cache_node::client::{ClientOptions, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::ring::Ring;
use cachepool_web::api::AppState;
use cachepool_web::app;
use cachepool_web::cache::{CacheConfig, ImageCache};
use cachepool_web::listener::{ClientAddr, SiteListener};
use cachepool_web::ui::Ui;
use serde_json::Value;

pub use crate::images::gif;
use crate::store::{Db, Objects, TestStorage};

/// The admin token of every test site.
pub const ADMIN: &str = "site-admin-token";

/// The site over a fresh database and object store, two cache nodes, and a loopback port.
#[derive(Debug)]
pub struct Site {
    pub url: String,
    pub http: reqwest::Client,
    /// The backend, to look behind the API's back (and the guards of its servers).
    pub store: TestStorage,
    nodes: Vec<Node>,
    server: tokio::task::JoinHandle<()>,
}

impl Site {
    /// The site's JSON API.
    pub async fn start(db: Db, objects: Objects) -> Site {
        Site::serve(db, objects, None).await
    }

    /// The site with its pages and manager (`ui`: the manager's password, its operator
    /// client, its trusted proxies).
    pub async fn start_with_pages(db: Db, objects: Objects, ui: Ui) -> Site {
        Site::serve(db, objects, Some(ui)).await
    }

    async fn serve(db: Db, objects: Objects, ui: Option<Ui>) -> Site {
        let store = TestStorage::start(db, objects).await;
        let mut nodes = Vec::new();
        for _ in 0..2 {
            nodes.push(
                Node::start(NodeConfig::ephemeral(64, Policy::Lru, None))
                    .await
                    .unwrap_or_else(|e| panic!("cache node: {e}")),
            );
        }
        let ring = Ring::from_addresses(1, nodes.iter().map(|n| n.addr.to_string()))
            .unwrap_or_else(|e| panic!("ring: {e}"));
        let pool = Arc::new(
            PoolClient::from_ring(ring, ClientOptions::default())
                .unwrap_or_else(|e| panic!("pool client: {e}")),
        );
        let cache = Arc::new(
            ImageCache::new(pool, CacheConfig::default())
                .unwrap_or_else(|e| panic!("image cache: {e}")),
        );
        let state = AppState::new(store.storage.clone(), cache, ADMIN);
        let router = match &ui {
            Some(ui) => app::router_with_pages(state, ui),
            None => app::router(state),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("bind: {e}"));
        // Served as `Web::start` serves it: client addresses and the lingering close.
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                SiteListener::new(listener),
                router.into_make_service_with_connect_info::<ClientAddr>(),
            )
            .await;
        });
        Site {
            url: format!("http://{addr}"),
            http: reqwest::Client::new(),
            store,
            nodes,
            server,
        }
    }

    /// Stops the server and the nodes; the store's servers stop when `self.store` drops.
    pub async fn stop(mut self) {
        self.server.abort();
        for node in std::mem::take(&mut self.nodes) {
            node.shutdown().await;
        }
    }

    /// `PUT /api/v1/images/{key}`: the status and the JSON body (`null` if none).
    pub async fn put(&self, key: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}/api/v1/images/{key}", self.url))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /api/v1/images/{key}`.
    pub async fn get(&self, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/v1/images/{key}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {key}: {e}"))
    }

    /// `GET` of a path and query: the status and the JSON body (`null` if none).
    pub async fn get_json(&self, path_and_query: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `DELETE /api/v1/data` with an optional `Authorization` header value.
    pub async fn delete_data(&self, authorization: Option<&str>) -> reqwest::Response {
        let mut request = self.http.delete(format!("{}/api/v1/data", self.url));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE /api/v1/data: {e}"))
    }

    /// The keys of the first page of the listing, newest first.
    pub async fn listed_keys(&self) -> Vec<String> {
        let (status, page) = self.get_json("/api/v1/images?limit=200").await;
        assert_eq!(status, 200, "{page}");
        keys_of(&page)
    }

    /// Rows in the database and objects in the object store, read behind the API's back.
    pub async fn stored(&self) -> (u64, usize) {
        let rows = self
            .store
            .storage
            .count()
            .await
            .unwrap_or_else(|e| panic!("count: {e}"));
        (rows, self.store.object_keys().await.len())
    }
}

/// The keys of a listing page.
pub fn keys_of(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"))
        .iter()
        .map(|item| item["key"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A response header as text ("" when absent).
pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Checks a JSON error: its status, code, field and that its message says `says`.
pub fn assert_error(
    (status, body): &(u16, Value),
    want_status: u16,
    code: &str,
    field: Option<&str>,
    says: &str,
) {
    assert_eq!(*status, want_status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["field"].as_str(), field, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(says),
        "message {message:?} should say {says:?}"
    );
}
