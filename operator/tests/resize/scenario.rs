//! One resize under load, measured: warm the pool, record the steady hit ratio, resize at a
//! window boundary while readers and writers keep going, record the windows after, and keep
//! where every key was before and after.
//!
//! The resize is the operator's (a spec change through `PoolHandle::set_spec`, see
//! `harness`), or, for the comparison, a `PlainPool`'s switch to the new ring.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cache_node::client::PoolClient;

use crate::harness::{Clean, PlainPool, Pool, Resize, Snapshot};
use crate::load::{self, Checker, Keys, Load, LoadConfig, Verdict, Window};

/// Per-node capacity: room for every key on one node several times over, so nothing is
/// evicted and every miss is the resize's doing.
pub const CAPACITY_MIB: u64 = 64;

/// Window 0 warms connections up; it is not part of the steady state.
const WARMUP: usize = 1;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub from: u32,
    pub to: u32,
    pub handoff: bool,
    pub keys: usize,
    /// Windows measured before the resize.
    pub steady: usize,
    /// Windows measured after the window in which the resize ended.
    pub after: usize,
    /// Values carry `pad.0..pad.0 + pad.1` bytes of padding.
    pub pad: (usize, usize),
}

impl Scenario {
    pub fn new(from: u32, to: u32) -> Scenario {
        Scenario {
            from,
            to,
            handoff: true,
            keys: 20_000,
            steady: 2,
            after: 3,
            pad: (64, 384),
        }
    }

    /// The same ring change on a `PlainPool`: clients switch straight to the new ring.
    pub fn without_handoff(self) -> Scenario {
        Scenario {
            handoff: false,
            ..self
        }
    }

    fn name(&self) -> String {
        let kind = if self.to > self.from {
            "grow"
        } else {
            "shrink"
        };
        let handoff = if self.handoff {
            "through the operator"
        } else {
            "plain nodes, clients switched to the new ring, WITHOUT hand-off"
        };
        format!("{kind} {}->{} {handoff}", self.from, self.to)
    }
}

/// What a scenario measured.
#[derive(Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub windows: Vec<Window>,
    /// The window in which the resize began (at its start) and the one in which it ended.
    pub resize_began: usize,
    pub resize_ended: usize,
    pub steady_pct: f64,
    /// What the operator's resize did (`None` for a plain pool).
    pub resize: Option<Resize>,
    pub verdict: Verdict,
    /// Key -> slot, before the resize and after it (keys held by one node only).
    pub before: HashMap<Vec<u8>, u32>,
    pub after: HashMap<Vec<u8>, u32>,
    /// Keys held by two nodes at once in either snapshot.
    pub doubled: usize,
    /// The end state, checked (with hand-off only: without it, old copies stay behind).
    pub clean: Option<Clean>,
    /// Keys read from the resize on while cached and untouched, and how many of their first
    /// such reads hit (`Checker::cold`).
    pub cold: (u64, u64),
    /// When the resize began and completed, in ms from window 0.
    pub resize_ms: (i128, i128),
}

impl Outcome {
    /// Windows from the resize on.
    pub fn since_resize(&self) -> &[Window] {
        &self.windows[self.resize_began..]
    }

    /// The lowest hit ratio of a window from the resize on.
    pub fn min_pct(&self) -> f64 {
        self.since_resize()
            .iter()
            .map(Window::hit_pct)
            .fold(f64::INFINITY, f64::min)
    }

    /// The hit ratio of the first read of each cached key from the resize on, in percent.
    pub fn cold_pct(&self) -> f64 {
        100.0 * self.cold.1 as f64 / self.cold.0.max(1) as f64
    }

    /// Keys present both before and after: (moved, stayed).
    pub fn movement(&self) -> (usize, usize) {
        let (mut moved, mut stayed) = (0, 0);
        for (key, slot) in &self.before {
            match self.after.get(key) {
                Some(s) if s == slot => stayed += 1,
                Some(_) => moved += 1,
                None => {}
            }
        }
        (moved, stayed)
    }

