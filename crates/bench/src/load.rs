//! The load generator: N clients, each with its own keep-alive connection and tokio task,
//! each looping { create an aggregate; patch it with the create's ETag } until the measured
//! window ends. Latencies are kept per client and merged at the end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sourced_client::Client;

use crate::workload;

/// Most iterations (create + patch) one client runs, whatever the duration.
const ITERATIONS_MAX: u64 = 100_000_000;
/// A client stops after this many errors (they are all reported; the run fails anyway).
const CLIENT_ERRORS_MAX: u64 = 100;
/// Error messages kept per client for the report.
const ERROR_SAMPLES_MAX: usize = 3;
/// Bound on each request; far above any healthy latency.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// When the load runs: a warm-up, then the measured window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
}

/// What one load run measured.
#[derive(Debug, Default)]
pub(crate) struct LoadResult {
    /// Successful requests that started and finished inside the measured window.
    pub(crate) measured: u64,
    /// Their latencies in nanoseconds, sorted.
    pub(crate) latencies_ns: Vec<u64>,
    /// Successful requests over the whole run (warm-up and tail included).
    pub(crate) succeeded: u64,
    /// Failed requests (error status, missing ETag, transport error) over the whole run.
    pub(crate) errors: u64,
    /// The first few error messages.
    pub(crate) error_samples: Vec<String>,
    /// The process's CPU seconds when the measured window opened and when it closed.
    pub(crate) cpu_start: Option<f64>,
    pub(crate) cpu_end: Option<f64>,
}

/// A probe read at the edges of the measured window, with when it was read.
pub(crate) struct Probed<S> {
    pub(crate) at: Instant,
    pub(crate) value: S,
}

/// Runs `clients` clients against `addr` and reads `probe` when the measured window opens
/// and when it closes.
pub(crate) async fn run<S>(
    addr: SocketAddr,
    clients: usize,
    timing: Timing,
    mut probe: impl FnMut() -> S,
) -> anyhow::Result<(LoadResult, Probed<S>, Probed<S>)> {
    let mut connected = Vec::with_capacity(clients);
    for index in 0..clients {
        let client = Client::connect(addr).await.with_context(|| format!("client {index} cannot connect"))?;
        connected.push(client.with_timeout(REQUEST_TIMEOUT));
    }
    let window_start = Instant::now() + timing.warmup;
    let window_end = window_start + timing.duration;
    let tasks: Vec<_> = connected
        .into_iter()
        .enumerate()
        .map(|(index, client)| tokio::spawn(client_loop(client, index, window_start, window_end)))
        .collect();

    tokio::time::sleep_until(window_start.into()).await;
    let start = Probed { at: Instant::now(), value: probe() };
    let cpu_start = crate::cpu::process_seconds();
    tokio::time::sleep_until(window_end.into()).await;
    let end = Probed { at: Instant::now(), value: probe() };
    let cpu_end = crate::cpu::process_seconds();

    let mut total = LoadResult { cpu_start, cpu_end, ..LoadResult::default() };
    for task in tasks {
        let result = task.await.context("a load client panicked")?;
        total.measured += result.measured;
        total.latencies_ns.extend_from_slice(&result.latencies_ns);
        total.succeeded += result.succeeded;
        total.errors += result.errors;
        total.error_samples.extend(result.error_samples);
    }
    total.latencies_ns.sort_unstable();
    Ok((total, start, end))
}

/// One client's loop; returns its unsorted samples.
async fn client_loop(mut client: Client, index: usize, window_start: Instant, window_end: Instant) -> LoadResult {
    let mut result = LoadResult::default();
    let create_path = format!("/{}", workload::TYPE_NAME);
    for seq in 0..ITERATIONS_MAX {
        if Instant::now() >= window_end || result.errors >= CLIENT_ERRORS_MAX {
            break;
        }
        let id = workload::aggregate_id(index, seq);
        let document = workload::document(&id, seq);
        let headers = [("content-type", "application/json")];
        let etag = match timed(&mut result, window_start, window_end, 201, async {
            client.request("POST", &create_path, &headers, Some(&document)).await
        })
        .await
        {
            Some(response) => match response.header("etag") {
                Some(etag) => etag.to_owned(),
                None => {
                    result.error(format!("POST {create_path} answered 201 without an ETag"));
                    continue;
                }
            },
            None => continue,
        };
        let patch_path = format!("{create_path}/{id}");
        let patch = workload::patch(seq);
        let headers = [("content-type", "application/json-patch+json"), ("if-match", etag.as_str())];
        timed(&mut result, window_start, window_end, 200, async {
            client.request("PATCH", &patch_path, &headers, Some(&patch)).await
        })
        .await;
    }
    result
}

/// Runs one request, records its latency if it lies inside the window, and returns the
/// response if it has the expected status (else records an error).
async fn timed(
    result: &mut LoadResult,
    window_start: Instant,
    window_end: Instant,
    expected_status: u16,
    request: impl Future<Output = Result<sourced_client::Response, sourced_client::ClientError>>,
) -> Option<sourced_client::Response> {
    let started = Instant::now();
    let outcome = request.await;
    let finished = Instant::now();
    match outcome {
        Ok(response) if response.status == expected_status => {
            result.succeeded += 1;
            if started >= window_start && finished <= window_end {
                result.measured += 1;
                let nanos = u64::try_from(finished.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                result.latencies_ns.push(nanos);
            }
            Some(response)
        }
        Ok(response) => {
            result.error(format!("expected {expected_status}, got {}: {}", response.status, response.text()));
            None
        }
        Err(error) => {
            result.error(error.to_string());
            None
        }
    }
}

impl LoadResult {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES_MAX {
            self.error_samples.push(message);
        }
    }
}

/// The `q`-quantile (0 < q ≤ 1) of sorted samples, by nearest rank; 0 when there are none.
pub(crate) fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), 500);
        assert_eq!(quantile(&samples, 0.99), 990);
        assert_eq!(quantile(&samples, 0.999), 999);
        assert_eq!(quantile(&samples, 1.0), 1000);
        assert_eq!(quantile(&[7], 0.999), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
