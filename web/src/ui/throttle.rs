//! The login back-off, per client: failed manager logins slow down the address they came
//! from, and only that address, so that someone guessing from elsewhere cannot lock the real
//! administrator out.
//!
//! - **Per address.** Each failure from an address doubles the wait before that address may try
//!   again ([`backoff`]: 250 ms, 500 ms, … capped at [`MAX_BACKOFF`]); an attempt inside the wait
//!   is refused at once (429 with `Retry-After`) without running argon2, and an address has one
//!   attempt in flight at a time. A success clears the address; failures older than
//!   [`FORGET_AFTER`] are forgotten. IPv6 clients are counted by their /64, the block one
//!   machine usually holds, so that hopping through its addresses gains nothing.
//! - **Global caps.** Password checks (argon2, deliberately slow) run one at a time in
//!   arrival order, so many addresses guessing at once cost the CPU one check at a time and
//!   the administrator waits behind at most one check per guessing address; the table holds
//!   at most [`MAX_CLIENTS`] addresses, and when it is full the address whose wait ended
//!   longest ago makes room.
//! - **Which address.** The peer of the TCP connection ([`crate::listener::ClientAddr`]). Behind
//!   a reverse proxy every request comes from the proxy, so `--trusted-proxy` names the proxies
//!   whose `X-Forwarded-For` is believed: the client is the right-most address in it that is not
//!   a trusted proxy. From any other peer the header is ignored: anyone can write it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;
use tokio::sync::Semaphore;

/// First wait after a failed login; doubles with each further failure from the address.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two attempts from one address.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Failures are forgotten this long after the wait they earned ended.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most addresses the table tracks.
pub const MAX_CLIENTS: usize = 10_000;

/// The wait an address has earned after `failures` failed attempts in a row.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// The address a client is counted by: IPv4 as it is (an IPv4-mapped IPv6 address too), IPv6
/// by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// The client of a request: the connection's peer, or, when the peer is a trusted proxy, the
/// right-most address of `X-Forwarded-For` that is not a trusted proxy. Without a peer (a
/// router served without connection info) every client is one: the unspecified address.
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let Some(peer) = peer else {
        return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    };
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        // An entry that is not an address ends what can be believed: the proxy next to it
        // did not write it.
        let Ok(ip) = entry.parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// What a login attempt may do now.
#[derive(Debug)]
pub enum Admission<'a> {
    /// Check the password, holding this (the address's one attempt in flight).
    Check(Attempt<'a>),
    /// Refused: the address must wait this long.
    Wait(Duration),
}

/// Failed logins of one address.
#[derive(Debug)]
struct Entry {
    failures: u32,
    not_before: Instant,
    in_flight: bool,
}

/// The per-address back-off table and the one-check-at-a-time gate.
#[derive(Debug)]
pub struct LoginThrottle {
    clients: Mutex<HashMap<IpAddr, Entry>>,
    checks: Semaphore,
    max_clients: usize,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::with_capacity(MAX_CLIENTS)
    }
}

impl LoginThrottle {
    /// A throttle tracking at most `max_clients` addresses.
    pub fn with_capacity(max_clients: usize) -> LoginThrottle {
        LoginThrottle {
            clients: Mutex::new(HashMap::new()),
            checks: Semaphore::new(1),
            max_clients: max_clients.max(1),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.table().len()
    }

    /// Whether `client` may attempt a login now; if so, the attempt to report back.
    pub fn admit(&self, client: IpAddr) -> Admission<'_> {
        self.admit_at(client, Instant::now())
    }

    /// [`LoginThrottle::admit`] at `now` (the tests' clock).
    fn admit_at(&self, client: IpAddr, now: Instant) -> Admission<'_> {
        let key = client_key(client);
        let mut table = self.table();
        if let Some(entry) = table.get_mut(&key) {
            if entry.in_flight || now < entry.not_before {
                let wait = entry.not_before.saturating_duration_since(now);
                return Admission::Wait(wait.max(FIRST_BACKOFF));
            }
            if now.duration_since(entry.not_before) > FORGET_AFTER {
                entry.failures = 0;
            }
            entry.in_flight = true;
        } else {
            if table.len() >= self.max_clients {
                make_room(&mut table, self.max_clients, now);
            }
            table.insert(
                key,
                Entry {
                    failures: 0,
                    not_before: now,
                    in_flight: true,
                },
            );
        }
        Admission::Check(Attempt {
            throttle: self,
            key,
            reported: false,
        })
    }
}

/// Frees a place when the table is full: forgotten entries go first, else the idle entry whose
/// wait ended first. (Entries with an attempt in flight stay: there are at most as many as
/// requests being served.)
fn make_room(table: &mut HashMap<IpAddr, Entry>, max: usize, now: Instant) {
    table.retain(|_, e| e.in_flight || now.saturating_duration_since(e.not_before) <= FORGET_AFTER);
    if table.len() < max {
        return;
    }
    let oldest = table
        .iter()
        .filter(|(_, e)| !e.in_flight)
        .min_by_key(|(_, e)| e.not_before)
        .map(|(k, _)| *k);
    if let Some(oldest) = oldest {
        table.remove(&oldest);
    }
}