    pub fn print(&self) {
        let s = &self.scenario;
        println!("== {}: {} keys, Zipf 0.99", s.name(), s.keys);
        for (w, window) in self.windows.iter().enumerate() {
            let tag = if w < WARMUP {
                "warm-up"
            } else if w < self.resize_began {
                "steady"
            } else if w <= self.resize_ended {
                "RESIZE"
            } else {
                "after"
            };
            println!(
                "   window {w:2} {tag:7}: {:6} reads, hit ratio {:6.2} %",
                window.reads,
                window.hit_pct()
            );
        }
        let (moved, stayed) = self.movement();
        println!(
            "   steady {:.2} %, lowest window from the resize on {:.2} % (drop {:.2} points)",
            self.steady_pct,
            self.min_pct(),
            self.steady_pct - self.min_pct()
        );
        println!(
            "   keys moved {:.2} % ({moved} of {}; expected {:.2} %)",
            100.0 * moved as f64 / (moved + stayed).max(1) as f64,
            moved + stayed,
            100.0 * expected_share(s.from, s.to)
        );
        println!(
            "   first read of each cached key from the resize on: {} keys, hit ratio {:.2} %",
            self.cold.0,
            self.cold_pct()
        );
        match &self.resize {
            Some(resize) => println!(
                "   {} (migrating ring at +{} ms, completed ring at +{} ms)",
                resize.describe(),
                self.resize_ms.0,
                self.resize_ms.1
            ),
            None => println!("   clients switched at +{} ms", self.resize_ms.0),
        }
        let v = &self.verdict;
        println!(
            "   reads {} (hits {}), writes acked {}, deletes acked {}, stale {}, corrupt {}, in doubt {}, unexplained misses {}, write errors {}, read errors {}",
            v.reads,
            v.hits,
            v.writes_acked,
            v.deletes_acked,
            v.stale,
            v.corrupt,
            v.in_doubt,
            v.unexplained_misses,
            v.write_errors,
            v.read_errors
        );
        for sample in &v.samples {
            println!("   ! {sample}");
        }
        if let Some(clean) = self.clean {
            println!(
                "   end state clean: {} items, {} bytes",
                clean.items, clean.bytes
            );
        }
    }
}

/// The share of keys a resize `from -> to` must move: the new slots' share on a grow, the
/// removed slots' share on a shrink.
pub fn expected_share(from: u32, to: u32) -> f64 {
    let (small, large) = (from.min(to), from.max(to));
    f64::from(large - small) / f64::from(large)
}

/// Key -> slot of the keys held by exactly one node, and how many were held by more.
fn placement(snapshot: &Snapshot) -> (HashMap<Vec<u8>, u32>, usize) {
    let mut doubled = 0;
    let mut out = HashMap::new();
    for (key, slots) in snapshot.placement() {
        if let [slot] = slots[..] {
            out.insert(key.to_vec(), slot);
        } else {
            doubled += 1;
        }
    }
    (out, doubled)
}

/// The pool a scenario resizes.
enum Subject {
    Operator(Box<Pool>),
    Plain(PlainPool),
}

