//! CPU time of groups of processes, read from `/proc`, so that a benchmark can say how much
//! CPU each side of a comparison burned per request (on a shared two-core machine, requests
//! per second alone hide whether one side simply took more of the cores).
//!
//! The parsing of `/proc/PID/stat` is pure and unit-tested; the scan of `/proc` is the shell.

/// What a benchmark needs from one `/proc/PID/stat` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// The command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// The state letter (`R`, `S`, `Z` for a zombie, ...).
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// User and system time, in clock ticks.
    pub ticks: u64,
    /// User and system time of its children that ended and were waited for, in clock ticks.
    pub child_ticks: u64,
}

/// Parses a `/proc/PID/stat` text. Fields are counted after the name's closing parenthesis,
/// since the name may hold spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14).
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(Stat {
        pid,
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        ticks: num(11)? + num(12)?,
        child_ticks: num(13)? + num(14)?,
    })
}

/// Every process's stat now (processes that end during the scan are skipped).
pub fn all() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .collect()
}

/// Seconds per clock tick.
pub fn tick_secs() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { 1.0 / ticks as f64 } else { 0.01 }
}

/// CPU seconds used so far by the processes `select` picks.
pub fn cpu_secs(stats: &[Stat], select: impl Fn(&Stat) -> bool) -> f64 {
    stats
        .iter()
        .filter(|s| select(s))
        .map(|s| s.ticks)
        .sum::<u64>() as f64
        * tick_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_even_with_spaces_and_parentheses_in_the_name() {
        let text =
            "4242 (cache (pool) x) S 17 4242 4242 0 -1 4194560 500 0 0 0 170 30 5 6 20 0 7 0 1234";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                comm: "cache (pool) x".into(),
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                ticks: 200,
                child_ticks: 11,
            }
        );
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn cpu_seconds_sum_the_selected_processes() {
        let stat = |pid, ppid, ticks| Stat {
            pid,
            comm: "nginx".into(),
            state: 'S',
            ppid,
            pgrp: 10,
            ticks,
            child_ticks: 0,
        };
        let stats = [stat(10, 1, 100), stat(11, 10, 300), stat(12, 99, 1000)];
        let secs = cpu_secs(&stats, |s| s.pgrp == 10 && s.ppid != 99);
        assert!((secs - 400.0 * tick_secs()).abs() < 1e-9);
    }
}
