//! The load generator: N clients, each with its own keep-alive connection and tokio task,
//! each looping { create an aggregate; patch it with the create's ETag } until the measured
//! window ends. Latencies are kept per client and merged at the end. A client may send an
//! `Authorization` header with every request (the auth benchmark's bearer tokens).

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
/// and when it closes. Client `i` sends `Authorization: authorizations[i]` with every request
/// when there is such an entry (an empty slice: no client sends one).
pub(crate) async fn run<S>(
    addr: SocketAddr,
    clients: usize,
    timing: Timing,
    authorizations: &[String],
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
        .map(|(index, client)| {
            let authorization = authorizations.get(index).cloned();
            tokio::spawn(client_loop(client, index, authorization, window_start, window_end))
        })
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
async fn client_loop(
    mut client: Client,
    index: usize,
    authorization: Option<String>,
    window_start: Instant,
    window_end: Instant,
) -> LoadResult {
    let mut result = LoadResult::default();
    let create_path = format!("/{}", workload::TYPE_NAME);
    // The header sent last when there is one: slicing a fixed array allocates nothing per request.
    let (authorization, sent) = match &authorization {
        Some(value) => (value.as_str(), 2),
        None => ("", 1),
    };
    for seq in 0..ITERATIONS_MAX {
        if Instant::now() >= window_end || result.errors >= CLIENT_ERRORS_MAX {
            break;
        }
        let id = workload::aggregate_id(index, seq);
        let document = workload::document(&id, seq);
        let headers = [("content-type", "application/json"), ("authorization", authorization)];
        let etag = match timed(&mut result, window_start, window_end, 201, async {
            client.request("POST", &create_path, &headers[..sent], Some(&document)).await
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
        let headers = [
            ("content-type", "application/json-patch+json"),
            ("if-match", etag.as_str()),
            ("authorization", authorization),
        ];
        timed(&mut result, window_start, window_end, 200, async {
            client.request("PATCH", &patch_path, &headers[..sent + 1], Some(&patch)).await
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
    /// Pools `other` (another run of the same case) into this one: counts added, latencies
    /// merged and sorted, the measured windows' CPU seconds added (unknown if either is).
    pub(crate) fn absorb(&mut self, other: LoadResult) {
        let cpu = |r: &LoadResult| Some(r.cpu_end? - r.cpu_start?);
        let cpu_total = cpu(self).zip(cpu(&other)).map(|(a, b)| a + b);
        self.measured += other.measured;
        self.succeeded += other.succeeded;
        self.errors += other.errors;
        self.latencies_ns.extend_from_slice(&other.latencies_ns);
        self.latencies_ns.sort_unstable();
        let room = ERROR_SAMPLES_MAX.saturating_sub(self.error_samples.len());
        self.error_samples.extend(other.error_samples.into_iter().take(room));
        (self.cpu_start, self.cpu_end) = (cpu_total.map(|_| 0.0), cpu_total);
    }

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
    use super::{LoadResult, quantile};

    #[test]
    fn pooled_runs_add_counts_and_cpu_and_keep_latencies_sorted() {
        let run = |latencies: &[u64], cpu: Option<(f64, f64)>| LoadResult {
            measured: latencies.len() as u64,
            latencies_ns: latencies.to_vec(),
            succeeded: latencies.len() as u64 + 1,
            errors: 1,
            error_samples: vec!["e".into(); 2],
            cpu_start: cpu.map(|c| c.0),
            cpu_end: cpu.map(|c| c.1),
        };
        let mut pooled = run(&[2, 5], Some((10.0, 11.5)));
        pooled.absorb(run(&[1, 9], Some((20.0, 20.5))));
        assert_eq!((pooled.measured, pooled.succeeded, pooled.errors), (4, 6, 2));
        assert_eq!(pooled.latencies_ns, [1, 2, 5, 9]);
        assert_eq!(pooled.error_samples.len(), super::ERROR_SAMPLES_MAX);
        assert_eq!(pooled.cpu_end.zip(pooled.cpu_start).map(|(e, s)| e - s), Some(2.0));
        pooled.absorb(run(&[3], None));
        assert_eq!((pooled.cpu_start, pooled.cpu_end), (None, None));
    }

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