impl Subject {
    fn client(&self) -> Arc<PoolClient> {
        match self {
            Subject::Operator(pool) => pool.client(),
            Subject::Plain(pool) => pool.client(),
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        match self {
            Subject::Operator(pool) => pool.snapshot(),
            Subject::Plain(pool) => pool.snapshot(),
        }
    }
}

/// Runs `s` and returns what it measured; asserts only what must hold for the measure to mean
/// anything (the prefill and the resize themselves succeeded).
pub async fn run(s: Scenario) -> Outcome {
    let mut pool = if s.handoff {
        Subject::Operator(Box::new(Pool::start(s.from, CAPACITY_MIB).await))
    } else {
        Subject::Plain(PlainPool::start(s.from, CAPACITY_MIB).await)
    };
    let checker = Arc::new(Checker::new(Keys::new(s.keys, s.pad.0, s.pad.1)));
    let failed = load::prefill(pool.client(), checker.clone(), 16).await;
    assert_eq!(failed, 0, "prefill writes failed");

    let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
    let resize_began = WARMUP + s.steady;
    load.until_window(resize_began).await;
    let (before, doubled_before) = placement(&pool.snapshot());
    checker.arm();
    let (resize, resize_ms) = match &mut pool {
        Subject::Operator(p) => {
            let resize = p.resize_to(s.to).await;
            let ms = (checker.ms(resize.began), checker.ms(resize.completed));
            (Some(resize), ms)
        }
        Subject::Plain(p) => {
            let at: Instant = p.resize_to(s.to).await;
            (None, (checker.ms(at), checker.ms(at)))
        }
    };
    let resize_ended = load.window_now();
    let (after, doubled_after) = placement(&pool.snapshot());
    let windows = load.stop_at(resize_ended + 1 + s.after).await;

    let clean = match &mut pool {
        Subject::Operator(p) => Some(p.check_clean().await),
        Subject::Plain(_) => None,
    };
    match pool {
        Subject::Operator(p) => p.shutdown().await,
        Subject::Plain(p) => p.shutdown().await,
    }
    let steady_pct = load::hit_pct(&windows[WARMUP..resize_began]);
    let outcome = Outcome {
        scenario: s,
        windows,
        resize_began,
        resize_ended,
        steady_pct,
        resize,
        verdict: checker.verdict(),
        before,
        after,
        doubled: doubled_before + doubled_after,
        clean,
        cold: checker.cold(),
        resize_ms,
    };
    outcome.print();
    outcome
}

/// Hit-ratio tolerance: every window from the resize on stays this close to the steady state.
pub const HIT_RATIO_POINTS: f64 = 1.0;

/// Relative tolerance on the share of keys moved.
pub const MOVE_TOLERANCE: f64 = 0.03;

/// Asserts what a resize with hand-off must achieve (issue "The ring and rebalancing").
pub fn assert_lossless(o: &Outcome) {
    let s = o.scenario;
    let v = &o.verdict;
    assert_eq!(v.stale, 0, "stale reads: {:?}", v.samples);
    assert_eq!(v.corrupt, 0, "corrupt reads: {:?}", v.samples);
    assert_eq!(v.read_errors, 0, "read errors");
    assert_eq!(o.doubled, 0, "keys held by two nodes outside a migration");
    let resize = o
        .resize
        .as_ref()
        .unwrap_or_else(|| panic!("a lossless resize is the operator's"));
    // The harness's own "hand-off error" is gone with its orchestrator: the operator completes
    // a migration only once every live previous member reported its hand-off done, so a
    // completed resize with no dead member and no replacement is the same check.
    assert!(
        resize.dead.is_empty() && resize.replaced.is_empty(),
        "{}",
        resize.describe()
    );
    assert_eq!(
        (resize.from, resize.to),
        (s.from, s.to),
        "the operator resized {} -> {}",
        resize.from,
        resize.to
    );
    assert_eq!(
        resize.left_on_removed, 0,
        "removed nodes still held items when the operator stopped them"
    );
    assert_eq!(resize.keys_dropped(), 0, "the hand-off dropped keys");

    for (w, window) in o.windows.iter().enumerate().skip(o.resize_began) {
        let pct = window.hit_pct();
        assert!(
            (pct - o.steady_pct).abs() <= HIT_RATIO_POINTS,
            "window {w}: hit ratio {pct:.2} % is more than {HIT_RATIO_POINTS} point from the \
             steady {:.2} %",
            o.steady_pct
        );
    }

    let (moved, stayed) = o.movement();
    let share = moved as f64 / (moved + stayed) as f64;
    let expected = expected_share(s.from, s.to);
    assert!(
        (share - expected).abs() <= MOVE_TOLERANCE * expected,
        "moved {:.3} % of the keys, expected {:.3} % within {} % of it",
        100.0 * share,
        100.0 * expected,
        100.0 * MOVE_TOLERANCE
    );
    let mut wrong = Vec::new();
    for (key, &slot) in &o.before {
        let Some(&now) = o.after.get(key) else {
            continue;
        };
        let must_move = cachepool_crds::ring::moves(s.from, s.to, key);
        let allowed = if s.to > s.from {
            now >= s.from
        } else {
            slot >= s.to
        };
        if (now != slot) != must_move || (now != slot && !allowed) {
            wrong.push(format!(
                "{} slot {slot} -> {now}",
                String::from_utf8_lossy(key)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} keys moved where the ring says they must not, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}
