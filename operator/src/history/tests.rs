use super::*;
use serde_json::json;

/// 2026-11-26T01:02:00Z, a minute boundary.
fn base() -> u64 {
    let t: Timestamp = "2026-11-26T01:02:00Z".parse().unwrap();
    t.as_second() as u64
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(base() + secs)
}

fn t_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(base() * 1000 + ms)
}

/// A node's counters: `gets` retrievals of which `misses` missed, and `requests` commands.
#[derive(Clone, Copy)]
struct Node {
    slot: u32,
    pid: u64,
    started: u64,
    gets: u64,
    misses: u64,
    requests: u64,
    items: u64,
}

impl Node {
    fn new(slot: u32, pid: u64, started: u64) -> Node {
        Node {
            slot,
            pid,
            started,
            gets: 0,
            misses: 0,
            requests: 0,
            items: 0,
        }
    }

    /// Serves `gets` retrievals (`misses` of them missing) and as many other commands.
    fn serve(&mut self, gets: u64, misses: u64) {
        self.gets += gets;
        self.misses += misses;
        self.requests += 2 * gets;
        self.items += misses;
    }

    fn at(&self, now: u64) -> NodeSample {
        NodeSample {
            slot: self.slot,
            pid: self.pid,
            uptime: now - self.started,
            get_hits: self.gets - self.misses,
            get_misses: self.misses,
            requests: self.requests,
            items: self.items,
            bytes: self.items * 100,
            evictions: 0,
            limit_bytes: 64 << 20,
        }
    }
}

fn samples(nodes: &[Node], now: u64) -> Vec<NodeSample> {
    nodes.iter().map(|n| n.at(now)).collect()
}

#[test]
fn from_stats_reads_the_node_json_and_counts_every_command() {
    let stats = json!({
        "pid": 4242, "uptime": 17, "time": 1795000000, "version": "0.1.0",
        "cmd_get": 30, "cmd_set": 7, "cmd_flush": 1, "cmd_touch": 2,
        "get_hits": 20, "get_misses": 10, "get_expired": 1,
        "delete_hits": 3, "delete_misses": 4, "incr_hits": 5, "incr_misses": 6,
        "decr_hits": 7, "decr_misses": 8, "cas_hits": 1, "cas_misses": 1, "cas_badval": 1,
        "touch_hits": 1, "touch_misses": 1, "curr_items": 99, "bytes": 12345,
        "evictions": 11, "limit_maxbytes": 67108864, "policy": "lru"
    });
    let s = NodeSample::from_stats(3, &stats).unwrap();
    assert_eq!(s.slot, 3);
    assert_eq!((s.pid, s.uptime), (4242, 17));
    assert_eq!((s.get_hits, s.get_misses, s.gets()), (20, 10, 30));
    // gets 30 + sets 7 (cas inside) + touches 2 + deletes 7 + incr 11 + decr 15; a flush is
    // not a request on a key.
    assert_eq!(s.requests, 72);
    assert_eq!((s.items, s.bytes, s.evictions), (99, 12345, 11));
    assert_eq!(s.limit_bytes, 64 << 20);
}

#[test]
fn from_stats_names_the_missing_counter() {
    let err = NodeSample::from_stats(1, &json!({"uptime": 1, "get_hits": 0})).unwrap_err();
    assert_eq!(
        err,
        Error::MissingCounter {
            slot: 1,
            key: "get_misses"
        }
    );
    assert!(err.to_string().contains("`get_misses`"), "{err}");
    let err = NodeSample::from_stats(2, &json!([1, 2])).unwrap_err();
    assert_eq!(err, Error::NotAnObject { slot: 2 });
    let mut negative = json!({"pid": 1, "uptime": 1, "get_hits": -1, "get_misses": 0,
        "cmd_set": 0, "curr_items": 0, "bytes": 0});
    assert!(NodeSample::from_stats(0, &negative).is_err());
    negative["get_hits"] = json!(0);
    assert!(NodeSample::from_stats(0, &negative).is_ok());
}

#[test]
fn first_sight_of_long_running_nodes_is_only_a_baseline() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    a.serve(1_000_000, 400_000);
    h.record(t(5000), 1, &samples(&[a], 5000));
    assert_eq!(h.totals().requests, 0);
    assert_eq!(h.window(t(5000), Duration::from_secs(60)), None);
    a.serve(50, 5);
    h.record(t(5002), 1, &samples(&[a], 5002));
    let w = h.totals();
    assert_eq!((w.gets, w.misses, w.requests), (50, 5, 100));
}

