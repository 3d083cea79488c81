//! A running site on one backend and the HTTP calls the cases make (cachepool-web's API and
//! app tests).

use std::sync::Arc;

use cache_node::client::{ClientOptions, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::ring::Ring;
use cachepool_web::api::AppState;
use cachepool_web::app;
use cachepool_web::cache::{CacheConfig, DEFAULT_LEASE, DEFAULT_LOCAL_BYTES, ImageCache};
use cachepool_web::listener::{ClientAddr, SiteListener};
use cachepool_web::ui::Ui;
use serde_json::Value;

pub use crate::images::gif;
use crate::store::{Db, Objects, TestStorage};

/// The admin token of every test site.
pub const ADMIN: &str = "site-admin-token";

/// The image cache settings `cachepool web` starts with by default: the in-process cache of
/// hot images on, with its default budget and lease.
pub fn site_cache_config() -> CacheConfig {
    CacheConfig {
        local_bytes: DEFAULT_LOCAL_BYTES,
        lease: DEFAULT_LEASE,
        ..CacheConfig::default()
    }
}

/// The site over a fresh database and object store, two cache nodes, and a loopback port.
#[derive(Debug)]
pub struct Site {
    pub url: String,
    pub http: reqwest::Client,
    /// The backend, to look behind the API's back (and the guards of its servers).
    pub store: TestStorage,
    /// The image cache (the pool client and the in-process cache).
    pub cache: Arc<ImageCache>,
    nodes: Vec<Node>,
    server: tokio::task::JoinHandle<()>,
}

impl Site {
    /// The site's JSON API.
    pub async fn start(db: Db, objects: Objects) -> Site {
        Site::serve(db, objects, None, site_cache_config()).await
    }

    /// The site's JSON API with these image cache settings.
    pub async fn start_with_cache(db: Db, objects: Objects, config: CacheConfig) -> Site {
        Site::serve(db, objects, None, config).await
    }

    /// The site with its pages and manager (`ui`: the manager's password, its operator
    /// client, its trusted proxies).
    pub async fn start_with_pages(db: Db, objects: Objects, ui: Ui) -> Site {
        Site::serve(db, objects, Some(ui), site_cache_config()).await
    }

    async fn serve(db: Db, objects: Objects, ui: Option<Ui>, config: CacheConfig) -> Site {
        let store = TestStorage::start(db, objects).await;
        let mut nodes = Vec::new();
        for _ in 0..2 {
            nodes.push(
                Node::start(NodeConfig::ephemeral(64, Policy::Lru, None))
                    .await
                    .unwrap_or_else(|e| panic!("cache node: {e}")),
            );
        }
        let cache = image_cache(&nodes, config);
        let (url, server) = serve_api(store.storage.clone(), cache.clone(), ui.as_ref()).await;
        Site {
            url,
            http: reqwest::Client::new(),
            store,
            cache,
            nodes,
            server,
        }
    }

    /// Another replica of the site: its own pool client, image cache (with `config`), router
    /// and port, over the same database, object store and pool nodes, as a second
    /// `cachepool web` process would be. It stops when dropped.
    pub async fn replica(&self, config: CacheConfig) -> Replica {
        let cache = image_cache(&self.nodes, config);
        let (url, server) = serve_api(self.store.storage.clone(), cache.clone(), None).await;
        Replica {
            url,
            http: self.http.clone(),
            cache,
            server,
        }
    }

    /// Stops the server and the nodes; the store's servers stop when the last `self.store`
    /// drops.
    pub async fn stop(mut self) {
        self.server.abort();
        for node in std::mem::take(&mut self.nodes) {
            node.shutdown().await;
        }
    }

    /// `PUT /api/v1/images/{key}`: the status and the JSON body (`null` if none).
    pub async fn put(&self, key: &str, body: Vec<u8>) -> (u16, Value) {
        let r = put_image(&self.http, &self.url, key, body).await;
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /api/v1/images/{key}`.
    pub async fn get(&self, key: &str) -> reqwest::Response {
        get_image(&self.http, &self.url, key).await
    }

    /// `GET /api/v1/images/{key}/thumbnail`.
    pub async fn thumbnail(&self, key: &str) -> reqwest::Response {
        get_thumbnail(&self.http, &self.url, key).await
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
        delete_data(&self.http, &self.url, authorization).await
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

/// Another replica of a [`Site`] ([`Site::replica`]); the nodes and stores belong to the
/// site.
#[derive(Debug)]
pub struct Replica {
    pub url: String,
    pub http: reqwest::Client,
    /// Its image cache (its own pool client and in-process cache).
    pub cache: Arc<ImageCache>,
    server: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// `PUT /api/v1/images/{key}`: the status.
    pub async fn put(&self, key: &str, body: Vec<u8>) -> u16 {
        put_image(&self.http, &self.url, key, body)
            .await
            .status()
            .as_u16()
    }

    /// `GET /api/v1/images/{key}`.
    pub async fn get(&self, key: &str) -> reqwest::Response {
        get_image(&self.http, &self.url, key).await
    }

    /// `GET /api/v1/images/{key}/thumbnail`.
    pub async fn thumbnail(&self, key: &str) -> reqwest::Response {
        get_thumbnail(&self.http, &self.url, key).await
    }

    /// `DELETE /api/v1/data` with the admin token: the status.
    pub async fn delete_data(&self) -> u16 {
        let bearer = format!("Bearer {ADMIN}");
        delete_data(&self.http, &self.url, Some(&bearer))
            .await
            .status()
            .as_u16()
    }
}

/// `GET /api/v1/images/{key}/thumbnail` on the site at `url`.
async fn get_thumbnail(http: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    http.get(format!("{url}/api/v1/images/{key}/thumbnail"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}/thumbnail: {e}"))
}

/// `PUT /api/v1/images/{key}` on the site at `url`.
async fn put_image(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    http.put(format!("{url}/api/v1/images/{key}"))
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"))
}

/// `GET /api/v1/images/{key}` on the site at `url`.
async fn get_image(http: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    http.get(format!("{url}/api/v1/images/{key}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// `DELETE /api/v1/data` on the site at `url`, with an optional `Authorization` header value.
async fn delete_data(
    http: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = http.delete(format!("{url}/api/v1/data"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("DELETE /api/v1/data: {e}"))
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An image cache over its own pool client of `nodes`.
fn image_cache(nodes: &[Node], config: CacheConfig) -> Arc<ImageCache> {
    let ring = Ring::from_addresses(1, nodes.iter().map(|n| n.addr.to_string()))
        .unwrap_or_else(|e| panic!("ring: {e}"));
    let pool = Arc::new(
        PoolClient::from_ring(ring, ClientOptions::default())
            .unwrap_or_else(|e| panic!("pool client: {e}")),
    );
    Arc::new(ImageCache::new(pool, config).unwrap_or_else(|e| panic!("image cache: {e}")))
}

/// The site's router over `storage` and `cache` (with the pages if `ui`), served on a loopback
/// port the kernel picks: its URL and its task.
async fn serve_api(
    storage: cachepool_web::store::Storage,
    cache: Arc<ImageCache>,
    ui: Option<&Ui>,
) -> (String, tokio::task::JoinHandle<()>) {
    let state = AppState::new(storage, cache, ADMIN);
    let router = match ui {
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
    (format!("http://{addr}"), server)
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
