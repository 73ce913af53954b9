//! Runs the benchmark's smoke path in-process and checks that its numbers hang together
//! (commands counted, no HTTP errors); never how fast anything was.

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

    let markdown = report.to_markdown();
    assert!(markdown.contains("| clients | Sourced cmd/s |"), "{markdown}");
    assert!(markdown.contains("\n| 1 | "), "{markdown}");
}