#[test]
fn pool_totals_are_the_sum_of_per_node_deltas() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut nodes = [Node::new(0, 10, 0), Node::new(1, 11, 0)];
    nodes[0].serve(500, 100);
    nodes[1].serve(70, 7);
    h.record(t(1000), 2, &samples(&nodes, 1000));
    nodes[0].serve(30, 15);
    nodes[1].serve(20, 0);
    h.record(t(1002), 2, &samples(&nodes, 1002));
    nodes[0].serve(10, 10);
    h.record(t(1004), 2, &samples(&nodes, 1004));

    let total = h.totals();
    assert_eq!((total.gets, total.misses, total.requests), (60, 25, 120));
    assert_eq!(total.covered, Duration::from_secs(4));
    let last = h.window(t(1004), Duration::from_secs(2)).unwrap();
    assert_eq!((last.gets, last.misses, last.requests), (10, 10, 20));
    assert_eq!(last.miss_rate(), Some(1.0));
    let both = h.window(t(1004), Duration::from_secs(4)).unwrap();
    assert_eq!(both.gets, 60);
    assert_eq!(both.hits(), 35);
}

#[test]
fn restarted_node_counts_from_zero() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    a.serve(100_000, 50_000);
    h.record(t(1000), 1, &samples(&[a], 1000));
    // The process restarts one second before the next round and serves 8 gets.
    let mut b = Node::new(0, 12, 1001);
    b.serve(8, 8);
    h.record(t(1002), 1, &samples(&[b], 1002));
    let w = h.totals();
    assert_eq!((w.gets, w.misses, w.requests), (8, 8, 16));
    b.serve(4, 0);
    h.record(t(1004), 1, &samples(&[b], 1004));
    assert_eq!(h.totals().gets, 12);
}

#[test]
fn uptime_going_down_under_the_same_pid_is_a_restart() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    a.serve(1_000, 500);
    h.record(t(1000), 1, &samples(&[a], 1000));
    // pid reused by the new process: uptime tells.
    let mut b = Node::new(0, 10, 1002);
    b.serve(3, 1);
    h.record(t(1002), 1, &samples(&[b], 1002));
    let w = h.totals();
    assert_eq!((w.gets, w.misses), (3, 1));
}

#[test]
fn replacement_that_ran_unobserved_is_only_a_baseline() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    a.serve(10, 1);
    h.record(t(5000), 1, &samples(&[a], 5000));
    // A process that has been up for an hour appears in the slot: its counters were made
    // before we could see them and must not land in one 2 s round.
    let mut b = Node::new(0, 13, 5002 - 3600);
    b.serve(9_000_000, 1_000_000);
    h.record(t(5002), 1, &samples(&[b], 5002));
    assert_eq!(h.totals().gets, 0);
    b.serve(10, 2);
    h.record(t(5004), 1, &samples(&[b], 5004));
    let w = h.totals();
    assert_eq!((w.gets, w.misses), (10, 2));
}

#[test]
fn new_slot_counts_from_its_start_when_it_started_within_the_round() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    h.record(t(1000), 1, &samples(&[a], 1000));
    a.serve(10, 0);
    // Grow: slot 1 started one second ago and already took 6 gets.
    let mut b = Node::new(1, 20, 1001);
    b.serve(6, 6);
    h.record(t(1002), 2, &samples(&[a, b], 1002));
    let w = h.totals();
    assert_eq!((w.gets, w.misses), (16, 6));
}

#[test]
fn counter_reset_counts_from_zero() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    a.serve(1_000, 500);
    h.record(t(1000), 1, &samples(&[a], 1000));
    // `stats reset`: same process, counters back to zero, then 5 gets.
    a.gets = 0;
    a.misses = 0;
    a.requests = 0;
    a.serve(5, 2);
    h.record(t(1002), 1, &samples(&[a], 1002));
    let w = h.totals();
    assert_eq!((w.gets, w.misses, w.requests), (5, 2, 10));
}

