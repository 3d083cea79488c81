//! The manager's password, sessions and CSRF tokens.
//!
//! - **Password**: only its argon2 hash (a PHC string) is kept; a plain password from the
//!   configuration is hashed at start. Verification runs in `spawn_blocking` (argon2 is
//!   deliberately slow), one check at a time, behind a back-off per client address
//!   ([`super::throttle`]): failures slow down the address they came from and refuse its
//!   attempts (429) until its wait is over, while a login from another address goes ahead.
//! - **Sessions** are stateless signed cookies (`axum-extra`'s `SignedCookieJar`, HMAC under
//!   the session key) carrying a random id and an expiry: replicas sharing
//!   `--session-secret` accept each other's sessions without a shared store. Logout removes
//!   the cookie and records the id in a small per-process revocation list (pruned at expiry);
//!   a stolen cookie replayed to *another* replica stays valid until it expires, which is
//!   the price of needing no shared store (documented in `docs/ui.md`).
//! - **CSRF tokens** are HMAC-SHA-256 of the session id (manager forms) or of a signed
//!   anonymous visitor id (the public upload form and the login form) under a key derived
//!   from the session key: bound to the cookie, nothing stored, compared in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::{Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _};
use axum_extra::extract::cookie::{Cookie, Key, SameSite, SignedCookieJar};
use cache_node::admin::constant_time_eq;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256, Sha512};

use super::throttle::{Admission, LoginThrottle};

/// Name of the manager's session cookie.
pub const SESSION_COOKIE: &str = "cachepool_session";
/// Name of the anonymous visitor cookie the public forms' CSRF tokens are bound to.
pub const VISITOR_COOKIE: &str = "cachepool_visitor";
/// How long a manager session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Shortest accepted `--session-secret` (characters).
pub const MIN_SECRET_LEN: usize = 32;

/// What the manager's authentication could not be set up from.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the admin password hash is not an argon2 PHC string ($argon2id$v=19$...): {0}")]
    BadHash(String),
    #[error("hashing the admin password failed: {0}")]
    Hashing(String),
    #[error("the session secret must be at least {MIN_SECRET_LEN} characters")]
    ShortSecret,
}

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hashing(e.to_string()))
}

/// The cookie signing key from a configured secret (SHA-512 stretches any secret to the 64
/// bytes the key needs), or a random one.
pub fn session_key(secret: Option<&str>) -> Result<Key, AuthError> {
    let bytes: [u8; 64] = match secret {
        Some(s) if s.len() < MIN_SECRET_LEN => return Err(AuthError::ShortSecret),
        Some(s) => Sha512::digest(s.as_bytes()).into(),
        None => {
            let mut bytes = [0u8; 64];
            rand::fill(&mut bytes[..]);
            bytes
        }
    };
    Key::try_from(&bytes[..]).map_err(|e| AuthError::Hashing(e.to_string()))
}

/// A manager session as its cookie carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Random id, hex.
    pub id: String,
    /// Unix seconds after which the session is over.
    pub expires: u64,
}

impl Session {
    /// A new session starting at `now` (Unix seconds).
    pub fn new(now: u64) -> Session {
        Session {
            id: random_id(),
            expires: now + SESSION_LIFETIME.as_secs(),
        }
    }

    /// The cookie value: `ID.EXPIRES`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.id, self.expires)
    }

    /// Parses a cookie value (its signature already checked), refusing an expired session.
    pub fn parse(value: &str, now: u64) -> Option<Session> {
        let (id, expires) = value.split_once('.')?;
        let expires: u64 = expires.parse().ok()?;
        let well_formed = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        (well_formed && expires > now).then(|| Session {
            id: id.to_owned(),
            expires,
        })
    }
}

/// 128 random bits, hex.
pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The outcome of a login attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginVerdict {
    /// The password is right.
    Accepted,
    /// The password is wrong (or none is configured).
    Refused,
    /// Not checked: the client's address must wait this long after its earlier failures.
    TooSoon(Duration),
}

