//! Runs the benchmark's smoke path in-process and checks that its numbers hang together
//! (commands counted, no HTTP or WebSocket errors, every subscriber got every event); never
//! how fast anything was.

use sourced_bench::Options;

#[test]
fn smoke_run_counts_commands_without_errors() {
    let options = Options::smoke();
    let report = sourced_bench::run(&options).unwrap();
    assert_eq!(report.problems(), Vec::<String>::new(), "{}", report.to_markdown());
    assert_eq!(report.rows.len(), 1);
    let row = &report.rows[0];
    assert_eq!(row.clients, 1);

    for measure in [&row.sourced, &row.floor] {
        assert_eq!(measure.errors, 0);
        assert!(measure.requests > 0, "{measure:?}");
        assert!(measure.succeeded_total >= measure.requests, "{measure:?}");
        assert!(measure.per_sec() > 0.0);
        assert!(measure.p50_ms > 0.0 && measure.p50_ms <= measure.p99_ms && measure.p99_ms <= measure.p999_ms);
    }

    // Every successful command is one append of one event.
    assert_eq!(row.store_appends_total, row.sourced.succeeded_total);
    assert!(row.store.commits > 0 && row.store.appends >= row.store.commits, "{:?}", row.store);
    assert_eq!(row.store.events, row.store.appends);
    let mean_batch = row.store.mean_batch().unwrap();
    assert!(mean_batch >= 1.0);

    assert!(row.ceiling.commands > 0 && row.ceiling.commits > 0, "{:?}", row.ceiling);
    assert_eq!(row.ceiling.batch_mean, mean_batch);
    // One client allows no batch larger than one command.
    assert_eq!(row.ceiling_full, None);

    let markdown = report.to_markdown();
    assert!(markdown.contains("| clients | Sourced cmd/s |"), "{markdown}");
    assert!(markdown.contains("\n| 1 | "), "{markdown}");

    // WebSocket commands: every case ran, without errors, and the store agrees.
    assert_eq!(report.ws.iter().map(|r| r.case).collect::<Vec<_>>(), options.ws_cases);
    for row in &report.ws {
        let m = &row.sourced;
        assert!(m.requests > 0 && m.succeeded_total >= m.requests && m.per_sec() > 0.0, "{row:?}");
        assert!(m.p50_ms > 0.0 && m.p50_ms <= m.p99_ms && m.p99_ms <= m.p999_ms, "{row:?}");
        assert_eq!(row.store_appends_total, m.succeeded_total, "{row:?}");
        assert_eq!(row.store.events, row.store.appends, "{row:?}");
    }
    assert!(markdown.contains("| connections × in flight |") && markdown.contains("\n| 1 × 16 | "), "{markdown}");

    // Subscription latency: every acknowledged event reached every subscriber once, in order.
    // Each subscriber count runs with a frame per event, then with batched frames.
    let cases: Vec<(usize, bool)> = options.subscribers.iter().flat_map(|&n| [(n, false), (n, true)]).collect();
    assert_eq!(report.latency.iter().map(|r| (r.subscribers, r.batched)).collect::<Vec<_>>(), cases);
    let best_ws = report.ws.iter().map(|r| r.sourced.per_sec()).fold(0.0, f64::max);
    for row in &report.latency {
        assert_eq!(row.errors, 0, "{row:?}");
        assert_eq!(row.target_per_sec, best_ws / 2.0, "{row:?}");
        assert!(row.acknowledged > 0 && row.achieved_per_sec > 0.0, "{row:?}");
        assert_eq!(row.deliveries, row.acknowledged * row.subscribers as u64, "{row:?}");
        assert!(row.before_ack <= row.deliveries, "{row:?}");
        if row.batched {
            assert!(row.events_per_frame >= 1.0, "{row:?}");
        } else {
            assert_eq!(row.events_per_frame, 1.0, "{row:?}");
        }
        assert!(row.p50_ms <= row.p99_ms && row.sent_p50_ms <= row.sent_p99_ms, "{row:?}");
        // Sending precedes the acknowledgement, so each sample from sending is the larger.
        assert!(row.sent_p50_ms >= row.p50_ms && row.sent_p99_ms >= row.p99_ms && row.sent_p99_ms > 0.0, "{row:?}");
    }
    assert!(markdown.contains("| subscribers | frames | target cmd/s |"), "{markdown}");
    assert!(markdown.contains(" | batched | ") && markdown.contains(" | per event | "), "{markdown}");
}

/// The read-side benchmark's smoke path: every part runs (the run fails on any refused
/// command, failed GET or empty list) and prints its table.
#[test]
fn read_side_smoke_run_prints_every_table() {
    let markdown = sourced_bench::run_read(&sourced_bench::ReadOptions::smoke()).unwrap();
    for heading in [
        "### A command on an aggregate of N events",
        "Rebuild: 2 streams, 310 events",
        "### GET by id",
        "### Filtered list",
    ] {
        assert!(markdown.contains(heading), "{heading}: {markdown}");
    }
    assert!(markdown.contains("\n| 300 | ") && markdown.contains("| embedded (SQLite) | 2000 |"), "{markdown}");
}

/// The artifact benchmark's smoke path: both paths run without a refused command (the run
/// fails on any) and the table has its row.
#[test]
fn artifacts_smoke_run_prints_its_row() {
    let options = sourced_bench::DomainOptions {
        clients: vec![1],
        duration: std::time::Duration::from_millis(300),
        artifacts: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order"),
    };
    let markdown = sourced_bench::run_domain(&options).unwrap();
    assert!(
        markdown.contains("| clients | artifacts cmd/s | plain cmd/s |") && markdown.contains("\n| 1 | "),
        "{markdown}"
    );
}

/// The auth benchmark's smoke path: off, HS256 and ES256 each ran without a refused request
/// (every token was accepted, and a request without one was refused with auth on, or the run
/// fails), and both tables are printed.
#[test]
fn auth_smoke_run_measures_every_scheme() {
    use sourced_bench::AuthScheme;
    let report = sourced_bench::run_auth(&sourced_bench::AuthOptions::smoke()).unwrap();
    assert_eq!(report.problems(), Vec::<String>::new(), "{}", report.to_markdown());
    assert_eq!(report.rows.iter().map(|r| r.scheme).collect::<Vec<_>>(), AuthScheme::ALL);
    for row in &report.rows {
        let m = &row.measure;
        assert!(m.requests > 0 && m.succeeded_total >= m.requests && m.errors == 0, "{row:?}");
        assert_eq!(row.store_appends_total, m.succeeded_total, "{row:?}");
        assert!(m.p50_ms > 0.0 && m.p50_ms <= m.p99_ms, "{row:?}");
        assert!(report.loss(row).is_some(), "{row:?}");
    }
    assert_eq!(report.loss(&report.rows[0]), Some(0.0));
    let schemes: Vec<AuthScheme> = report.verify.iter().map(|v| v.scheme).collect();
    assert_eq!(schemes, [AuthScheme::Hs256, AuthScheme::Es256]);
    assert!(report.verify.iter().all(|v| v.verify_us > 0.0 && v.cached_us > 0.0), "{:?}", report.verify);
    let markdown = report.to_markdown();
    assert!(markdown.contains("| clients | auth | cmd/s |") && markdown.contains("\n| 1 | JWT ES256 | "), "{markdown}");
    assert!(markdown.contains("| auth | verify µs | cached µs |"), "{markdown}");
}