#[test]
fn node_missing_a_round_is_spread_over_the_rounds_it_missed() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut nodes = [Node::new(0, 10, 0), Node::new(1, 11, 0)];
    nodes[0].items = 1000;
    nodes[1].items = 700;
    h.record(t(1000), 2, &samples(&nodes, 1000));
    for now in (1002..=1010).step_by(2) {
        for n in &mut nodes {
            n.serve(50, 10);
        }
        let answered: Vec<NodeSample> = if now == 1004 || now == 1006 {
            vec![nodes[0].at(now)]
        } else {
            samples(&nodes, now)
        };
        h.record(t(now), 2, &answered);
        if now == 1004 {
            // Slot 1's items (as of 1002) are carried forward while it is silent.
            let s = h.latest(t(now), Duration::from_secs(2));
            assert_eq!(s.answered, 1);
            assert_eq!(s.items, 1020 + 710);
        }
    }
    // Every 2 s round carries both nodes' 200 requests: no dip while slot 1 was silent and
    // no spike when it answered again.
    for end in (1002..=1010).step_by(2) {
        let w = h.window(t(end), Duration::from_secs(2)).unwrap();
        assert_eq!(
            (w.requests, w.gets, w.misses),
            (200, 100, 20),
            "round {end}"
        );
    }
    assert_eq!(h.totals().requests, 1000);
}

#[test]
fn removed_node_does_not_make_totals_jump() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut nodes = vec![
        Node::new(0, 10, 0),
        Node::new(1, 11, 0),
        Node::new(2, 12, 0),
    ];
    for n in &mut nodes {
        n.items = 500;
    }
    h.record(t(0), 3, &samples(&nodes, 0));
    let mut previous_total = 0;
    for now in (2..=240).step_by(2) {
        if now == 120 {
            // Shrink: slot 2 leaves the ring and stops answering; its traffic moves over.
            nodes.pop();
        }
        let share = 300 / nodes.len() as u64;
        for n in &mut nodes {
            n.serve(share / 2, share / 10);
        }
        h.record(t(now), nodes.len() as u32, &samples(&nodes, now));
        let total = h.totals().requests;
        assert_eq!(total - previous_total, 300, "round {now}");
        previous_total = total;
    }
    let points = h.points(t(0), t(240));
    assert_eq!(points.len(), 4);
    for p in &points {
        assert!((p.requests_per_minute - 9000.0).abs() < 1e-9, "{p:?}");
        assert!((p.miss_rate.unwrap() - 0.2).abs() < 1e-9, "{p:?}");
    }
    assert_eq!(points[1].nodes, 3);
    assert_eq!(points[2].nodes, 2);
    // The removed node's items no longer count once it is gone.
    assert_eq!(
        h.latest(t(240), Duration::from_secs(60)).items,
        2 * (500 + 59 * 10 + 61 * 15)
    );
}

#[test]
fn node_silent_longer_than_the_gap_comes_back_as_a_baseline() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut nodes = [Node::new(0, 10, 0), Node::new(1, 11, 0)];
    h.record(t(0), 2, &samples(&nodes, 0));
    let gap = MAX_GAP.as_secs() + 60;
    for now in (2..=gap + 2).step_by(2) {
        nodes[0].serve(10, 1);
        nodes[1].serve(10, 1);
        let answered = if now <= gap {
            vec![nodes[0].at(now)]
        } else {
            samples(&nodes, now)
        };
        h.record(t(now), 2, &answered);
    }
    // Slot 1's six silent minutes cannot be placed in time: they are not counted at all,
    // rather than all at once.
    let last = h.window(t(gap + 2), Duration::from_secs(2)).unwrap();
    assert_eq!(last.gets, 10);
    assert_eq!(h.totals().gets, 10 * (gap / 2 + 1));
}

