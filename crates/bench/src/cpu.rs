//! CPU time used by this process (server, load generator and store threads together), read
//! from `/proc/self/stat`: per request, it says what a command costs beside what the floor's
//! request costs, whatever share of the cores the run got.

/// Clock ticks per second in `/proc` (Linux's `USER_HZ`, 100 on every architecture it runs).
const TICKS_PER_SEC: f64 = 100.0;

/// User plus system CPU seconds this process has used so far, or `None` off Linux.
pub(crate) fn process_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat)
}

/// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields count from the last
/// `)`.
fn parse_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th field from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// CPU microseconds per request over a window, when both edges were read.
pub(crate) fn micros_per(start: Option<f64>, end: Option<f64>, requests: u64) -> Option<f64> {
    match (start, end) {
        (Some(s), Some(e)) if requests > 0 && e >= s => Some((e - s) * 1e6 / requests as f64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_are_read_after_the_last_parenthesis() {
        let line = "4242 (tokio (rt) x) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100 200 300";
        assert_eq!(parse_stat(line), Some(3.0));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R 1 2"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        if cfg!(target_os = "linux") {
            assert!(process_seconds().is_some());
        }
    }

    #[test]
    fn micros_per_request_needs_both_edges_and_requests() {
        assert_eq!(micros_per(Some(1.0), Some(2.0), 1_000_000), Some(1.0));
        assert_eq!(micros_per(None, Some(2.0), 10), None);
        assert_eq!(micros_per(Some(1.0), Some(2.0), 0), None);
    }
}
