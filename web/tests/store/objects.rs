//! The object stores on a real local directory and on S3 served by moto: round trips, keys
//! that look like paths, and whole-store operations that touch only the store's own objects.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cachepool_web::store::{ObjectStore, StoreError};

use cachepool_test_support::matrix;
use cachepool_test_support::store::{
    BUCKET, Objects, PREFIX, TestObjects, all_bucket_keys, raw_s3, s3_config,
};

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

async fn sorted_keys(store: &ObjectStore) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    keys.sort();
    keys
}

async fn put_get_overwrite_delete_round_trip(kind: Objects) {
    let test = TestObjects::start(kind).await;
    let store = &test.store;
    assert_eq!(store.get("missing").await.unwrap(), None);

    let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nfirst");
    store.put("photo", png.clone(), "image/png").await.unwrap();
    let got = store.get("photo").await.unwrap().expect("stored");
    assert_eq!(got.bytes, png);
    assert_eq!(got.content_type, "image/png");

    // Bytes that look like the local header, and an empty object, survive unchanged.
    let tricky = Bytes::from_static(b"cachepool-object/1 text/html\n<b>");
    store
        .put("photo", tricky.clone(), "image/webp")
        .await
        .unwrap();
    let got = store.get("photo").await.unwrap().expect("overwritten");
    assert_eq!(
        (got.bytes, got.content_type.as_str()),
        (tricky, "image/webp")
    );
    store.put("empty", Bytes::new(), "image/gif").await.unwrap();
    assert_eq!(
        store.get("empty").await.unwrap().unwrap().bytes,
        Bytes::new()
    );

    assert_eq!(sorted_keys(store).await, ["empty", "photo"]);
    store.delete("photo").await.unwrap();
    store.delete("photo").await.unwrap(); // deleting a missing object is fine
    assert_eq!(store.get("photo").await.unwrap(), None);
    assert_eq!(sorted_keys(store).await, ["empty"]);
}

async fn keys_that_look_like_paths_stay_inside_the_store(kind: Objects) {
    let test = TestObjects::start(kind).await;
    let store = &test.store;
    let keys = [
        "../escape",
        "../../../../tmp/escape",
        "/etc/absolute",
        "a/b/c.png",
        ".",
        "..",
        "./.hidden",
        "ключ 🙂 with space",
        "back\\slash",
        "%2e%2e%2f",
    ];
    for (i, key) in keys.iter().enumerate() {
        let body = Bytes::from(format!("object {i}"));
        store.put(key, body, "image/png").await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let got = store
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key:?} lost"));
        assert_eq!(got.bytes, Bytes::from(format!("object {i}")), "{key:?}");
    }
    let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(sorted_keys(store).await, expected);

    match kind {
        Objects::Local => {
            // Everything the store wrote is one flat hex-named file in `store/objects`; the
            // test directory around the store holds nothing else.
            let root = test.dir.path();
            let files = files_under(root);
            assert_eq!(files.len(), keys.len(), "{files:?}");
            for file in &files {
                assert_eq!(file.parent(), Some(root.join("store/objects").as_path()));
                let name = file.file_name().unwrap().to_str().unwrap();
                assert!(name.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            }
            assert!(!Path::new("/tmp/escape").exists());
        }
        Objects::S3 => {
            let all = all_bucket_keys(test.moto()).await;
            assert_eq!(all.len(), keys.len(), "{all:?}");
            for key in &all {
                let rest = key
                    .strip_prefix(PREFIX)
                    .unwrap_or_else(|| panic!("{key} outside"));
                assert!(rest.bytes().all(|c| c.is_ascii_hexdigit()), "{key}");
            }
        }
    }
    assert_eq!(store.delete_all().await.unwrap(), keys.len() as u64);
    assert!(store.list().await.unwrap().is_empty());
}

