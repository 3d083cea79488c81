//! The site's JSON API over real parts: in-process cache nodes behind a pool client, a SQLite
//! file and a local image directory, served on a loopback port and called over HTTP.

use std::sync::Arc;
use std::time::Duration;

use cache_node::client::{ClientOptions, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::ring::Ring;
use cachepool_web::app::{self, AppState, Counters};
use cachepool_web::cache::{CacheConfig, ImageCache};
use cachepool_web::store::{Database, ObjectStore, Storage};
use serde_json::Value;

const ADMIN: &str = "site-admin-token";

/// A one-pixel GIF whose palette's first colour is `shade`: distinct bytes per shade.
fn gif(shade: u8) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]);
    out.extend_from_slice(&[shade, shade, shade, 0, 0, 0]);
    out.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
    out.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
    out.push(0x3B);
    out
}

struct Site {
    url: String,
    http: reqwest::Client,
    nodes: Vec<Node>,
    server: tokio::task::JoinHandle<()>,
    dir: std::path::PathBuf,
}

impl Site {
    async fn start() -> Site {
        let dir = std::env::temp_dir().join(format!(
            "cachepool-site-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("site set-up: {e}"));
        let mut nodes = Vec::new();
        for _ in 0..2 {
            nodes.push(
                Node::start(NodeConfig::ephemeral(64, Policy::Lru, None))
                    .await
                    .unwrap_or_else(|e| panic!("site set-up: {e}")),
            );
        }
        let ring = Ring::from_addresses(1, nodes.iter().map(|n| n.addr.to_string()))
            .unwrap_or_else(|e| panic!("site set-up: {e}"));
        let pool = Arc::new(
            PoolClient::from_ring(ring, ClientOptions::default())
                .unwrap_or_else(|e| panic!("site set-up: {e}")),
        );
        let db = Database::connect(&format!("sqlite://{}", dir.join("web.db").display()))
            .await
            .unwrap_or_else(|e| panic!("site set-up: {e}"));
        db.migrate()
            .await
            .unwrap_or_else(|e| panic!("site set-up: {e}"));
        let objects =
            ObjectStore::local(dir.join("images")).unwrap_or_else(|e| panic!("site set-up: {e}"));
        let router = app::router(AppState {
            storage: Arc::new(Storage::new(db, objects)),
            cache: Arc::new(
                ImageCache::new(pool, CacheConfig::default())
                    .unwrap_or_else(|e| panic!("site set-up: {e}")),
            ),
            admin_token: ADMIN.into(),
            counters: Arc::new(Counters::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("site set-up: {e}"));
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .unwrap_or_else(|e| panic!("site set-up: {e}"))
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Site {
            url,
            http: reqwest::Client::new(),
            nodes,
            server,
            dir,
        }
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}/api/v1/images/{key}", self.url))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/v1/images/{key}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {key}: {e}"))
    }

    async fn stop(self) {
        self.server.abort();
        for node in self.nodes {
            node.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_view_hit_replace_list_and_delete_everything() {
    let site = Site::start().await;
    let (status, created) = site.put("cat.gif", gif(1)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["contentType"], "image/gif");
    assert_eq!(created["size"], gif(1).len());

    let first = site.get("cat.gif").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "miss");
    assert_eq!(header(&first, "content-type"), "image/gif");
    let etag = header(&first, "etag");
    assert_eq!(etag, created["etag"].as_str().unwrap());
    assert_eq!(first.bytes().await.unwrap().to_vec(), gif(1));
    let second = site.get("cat.gif").await;
    assert_eq!(header(&second, "x-cache"), "hit");
    assert_eq!(second.bytes().await.unwrap().to_vec(), gif(1));

    // Revalidation by ETag.
    let cached = site
        .http
        .get(format!("{}/api/v1/images/cat.gif", site.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);

    // A re-upload replaces the image everywhere: the next read sees the new bytes.
    let (status, replaced) = site.put("cat.gif", gif(2)).await;
    assert_eq!(status, 200, "{replaced}");
    assert_ne!(replaced["etag"], created["etag"]);
    let after = site.get("cat.gif").await;
    assert_eq!(after.bytes().await.unwrap().to_vec(), gif(2));

    site.put("dog.gif", gif(3)).await;
    let list: Value = site
        .http
        .get(format!("{}/api/v1/images?limit=1", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["key"], "dog.gif", "newest first: {list}");
    let next = list["next"].as_str().expect("a second page").to_owned();
    let page2: Value = site
        .http
        .get(format!("{}/api/v1/images?limit=1&cursor={next}", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2["items"][0]["key"], "cat.gif");

    // Delete all data: refused without the token, done with it; nothing is served after.
    let refused = site
        .http
        .delete(format!("{}/api/v1/data", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(site.get("cat.gif").await.status(), 200);
    let deleted = site
        .http
        .delete(format!("{}/api/v1/data", site.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(site.get("cat.gif").await.status(), 404);
    assert_eq!(site.get("dog.gif").await.status(), 404);
    tokio::time::sleep(Duration::from_millis(10)).await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_with_status_and_reason() {
    let site = Site::start().await;
    let (status, body) = site.put(".hidden", gif(1)).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("key")),
        "{body}"
    );
    let (status, body) = site
        .put("page.gif", b"<html><script>x</script>".to_vec())
        .await;
    assert_eq!(status, 415, "{body}");
    assert!(body["message"].as_str().unwrap().contains("HTML"), "{body}");
    let (status, body) = site.put("empty.gif", Vec::new()).await;
    assert!(status == 400 || status == 415, "{status} {body}");
    let huge = vec![0u8; 10 * 1024 * 1024 + 1];
    let r = site
        .http
        .put(format!("{}/api/v1/images/huge.gif", site.url))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(site.get("missing.gif").await.status(), 404);
    let r = site
        .http
        .get(format!("{}/api/v1/images?limit=0", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Nothing was stored by any of them.
    let list: Value = site
        .http
        .get(format!("{}/api/v1/images", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], Value::Array(Vec::new()));
    site.stop().await;
}