#[test]
fn window_prorates_rounds_at_its_edges_and_reports_coverage() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    h.record(t(0), 1, &samples(&[a], 0));
    for now in (2..=200).step_by(2) {
        a.serve(50, 10);
        h.record(t(now), 1, &samples(&[a], now));
    }
    // (1, 61]: half of (0, 2], 29 whole rounds, half of (60, 62].
    let w = h.window(t(61), Duration::from_secs(60)).unwrap();
    assert_eq!(w.covered, Duration::from_secs(60));
    assert_eq!((w.gets, w.misses, w.requests), (1500, 300, 3000));
    assert_eq!(w.requests_per_minute(), Some(3000.0));
    assert_eq!(w.miss_rate(), Some(0.2));
    assert_eq!(w.hit_rate(), Some(0.8));

    // Only 30 s of a 60 s window before the first sample: not enough to decide anything.
    assert_eq!(h.window(t(30), Duration::from_secs(60)), None);
    let most = h.window(t(40), Duration::from_secs(60)).unwrap();
    assert_eq!(most.covered, Duration::from_secs(40));
    assert_eq!(most.requests_per_minute(), Some(3000.0));
    // After the last sample the window runs out of data too.
    assert_eq!(h.window(t(260), Duration::from_secs(60)), None);
    let tail = h.window(t_ms(225_000), Duration::from_secs(60)).unwrap();
    assert_eq!(tail.covered, Duration::from_secs(35));
}

#[test]
fn points_aggregate_each_minute_and_normalise_partial_minutes() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    // Sampling starts 40 s into the first minute.
    h.record(t(40), 1, &samples(&[a], 40));
    for now in (42..180).step_by(2) {
        let misses = if now < 60 { 10 } else { 25 };
        a.serve(50, misses);
        h.record(t(now), 1, &samples(&[a], now));
    }
    let points = h.points(t(0), t(180));
    assert_eq!(points.len(), 3);
    let first = &points[0];
    assert_eq!(first.t.as_second() as u64, base());
    // 9 rounds over 18 s: 900 requests, i.e. 3000 a minute.
    assert_eq!(first.requests_per_minute, 3000.0);
    assert_eq!(first.miss_rate, Some(0.2));
    assert_eq!(first.hit_rate, Some(0.8));
    // Items are the minute's last value (the round at 58 s).
    assert_eq!(first.items, 9 * 10);
    assert_eq!(first.bytes, 9 * 10 * 100);
    assert_eq!(first.nodes, 1);
    assert_eq!(points[1].t.as_second() as u64, base() + 60);
    assert_eq!(points[1].requests_per_minute, 3000.0);
    assert_eq!(points[1].miss_rate, Some(0.5));
    assert_eq!(points[1].items, 90 + 30 * 25);
    // [from, to) selects by minute start.
    let middle = h.points(t(60), t(120));
    assert_eq!(middle.len(), 1);
    assert_eq!(middle[0], points[1]);
    assert!(h.points(t(1), t(60)).is_empty());
}

#[test]
fn minutes_without_data_are_absent() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    for now in [0, 20, 40] {
        a.serve(10, 1);
        h.record(t(now), 1, &samples(&[a], now));
    }
    // Ten silent minutes (longer than the gap), then sampling resumes.
    for now in [640, 660, 680, 700] {
        a.serve(10, 1);
        h.record(t(now), 1, &samples(&[a], now));
    }
    let minutes: Vec<u64> = h
        .points(t(0), t(3600))
        .iter()
        .map(|p| (p.t.as_second() as u64 - base()) / 60)
        .collect();
    // Minute 10 held only the baseline round, which covers no time.
    assert_eq!(minutes, [0, 11]);
    // The round after the silence only re-established the baseline.
    assert_eq!(h.totals().gets, 20 + 30);
}

#[test]
fn point_serialises_as_the_api_contract() {
    let p = Point {
        t: Timestamp::from_second(base() as i64 + 60).unwrap(),
        nodes: 2,
        miss_rate: Some(0.25),
        hit_rate: Some(0.75),
        items: 10,
        bytes: 2048,
        requests_per_minute: 3000.0,
    };
    let text = serde_json::to_string(&p).unwrap();
    assert_eq!(
        text,
        r#"{"t":"2026-11-26T01:03:00Z","nodes":2,"missRate":0.25,"hitRate":0.75,"items":10,"bytes":2048,"requestsPerMinute":3000.0}"#
    );
    assert_eq!(serde_json::from_str::<Point>(&text).unwrap(), p);

    // A minute with traffic but no gets has null rates.
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    h.record(t(0), 1, &samples(&[a], 0));
    a.requests += 40;
    h.record(t(2), 1, &samples(&[a], 2));
    let points = h.points(t(0), t(60));
    let value = serde_json::to_value(&points).unwrap();
    assert_eq!(
        value,
        json!([{"t": "2026-11-26T01:02:00Z", "nodes": 1, "missRate": null, "hitRate": null,
            "items": 0, "bytes": 0, "requestsPerMinute": 1200.0}])
    );
}

