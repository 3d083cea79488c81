//! Objects in an S3 bucket through the AWS SDK, or in any S3-compatible server through an
//! endpoint override (moto in the tests, MinIO and the like elsewhere).
//!
//! Object keys are stored as `PREFIX` + hex of the key (see [`super::objects`]), so nothing a
//! key contains can reach outside the prefix, and listing under the prefix recognises the
//! store's own objects. Credentials come from the settings when both halves are given,
//! otherwise from the SDK's default chain, so EC2 instance profiles and EKS web identity work
//! without configuration.

use std::time::SystemTime;

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use bytes::Bytes;

use super::objects::{Object, ObjectInfo, S3Config, decode_object_key, encode_object_key};
use super::{Result, StoreError};

/// Most keys one DeleteObjects call takes.
const DELETE_BATCH: usize = 1000;

/// An S3 bucket and prefix holding objects.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// Builds the client from `config`; makes no request.
    pub async fn connect(config: S3Config) -> Result<Self> {
        if config.bucket.is_empty() {
            return Err(StoreError::S3Config(
                "the bucket name is empty: give the bucket that holds the images".into(),
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                loader = loader.credentials_provider(Credentials::new(
                    id.clone(),
                    secret.clone(),
                    None,
                    None,
                    "cachepool-settings",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::S3Config(
                    "give both the access key id and the secret access key, or neither (to \
                     use the AWS default credential chain)"
                        .into(),
                ));
            }
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(StoreError::S3Config(
                "no region: set the S3 region in the settings or AWS_REGION".into(),
            ));
        }
        let mut builder =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(config.force_path_style);
        if let Some(endpoint) = &config.endpoint {
            // S3-compatible servers vary in their support of the flexible checksums the SDK
            // adds to every upload by default; compute them only where S3 requires them.
            builder = builder
                .endpoint_url(endpoint.clone())
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket,
            prefix: config.prefix,
        })
    }

    /// `s3://BUCKET/PREFIX`, for logs.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, encode_object_key(key))
    }

    fn error(&self, op: &'static str, key: &str, err: impl std::error::Error) -> StoreError {
        StoreError::S3 {
            op,
            key: key.to_owned(),
            bucket: self.bucket.clone(),
            message: DisplayErrorContext(err).to_string(),
        }
    }

    pub(super) async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<()> {
        let full = self.full_key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|err| self.error("upload", &full, err))?;
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Object>> {
        let full = self.full_key(key);
        let response = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                return Ok(None);
            }
            Err(err) => return Err(self.error("download", &full, err)),
        };
        let content_type = response
            .content_type()
            .unwrap_or("application/octet-stream")
            .to_owned();
        let bytes = response
            .body
            .collect()
            .await
            .map_err(|err| self.error("download", &full, err))?
            .into_bytes();
        Ok(Some(Object {
            bytes,
            content_type,
        }))
    }

    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|err| self.error("deletion", &full, err))?;
        Ok(())
    }

    pub(super) async fn delete_many(&self, keys: &[String]) -> Result<()> {
        for batch in keys.chunks(DELETE_BATCH) {
            let ids = batch
                .iter()
                .map(|key| ObjectIdentifier::builder().key(self.full_key(key)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| self.error("deletion", "", err))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|err| self.error("deletion", "", err))?;
            let output = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|err| self.error("deletion", "", err))?;
            // A quiet DeleteObjects answers 200 and lists only the keys it could not delete.
            if let Some(failed) = output.errors().first() {
                return Err(StoreError::S3 {
                    op: "deletion",
                    key: failed.key().unwrap_or_default().to_owned(),
                    bucket: self.bucket.clone(),
                    message: format!(
                        "{} ({} of {} keys in the batch failed)",
                        failed
                            .message()
                            .or(failed.code())
                            .unwrap_or("unknown error"),
                        output.errors().len(),
                        batch.len()
                    ),
                });
            }
        }
        Ok(())
    }

    pub(super) async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| self.error("listing", &self.prefix, err))?;
            for object in page.contents() {
                let Some(key) = object
                    .key()
                    .and_then(|full| full.strip_prefix(self.prefix.as_str()))
                    .and_then(decode_object_key)
                else {
                    continue;
                };
                // An object without a time counts as just written, so a sweep never takes it
                // for an old orphan.
                let modified = object
                    .last_modified()
                    .and_then(|time| SystemTime::try_from(*time).ok())
                    .unwrap_or_else(SystemTime::now);
                found.push(ObjectInfo { key, modified });
            }
        }
        Ok(found)
    }
}