/// One admitted attempt: the password check waits its turn ([`Attempt::turn`]), and the
/// outcome is reported ([`Attempt::succeeded`], [`Attempt::failed`]). Dropped unreported (the
/// client went away mid-check), the address is free again and counts no failure.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    key: IpAddr,
    reported: bool,
}

impl Attempt<'_> {
    /// Waits until no other password check runs; the check runs while the permit is held.
    pub async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.throttle.checks.acquire().await.ok()
    }

    /// The password was right: the address starts afresh.
    pub fn succeeded(mut self) {
        self.reported = true;
        self.throttle.table().remove(&self.key);
    }

    /// The password was wrong: the address waits longer; returns its failures in a row.
    pub fn failed(self) -> u32 {
        self.failed_at(Instant::now())
    }

    /// [`Attempt::failed`] at `now` (the tests' clock).
    fn failed_at(mut self, now: Instant) -> u32 {
        self.reported = true;
        let mut table = self.throttle.table();
        let Some(entry) = table.get_mut(&self.key) else {
            return 0;
        };
        entry.failures = entry.failures.saturating_add(1);
        entry.not_before = now + backoff(entry.failures);
        entry.in_flight = false;
        entry.failures
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.reported
            && let Some(entry) = self.throttle.table().get_mut(&self.key)
        {
            entry.in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A throttle and a clock that moves only when told.
    struct Clock {
        throttle: LoginThrottle,
        now: Instant,
    }

    impl Clock {
        fn new(max_clients: usize) -> Clock {
            Clock {
                throttle: LoginThrottle::with_capacity(max_clients),
                now: Instant::now(),
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        fn check(&self, client: &str) -> Attempt<'_> {
            match self.throttle.admit_at(ip(client), self.now) {
                Admission::Check(attempt) => attempt,
                Admission::Wait(wait) => panic!("{client} must wait {wait:?}"),
            }
        }

        fn fail(&self, client: &str) -> u32 {
            self.check(client).failed_at(self.now)
        }

        fn waits(&self, client: &str) -> Duration {
            match self.throttle.admit_at(ip(client), self.now) {
                Admission::Wait(wait) => wait,
                Admission::Check(_) => panic!("{client} was admitted"),
            }
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(3), FIRST_BACKOFF * 4);
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[test]
    fn failures_slow_down_their_address_only() {
        let mut clock = Clock::new(MAX_CLIENTS);
        assert_eq!(clock.fail("10.0.0.1"), 1);
        assert_eq!(clock.waits("10.0.0.1"), FIRST_BACKOFF);
        // Another address is not slowed down by it.
        clock.check("10.0.0.2").succeeded();
        clock.advance(FIRST_BACKOFF);
        assert_eq!(clock.fail("10.0.0.1"), 2);
        assert_eq!(clock.waits("10.0.0.1"), FIRST_BACKOFF * 2);
        clock.advance(FIRST_BACKOFF);
        assert_eq!(clock.waits("10.0.0.1"), FIRST_BACKOFF);
        clock.advance(FIRST_BACKOFF);
        assert_eq!(clock.fail("10.0.0.1"), 3);
        assert_eq!(clock.waits("10.0.0.1"), FIRST_BACKOFF * 4);
        clock.advance(FIRST_BACKOFF * 4);
        clock.check("10.0.0.1").succeeded();
        assert_eq!(clock.throttle.tracked(), 0, "a success clears the address");
    }

    #[test]
    fn one_attempt_in_flight_per_address_and_a_dropped_one_frees_it() {
        let clock = Clock::new(MAX_CLIENTS);
        let first = clock.check("10.0.0.1");
        clock.waits("10.0.0.1");
        drop(first);
        assert_eq!(clock.fail("10.0.0.1"), 1, "no failure was counted");
    }

    #[test]
    fn old_failures_are_forgotten() {
        let mut clock = Clock::new(MAX_CLIENTS);
        for _ in 0..5 {
            clock.fail("10.0.0.1");
            clock.advance(MAX_BACKOFF);
        }
        clock.advance(FORGET_AFTER + Duration::from_secs(1));
        assert_eq!(clock.fail("10.0.0.1"), 1);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_the_addresses_still_waiting() {
        let mut clock = Clock::new(100);
        clock.fail("10.0.0.1");
        for i in 0..1000u32 {
            clock.advance(Duration::from_millis(1));
            clock.fail(&Ipv4Addr::from(0x0b00_0000 + i).to_string());
            assert!(clock.throttle.tracked() <= 100);
        }
        assert_eq!(clock.throttle.tracked(), 100);
        // The latest guessers are still slowed down; the first one made room.
        clock.waits("11.0.3.231");
        clock.check("10.0.0.1").succeeded();
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff::9")),
            client_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.4, 10.0.0.2".parse().unwrap(),
        );
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // From a trusted proxy: the right-most address that is not a proxy.
        assert_eq!(
            client_ip(Some(ip("10.0.0.1")), &headers, &trusted),
            ip("198.51.100.4")
        );
        // From anyone else: the header is the client's own claim, ignored.
        assert_eq!(
            client_ip(Some(ip("192.0.2.1")), &headers, &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.1")), &headers, &[]),
            ip("10.0.0.1")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_ip(Some(ip("10.0.0.1")), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(client_ip(None, &headers, &trusted), ip("0.0.0.0"));
    }
}