#[test]
fn clock_stepping_back_counts_nothing_twice() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut a = Node::new(0, 10, 0);
    h.record(t(1000), 1, &samples(&[a], 1000));
    a.serve(10, 0);
    h.record(t(1002), 1, &samples(&[a], 1002));
    a.serve(10, 0);
    h.record(t(1001), 1, &samples(&[a], 1003));
    assert_eq!(h.totals().gets, 10);
    a.serve(10, 0);
    h.record(t(1004), 1, &samples(&[a], 1004));
    assert_eq!(h.totals().gets, 20);
    assert_eq!(h.rounds_held(), 3);
}

#[test]
fn latest_reports_gauges_and_window_rates() {
    let mut h = PoolHistory::new(MIN_RETENTION);
    assert_eq!(h.latest(t(0), Duration::from_secs(60)), Summary::default());
    let mut nodes = [Node::new(0, 10, 0), Node::new(1, 11, 0)];
    h.record(t(0), 3, &samples(&nodes, 0));
    for now in (2..=60).step_by(2) {
        nodes[0].serve(40, 10);
        nodes[1].serve(60, 10);
        h.record(t(now), 3, &samples(&nodes, now));
    }
    let s = h.latest(t(61), Duration::from_secs(60));
    assert_eq!(s.sampled_at, Some(t(60)));
    assert_eq!((s.nodes, s.answered), (3, 2));
    assert_eq!(s.items, 2 * 30 * 10);
    assert_eq!(s.bytes, 2 * 30 * 10 * 100);
    assert_eq!(s.miss_rate, Some(0.2));
    assert_eq!(s.hit_rate, Some(0.8));
    // (1, 61] holds 59 s of samples: 200 requests per 2 s.
    let w = s.window.unwrap();
    assert_eq!(w.covered, Duration::from_secs(59));
    assert_eq!(w.requests, 5900);
    assert_eq!(s.requests_per_minute, Some(6000.0));
}

#[test]
fn a_day_at_two_second_sampling_stays_within_its_memory_bound() {
    const DAY: u64 = 24 * 3600;
    let mut h = PoolHistory::new(MIN_RETENTION);
    let mut nodes: Vec<Node> = (0..8)
        .map(|s| Node::new(s, 100 + u64::from(s), 0))
        .collect();
    let mut max_memory = 0;
    for now in (0..=DAY + 3600).step_by(2) {
        for n in &mut nodes {
            n.serve(40, 10);
            n.items = 1000;
        }
        h.record(t(now), 8, &samples(&nodes, now));
        max_memory = max_memory.max(h.memory_bytes());
    }
    let end = DAY + 3600;
    // About 150 KB each of rounds and minutes at this rate; 512 KiB is the stated bound.
    assert!(max_memory <= 512 * 1024, "{max_memory} bytes");
    assert!(h.rounds_held() <= 3660 / 2 + 1, "{}", h.rounds_held());
    assert_eq!(h.minutes_held(), 1440);
    let day = h.points(t(end - DAY), t(end + 1));
    assert_eq!(day.len(), 1440);
    assert_eq!(day[0].t.as_second() as u64, base() + end - DAY + 60);
    assert!(
        day.iter()
            .all(|p| p.requests_per_minute == 8.0 * 80.0 * 30.0)
    );
    let hour = h.window(t(end), Duration::from_secs(3600)).unwrap();
    assert_eq!(hour.covered, Duration::from_secs(3600));
    assert_eq!(hour.requests, 1800 * 8 * 80);
    assert_eq!(h.totals().requests, end / 2 * 8 * 80);
}

#[test]
fn retention_below_a_day_is_raised_to_a_day() {
    let mut h = PoolHistory::new(Duration::from_secs(60));
    let mut a = Node::new(0, 10, 0);
    for now in (0..=26 * 3600).step_by(30) {
        a.serve(1, 0);
        h.record(t(now), 1, &samples(&[a], now));
    }
    assert_eq!(h.minutes_held(), 1440);
    let points = h.points(t(0), t(27 * 3600));
    assert_eq!(points.len(), 1440);
    assert_eq!(points[0].t.as_second() as u64, base() + 2 * 3600 + 60);
}