/// The manager's credentials, session key and revocation list.
pub struct Auth {
    /// The admin password's argon2 hash; `None`: no password configured, nobody logs in.
    hash: Option<String>,
    key: Key,
    /// HMAC key of the CSRF tokens, derived from the session key so replicas agree.
    csrf_key: [u8; 32],
    secure: bool,
    /// Logged-out session ids and their expiry.
    revoked: Mutex<HashMap<String, u64>>,
    throttle: LoginThrottle,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("password", &self.hash.is_some())
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Sets up from a PHC hash (checked here), the cookie key and whether cookies are `Secure`.
    pub fn new(hash: Option<String>, key: Key, secure: bool) -> Result<Auth, AuthError> {
        if let Some(hash) = &hash {
            PasswordHash::new(hash).map_err(|e| AuthError::BadHash(e.to_string()))?;
        }
        let csrf_key = Sha256::new()
            .chain_update(b"cachepool csrf v1\0")
            .chain_update(key.signing())
            .finalize()
            .into();
        Ok(Auth {
            hash,
            key,
            csrf_key,
            secure,
            revoked: Mutex::new(HashMap::new()),
            throttle: LoginThrottle::default(),
        })
    }

    /// The cookie signing key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Whether a password is configured.
    pub fn has_password(&self) -> bool {
        self.hash.is_some()
    }

