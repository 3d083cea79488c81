//! Key names and key popularity: which key a benchmark request names.
//!
//! Zipf ranks are mapped to keys through a permutation, so the popular keys are spread over
//! the key space (and over shards and hash buckets) instead of being keys 0, 1, 2, ...

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// Appends key number `i` padded to exactly `len` bytes: `k`, then zero-padded decimal.
/// `len` must leave room for the digits (checked by `check_key_size`).
pub fn write_key(out: &mut Vec<u8>, i: u64, len: usize) {
    let mut digits = [0u8; 20];
    let mut n = i;
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &digits[d..];
    out.push(b'k');
    out.resize(out.len() + len.saturating_sub(1 + digits.len()), b'0');
    out.extend_from_slice(digits);
}

/// Checks that keys 0..count fit in `len` bytes and in memcached's 250-byte key limit.
pub fn check_key_size(count: u64, len: usize) -> anyhow::Result<()> {
    let digits = count.saturating_sub(1).max(1).ilog10() as usize + 1;
    if len < 1 + digits {
        anyhow::bail!(
            "--key-size {len} is too small for {count} keys: use at least {}",
            1 + digits
        );
    }
    if len > 250 {
        anyhow::bail!("--key-size {len} is over memcached's 250-byte key limit");
    }
    Ok(())
}

/// A bijection of `0..n` (an affine map modulo n with a multiplier coprime to n): cheap,
/// stateless, and every key is hit by exactly one rank, so a prefilled key set stays 100% hits.
#[derive(Clone, Copy, Debug)]
pub struct Permutation {
    n: u64,
    mult: u64,
    add: u64,
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Permutation {
        let n = n.max(1);
        // Start near n times the golden ratio so neighbouring ranks land far apart.
        let mut mult = ((n as f64 * 0.618_033_988_75) as u64).max(1) | 1;
        while gcd(mult, n) != 1 {
            mult += 1;
        }
        Permutation {
            n,
            mult: mult % n.max(2),
            add: seed % n,
        }
    }

    pub fn apply(&self, rank: u64) -> u64 {
        ((u128::from(rank) * u128::from(self.mult) + u128::from(self.add)) % u128::from(self.n))
            as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// SplitMix64's finaliser: a bijection of u64, used to name the policy benchmark's keys.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How request keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeyDist {
    Uniform,
    /// Zipf with this exponent over ranks, ranks permuted to keys.
    Zipf(f64),
}

impl fmt::Display for KeyDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyDist::Uniform => f.write_str("uniform"),
            KeyDist::Zipf(s) => write!(f, "zipf{s}"),
        }
    }
}

impl FromStr for KeyDist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "uniform" {
            return Ok(KeyDist::Uniform);
        }
        s.strip_prefix("zipf")
            .and_then(|a| a.parse::<f64>().ok())
            .filter(|a| *a > 0.0 && a.is_finite())
            .map(KeyDist::Zipf)
            .ok_or_else(|| {
                format!("unknown key distribution {s:?}: expected uniform or zipfS, e.g. zipf0.99")
            })
    }
}

/// Draws key numbers in `0..n` following a `KeyDist`.
#[derive(Clone, Debug)]
pub struct KeySampler {
    n: u64,
    zipf: Option<Zipf<f64>>,
    perm: Permutation,
}

impl KeySampler {
    pub fn new(dist: KeyDist, n: u64, seed: u64) -> anyhow::Result<KeySampler> {
        anyhow::ensure!(n > 0, "the key space is empty");
        let zipf = match dist {
            KeyDist::Uniform => None,
            KeyDist::Zipf(s) => Some(
                Zipf::new(n as f64, s)
                    .map_err(|e| anyhow::anyhow!("zipf({s}) over {n} keys: {e}"))?,
            ),
        };
        Ok(KeySampler {
            n,
            zipf,
            perm: Permutation::new(n, seed),
        })
    }

    /// A Zipf rank in `0..n` (0 is the most popular), or a uniform key.
    pub fn rank<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match &self.zipf {
            // Zipf samples are whole numbers in 1..=n.
            Some(z) => (z.sample(rng) as u64).clamp(1, self.n) - 1,
            None => rng.random_range(0..self.n),
        }
    }

    /// A key number in `0..n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match &self.zipf {
            Some(_) => self.perm.apply(self.rank(rng)),
            None => self.rank(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn keys_are_padded_to_exactly_the_requested_length() {
        let mut out = Vec::new();
        write_key(&mut out, 42, 8);
        assert_eq!(out, b"k0000042");
        out.clear();
        write_key(&mut out, 0, 2);
        assert_eq!(out, b"k0");
        out.clear();
        write_key(&mut out, 999_999, 32);
        assert_eq!(out.len(), 32);
        assert!(out.ends_with(b"999999"));
    }

    #[test]
    fn key_size_check_rejects_keys_too_short_for_the_count() {
        assert!(check_key_size(1_000_000, 7).is_ok());
        assert!(check_key_size(1_000_001, 7).is_err());
        assert!(check_key_size(10, 2).is_ok());
        assert!(check_key_size(10, 251).is_err());
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 10, 97, 100, 1000, 4096] {
            let p = Permutation::new(n, 12345);
            let mut seen = vec![false; n as usize];
            for r in 0..n {
                let k = p.apply(r) as usize;
                assert!(!seen[k], "n={n}: key {k} hit twice");
                seen[k] = true;
            }
        }
    }

    #[test]
    fn zipf_sampler_favours_low_ranks_and_stays_in_range() {
        let s = KeySampler::new(KeyDist::Zipf(0.99), 1000, 1).unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut top = 0;
        for _ in 0..10_000 {
            let r = s.rank(&mut rng);
            assert!(r < 1000);
            top += u32::from(r == 0);
            assert!(s.sample(&mut rng) < 1000);
        }
        // P(rank 1) for zipf(0.99) over 1000 keys is about 13%.
        assert!((900..1800).contains(&top), "rank 0 drawn {top} times");
    }

    #[test]
    fn key_dist_parses_its_display_form() {
        for d in [KeyDist::Uniform, KeyDist::Zipf(0.99), KeyDist::Zipf(1.0)] {
            assert_eq!(d.to_string().parse::<KeyDist>().unwrap(), d);
        }
        assert!("zipf".parse::<KeyDist>().is_err());
        assert!("zipf-1".parse::<KeyDist>().is_err());
    }
}
