//! [`NodeClient`]: the memcached text protocol to one node, over pooled connections.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use deadpool::managed::{Object, Pool, PoolError};

use super::codec::{self, Parsed, ValueHead};
use super::conn::{Connector, Failure};
use super::{ClientError, ClientOptions, Held, Result, Value, check_exptime, check_key};

/// A client of one cache node.
///
/// Cheap to clone: clones share one bounded pool of connections, opened on demand and
/// reused. Every request is bounded by [`ClientOptions::request_timeout`], however the node
/// behaves; a failed request closes the connection it used.
#[derive(Clone)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    options: ClientOptions,
    pool: Pool<Connector>,
}

impl fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("NodeClient")
            .field("addr", &self.inner.addr)
            .field("open", &status.size)
            .field("idle", &status.available)
            .finish()
    }
}

impl NodeClient {
    /// A client of the node at `addr` (`host:port`). Connects lazily, on the first request.
    pub fn new(addr: impl Into<String>, options: ClientOptions) -> Result<NodeClient> {
        options.validate()?;
        Ok(Self::with_valid_options(addr.into(), options))
    }

    /// `new` without validating `options` again (the pool client checked them once).
    pub(crate) fn with_valid_options(addr: String, options: ClientOptions) -> NodeClient {
        let connector = Connector {
            addr: addr.as_str().into(),
            connect_timeout: options.connect_timeout,
        };
        #[expect(
            clippy::expect_used,
            reason = "deadpool's build fails only when pool timeouts are set without a runtime, \
                      and this pool has none (requests carry their own timeout)"
        )]
        let pool = Pool::builder(connector)
            .max_size(options.max_connections_per_node)
            .build()
            .expect("a pool without timeouts always builds");
        NodeClient {
            inner: Arc::new(Inner {
                addr,
                options,
                pool,
            }),
        }
    }

    /// The node's address, as given.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Open connections to the node (idle and in use).
    pub fn open_connections(&self) -> usize {
        self.inner.pool.status().size
    }

    /// Whether `other` is a clone of this client (shares its connections).
    #[cfg(test)]
    pub(crate) fn same_pool(&self, other: &NodeClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// `gets`: the value, its flags and CAS, or `None` on a miss.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        let key = check_key(key.as_ref())?;
        let max = self.inner.options.max_value_bytes;
        let (head, frame) = self
            .call(
                "get",
                |out| codec::encode_gets(out, key),
                None,
                |buf| codec::parse_gets(buf, key, max),
            )
            .await?;
        Ok(head.map(|head| value(head, &frame).0))
    }

    /// Meta get (`mg <key> v f t c w`): the value, its remaining time to live and its write
    /// time, all a copy of it needs; `None` on a miss.
    pub async fn get_held(&self, key: impl AsRef<[u8]>) -> Result<Option<Held>> {
        let key = check_key(key.as_ref())?;
        let max = self.inner.options.max_value_bytes;
        let (head, frame) = self
            .call(
                "mg",
                |out| codec::encode_meta_get(out, key),
                None,
                |buf| codec::parse_meta_get(buf, max),
            )
            .await?;
        Ok(head.map(|head| {
            let (ttl, written_ms) = (head.ttl, head.written_ms);
            Held {
                value: value(head, &frame).0,
                ttl,
                written_ms,
            }
        }))
    }

    /// Meta get of the CAS value alone (`mg <key> c`); `None` on a miss.
    pub async fn cas_of(&self, key: impl AsRef<[u8]>) -> Result<Option<u64>> {
        let key = check_key(key.as_ref())?;
        let (cas, _) = self
            .call(
                "mg",
                |out| codec::encode_meta_cas(out, key),
                None,
                codec::parse_meta_cas,
            )
            .await?;
        Ok(cas)
    }

    /// `set`: store unconditionally. `exptime` follows memcached: 0 never expires, up to 30
    /// days is seconds from now, larger is a Unix time.
    pub async fn set(
        &self,
        key: impl AsRef<[u8]>,
        data: &[u8],
        flags: u32,
        exptime: u32,
    ) -> Result<()> {
        let stored = self.store("set", key.as_ref(), data, flags, exptime, |buf| {
            codec::parse_word(buf, b"STORED").map(|r| r.map(|((), used)| (true, used)))
        });
        stored.await.map(drop)
    }

    /// `add`: store only if the node does not hold the key. True if stored.
    pub async fn add(
        &self,
        key: impl AsRef<[u8]>,
        data: &[u8],
        flags: u32,
        exptime: u32,
    ) -> Result<bool> {
        self.store("add", key.as_ref(), data, flags, exptime, |buf| {
            codec::parse_either(buf, b"STORED", b"NOT_STORED")
        })
        .await
    }

    /// Stores a copy of an item held elsewhere (`ms … ME Z c [W<ms>]`): an add the node also
    /// refuses if it deleted the key after the copy's write (`written_ms`; unknown counts as
    /// older). Returns the stored copy's CAS value, which lets the caller withdraw exactly this
    /// copy later; `None` if the node refused it.
    pub async fn add_copy(
        &self,
        key: impl AsRef<[u8]>,
        data: &[u8],
        flags: u32,
        exptime: u32,
        written_ms: Option<u64>,
    ) -> Result<Option<u64>> {
        let key = check_key(key.as_ref())?;
        check_exptime(exptime)?;
        if data.len() > self.inner.options.max_value_bytes {
            return Err(ClientError::InvalidArgument(format!(
                "a {}-byte value is larger than max_value_bytes ({})",
                data.len(),
                self.inner.options.max_value_bytes
            )));
        }
        let encode = |out: &mut Vec<u8>| {
            codec::encode_meta_add(out, key, flags, exptime, written_ms, data.len())
        };
        let (cas, _) = self
            .call("ms", encode, Some(data), codec::parse_meta_add)
            .await?;
        Ok(cas)
    }

    /// Deletes `key` only if its CAS value is `cas` (`md <key> C<cas>`); true if deleted.
    pub async fn delete_if_cas(&self, key: impl AsRef<[u8]>, cas: u64) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        let encode = |out: &mut Vec<u8>| codec::encode_meta_delete_cas(out, key, cas);
        let (deleted, _) = self
            .call("md", encode, None, codec::parse_meta_delete)
            .await?;
        Ok(deleted)
    }

    /// `md <key> Y`: deletes without the tombstone a plain delete leaves (a Cachepool node
    /// extension), for a node that is not the key's owner any more: no copy is ever carried
    /// *to* it in the running migration, and a tombstone there would refuse the key's newer
    /// value if the key moved back within the tombstone's life. True if the key was there.
    pub async fn delete_without_tombstone(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        let encode = |out: &mut Vec<u8>| codec::encode_meta_delete_untombstoned(out, key);
        let (deleted, _) = self
            .call("md", encode, None, codec::parse_meta_delete)
            .await?;
        Ok(deleted)
    }

    /// `delete`: true if the key was there.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        let parse = |buf: &[u8]| codec::parse_either(buf, b"DELETED", b"NOT_FOUND");
        let (found, _) = self
            .call("delete", |out| codec::encode_delete(out, key), None, parse)
            .await?;
        Ok(found)
    }

    /// `touch`: set a new exptime; true if the key was there.
    pub async fn touch(&self, key: impl AsRef<[u8]>, exptime: u32) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        check_exptime(exptime)?;
        let parse = |buf: &[u8]| codec::parse_either(buf, b"TOUCHED", b"NOT_FOUND");
        let (found, _) = self
            .call(
                "touch",
                |out| codec::encode_touch(out, key, exptime),
                None,
                parse,
            )
            .await?;
        Ok(found)
    }

    /// `flush_all`: invalidate every item on the node now.
    pub async fn flush_all(&self) -> Result<()> {
        let encode = |out: &mut Vec<u8>| out.extend_from_slice(b"flush_all\r\n");
        self.call("flush_all", encode, None, |buf| {
            codec::parse_word(buf, b"OK")
        })
        .await?;
        Ok(())
    }

    /// `stats`: the node's general statistics, by memcached's names.
    pub async fn stats(&self) -> Result<HashMap<String, String>> {
        let encode = |out: &mut Vec<u8>| out.extend_from_slice(b"stats\r\n");
        let (stats, _) = self.call("stats", encode, None, codec::parse_stats).await?;
        Ok(stats)
    }

    async fn store(
        &self,
        cmd: &'static str,
        key: &[u8],
        data: &[u8],
        flags: u32,
        exptime: u32,
        parse: impl Fn(&[u8]) -> Parsed<bool>,
    ) -> Result<bool> {
        let key = check_key(key)?;
        check_exptime(exptime)?;
        if data.len() > self.inner.options.max_value_bytes {
            return Err(ClientError::InvalidArgument(format!(
                "a {}-byte value is larger than max_value_bytes ({})",
                data.len(),
                self.inner.options.max_value_bytes
            )));
        }
        let encode = |out: &mut Vec<u8>| {
            codec::encode_store(out, cmd.as_bytes(), key, flags, exptime, data.len())
        };
        let (stored, _) = self.call(cmd, encode, Some(data), parse).await?;
        Ok(stored)
    }

    /// Runs one request within the request timeout: takes a connection from the pool (opening
    /// one if needed), sends, parses. A connection that failed is closed, not returned; a
    /// pooled connection found closed before the node answered is replaced once, since the
    /// node did not run the request (it closes connections only between requests).
    async fn call<T>(
        &self,
        op: &'static str,
        encode: impl Fn(&mut Vec<u8>),
        body: Option<&[u8]>,
        parse: impl Fn(&[u8]) -> Parsed<T>,
    ) -> Result<(T, Bytes)> {
        let attempt = async {
            let mut retried = false;
            loop {
                let mut conn = self
                    .inner
                    .pool
                    .get()
                    .await
                    .map_err(|err| self.pool_error(err))?;
                let reused = Object::metrics(&conn).recycle_count > 0;
                match conn
                    .roundtrip(&self.inner.addr, &encode, body, &parse)
                    .await
                {
                    Ok(reply) => return Ok(reply),
                    Err(failure) => {
                        // Close it now rather than leave it for `recycle` to find.
                        drop(Object::take(conn));
                        match failure {
                            Failure::Closed(_) if reused && !retried => retried = true,
                            Failure::Closed(source) => {
                                return Err(ClientError::Io {
                                    addr: self.inner.addr.clone(),
                                    source,
                                });
                            }
                            Failure::Failed(err) => return Err(err),
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(self.inner.options.request_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                addr: self.inner.addr.clone(),
                op,
                after: self.inner.options.request_timeout,
            }),
        }
    }

    fn pool_error(&self, err: PoolError<ClientError>) -> ClientError {
        match err {
            PoolError::Backend(err) => err,
            // Not configured here (no pool timeouts, no hooks, never closed), so unreachable
            // in practice; reported rather than assumed away.
            other => ClientError::Io {
                addr: self.inner.addr.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }
}

/// A value reply's head and bytes as a [`Value`] and its TTL.
fn value(head: ValueHead, frame: &Bytes) -> (Value, Option<u32>) {
    let value = Value {
        data: frame.slice(head.data),
        flags: head.flags,
        cas: head.cas,
    };
    (value, head.ttl)
}