async fn whole_store_operations_leave_foreign_objects_alone(kind: Objects) {
    let test = TestObjects::start(kind).await;
    let store = &test.store;
    store
        .put("mine", Bytes::from_static(b"x"), "image/png")
        .await
        .unwrap();
    let foreign: Vec<String> = match kind {
        Objects::Local => {
            let objects = test.dir.path().join("store/objects");
            fs::write(objects.join("README"), "not an object").unwrap();
            fs::write(objects.join("ABCD"), "uppercase is not the store's hex").unwrap();
            vec!["README".into(), "ABCD".into()]
        }
        Objects::S3 => {
            let s3 = raw_s3(test.moto());
            for key in ["outside/prefix", "img/not-hex", "img2/61"] {
                s3.put_object()
                    .bucket(BUCKET)
                    .key(key)
                    .body(Bytes::from_static(b"foreign").into())
                    .send()
                    .await
                    .unwrap();
            }
            vec![
                "img/not-hex".into(),
                "img2/61".into(),
                "outside/prefix".into(),
            ]
        }
    };
    assert_eq!(sorted_keys(store).await, ["mine"]);
    assert_eq!(store.delete_all().await.unwrap(), 1);
    let left: Vec<String> = match kind {
        Objects::Local => {
            let mut names: Vec<String> = files_under(&test.dir.path().join("store/objects"))
                .iter()
                .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
                .collect();
            names.sort();
            names
        }
        Objects::S3 => all_bucket_keys(test.moto()).await,
    };
    let mut foreign = foreign;
    foreign.sort();
    assert_eq!(left, foreign);
}

async fn refused_keys_and_content_types_say_what_is_allowed(kind: Objects) {
    let test = TestObjects::start(kind).await;
    let store = &test.store;
    let body = Bytes::from_static(b"x");
    for key in [String::new(), "k".repeat(121)] {
        let err = store
            .put(&key, body.clone(), "image/png")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::BadObjectKey { .. }), "{err}");
        assert!(err.to_string().contains("1 to 120 bytes"), "{err}");
    }
    let err = store
        .put("k", body, "image/png\r\nX-Injected: 1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("printable ASCII"), "{err}");
    assert!(store.list().await.unwrap().is_empty());
}

async fn a_bucket_that_does_not_exist_is_reported_by_name() {
    let test = TestObjects::start(Objects::S3).await;
    let store = ObjectStore::s3(s3_config(test.moto(), "no-such-bucket"))
        .await
        .unwrap();
    let err = store
        .put("k", Bytes::from_static(b"x"), "image/png")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::S3 { .. }), "{message}");
    assert!(
        message.contains("no-such-bucket") && message.contains("NoSuchBucket"),
        "{message}"
    );
}

#[tokio::test]
async fn s3_settings_that_cannot_work_are_refused_before_any_request() {
    let half_credentials = cachepool_web::store::S3Config {
        bucket: "b".into(),
        region: Some("us-east-1".into()),
        access_key_id: Some("id".into()),
        ..Default::default()
    };
    let err = ObjectStore::s3(half_credentials)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("both the access key id and the secret"),
        "{err}"
    );
    let no_bucket = cachepool_web::store::S3Config::default();
    let err = ObjectStore::s3(no_bucket).await.unwrap_err().to_string();
    assert!(err.contains("bucket name is empty"), "{err}");
}

matrix!(put_get_overwrite_delete_round_trip:
    round_trip_local => (Objects::Local), round_trip_s3 => (Objects::S3));
matrix!(keys_that_look_like_paths_stay_inside_the_store:
    path_like_keys_local => (Objects::Local), path_like_keys_s3 => (Objects::S3));
matrix!(whole_store_operations_leave_foreign_objects_alone:
    foreign_objects_local => (Objects::Local), foreign_objects_s3 => (Objects::S3));
matrix!(refused_keys_and_content_types_say_what_is_allowed:
    refusals_local => (Objects::Local), refusals_s3 => (Objects::S3));
matrix!(a_bucket_that_does_not_exist_is_reported_by_name: missing_bucket_s3 => ());