    /// Checks a password from `client`: refused at once while the address waits out its
    /// earlier failures, else checked (one check at a time, whoever asks) and the outcome
    /// counted against the address.
    pub async fn verify_password(&self, client: IpAddr, password: String) -> LoginVerdict {
        let Some(hash) = self.hash.clone() else {
            return LoginVerdict::Refused;
        };
        let attempt = match self.throttle.admit(client) {
            Admission::Check(attempt) => attempt,
            Admission::Wait(wait) => return LoginVerdict::TooSoon(wait),
        };
        let ok = {
            let _turn = attempt.turn().await;
            tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false)
        };
        if ok {
            attempt.succeeded();
            LoginVerdict::Accepted
        } else {
            let failures = attempt.failed();
            tracing::warn!(%client, failures, "failed manager login");
            LoginVerdict::Refused
        }
    }

    /// How many client addresses the login back-off tracks.
    pub fn throttled_clients(&self) -> usize {
        self.throttle.tracked()
    }

    /// The CSRF token of a scope (`session` or `visitor`) and id.
    pub fn csrf_token(&self, scope: &str, id: &str) -> String {
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.csrf_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(scope.as_bytes());
        mac.update(b"\0");
        mac.update(id.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `presented` is the CSRF token of the scope and id (constant time).
    pub fn check_csrf(&self, scope: &str, id: &str, presented: &str) -> bool {
        constant_time_eq(
            self.csrf_token(scope, id).as_bytes(),
            presented.trim().as_bytes(),
        )
    }

    /// The live manager session the cookies carry, if any.
    pub fn session(&self, jar: &SignedCookieJar) -> Option<Session> {
        let cookie = jar.get(SESSION_COOKIE)?;
        let now = unix_now();
        let session = Session::parse(cookie.value(), now)?;
        let revoked = self
            .revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!revoked.contains_key(&session.id)).then_some(session)
    }

    /// The session's CSRF token.
    pub fn session_csrf(&self, session: &Session) -> String {
        self.csrf_token("session", &session.id)
    }

    /// Ends a session: recorded as revoked until it would have expired.
    pub fn revoke(&self, session: &Session) {
        let now = unix_now();
        let mut revoked = self
            .revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        revoked.retain(|_, expires| *expires > now);
        revoked.insert(session.id.clone(), session.expires);
    }

    /// A cookie with the attributes every cookie of the site has.
    pub fn cookie(&self, name: &'static str, value: String) -> Cookie<'static> {
        Cookie::build((name, value))
            .http_only(true)
            .same_site(SameSite::Strict)
            .path("/")
            .secure(self.secure)
            .build()
    }

    /// The session cookie of a new session: a browser-session cookie; the expiry that counts
    /// is the signed one inside.
    pub fn session_cookie(&self, session: &Session) -> Cookie<'static> {
        self.cookie(SESSION_COOKIE, session.encode())
    }

    /// The visitor id the cookies carry, or a new one with the cookie to set.
    pub fn visitor(&self, jar: SignedCookieJar) -> (SignedCookieJar, String) {
        if let Some(id) = jar
            .get(VISITOR_COOKIE)
            .map(|c| c.value().to_owned())
            .filter(|v| v.len() == 32)
        {
            return (jar, id);
        }
        let id = random_id();
        let jar = jar.add(self.cookie(VISITOR_COOKIE, id.clone()));
        (jar, id)
    }

    /// Whether the visitor cookie is present and `presented` is its CSRF token.
    pub fn check_visitor_csrf(&self, jar: &SignedCookieJar, presented: &str) -> bool {
        jar.get(VISITOR_COOKIE)
            .is_some_and(|c| self.check_csrf("visitor", c.value(), presented))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let key = session_key(Some("0123456789abcdef0123456789abcdef")).unwrap();
        Auth::new(None, key, false).unwrap()
    }

    #[test]
    fn csrf_token_is_bound_to_scope_and_id() {
        let auth = auth();
        let token = auth.csrf_token("session", "a");
        assert_eq!(token.len(), 64);
        assert!(auth.check_csrf("session", "a", &token));
        assert!(!auth.check_csrf("session", "b", &token));
        assert!(!auth.check_csrf("visitor", "a", &token));
        assert!(!auth.check_csrf("session", "a", ""));
        assert!(!auth.check_csrf("session", "a", &token[..63]));
    }

    #[test]
    fn replicas_with_one_secret_agree_on_tokens_and_random_keys_do_not() {
        let a = auth();
        let b = auth();
        assert_eq!(a.csrf_token("session", "x"), b.csrf_token("session", "x"));
        let c = Auth::new(None, session_key(None).unwrap(), false).unwrap();
        assert_ne!(a.csrf_token("session", "x"), c.csrf_token("session", "x"));
    }

    #[test]
    fn short_session_secret_is_refused() {
        assert!(matches!(
            session_key(Some("short")),
            Err(AuthError::ShortSecret)
        ));
    }

    #[test]
    fn session_cookie_round_trips_and_expires() {
        let session = Session::new(1000);
        assert_eq!(session.expires, 1000 + SESSION_LIFETIME.as_secs());
        let value = session.encode();
        assert_eq!(Session::parse(&value, 1001), Some(session.clone()));
        assert_eq!(Session::parse(&value, session.expires), None);
        assert_eq!(Session::parse("nodot", 0), None);
        assert_eq!(Session::parse("zz.100", 0), None);
        assert_eq!(Session::parse(&format!("{}.x", session.id), 0), None);
    }

    #[test]
    fn signed_session_cookie_is_refused_when_tampered() {
        let auth = auth();
        let session = Session::new(unix_now());
        let jar = SignedCookieJar::new(auth.key().clone()).add(auth.session_cookie(&session));
        let signed = jar.get(SESSION_COOKIE).unwrap();
        // What the browser sends back: the signed value as the response set it.
        let mut headers = axum::http::HeaderMap::new();
        let set = jar_header(&jar);
        headers.insert(axum::http::header::COOKIE, set.parse().unwrap());
        let back = SignedCookieJar::from_headers(&headers, auth.key().clone());
        assert_eq!(auth.session(&back), Some(session.clone()));
        assert_eq!(signed.value(), session.encode());
        // A forged value (another expiry) without the signature is not a session.
        let forged = format!("{SESSION_COOKIE}={}.{}", session.id, session.expires + 1);
        headers.insert(axum::http::header::COOKIE, forged.parse().unwrap());
        let back = SignedCookieJar::from_headers(&headers, auth.key().clone());
        assert_eq!(auth.session(&back), None);
        // Revoked: refused although well signed.
        auth.revoke(&session);
        headers.insert(axum::http::header::COOKIE, set.parse().unwrap());
        let back = SignedCookieJar::from_headers(&headers, auth.key().clone());
        assert_eq!(auth.session(&back), None);
    }

    fn jar_header(jar: &SignedCookieJar) -> String {
        use axum::response::IntoResponse as _;
        let response = (jar.clone(), ()).into_response();
        let set = response
            .headers()
            .get(axum::http::header::SET_COOKIE)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        set.split(';').next().unwrap().to_owned()
    }

    #[tokio::test]
    async fn password_verifies_against_its_hash_only_and_failures_slow_their_address() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let auth = Auth::new(Some(hash), session_key(None).unwrap(), false).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(
            auth.verify_password(a, "correct horse".into()).await,
            LoginVerdict::Accepted
        );
        assert_eq!(
            auth.verify_password(a, "wrong".into()).await,
            LoginVerdict::Refused
        );
        assert!(
            matches!(
                auth.verify_password(a, "correct horse".into()).await,
                LoginVerdict::TooSoon(_)
            ),
            "a failure makes its address wait"
        );
        assert_eq!(
            auth.verify_password(b, "correct horse".into()).await,
            LoginVerdict::Accepted,
            "another address does not"
        );
        assert!(matches!(
            Auth::new(Some("plain".into()), session_key(None).unwrap(), false),
            Err(AuthError::BadHash(_))
        ));
    }
}
