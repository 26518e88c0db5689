//! The writers that change bench_stock, and the log of what they committed.
//!
//! Every change sets the row's `seq` to a number that no other change uses.
//! The log keeps the Instant at which the COMMIT of each `seq` returned, so a
//! webhook's latency is its arrival time minus the commit time of its `seq`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::try_join_all;

use crate::receiver::ArrivalMark;
use crate::setup::connect;

/// The single-row change that all writers make.
const UPDATE_ONE: &str = "update bench_stock set count_on_hand = count_on_hand + 1, seq = $1 where id = $2";

/// A run of consecutive `seq` values committed together.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    pub first_seq: i64,
    pub count: i64,
    pub at: Instant,
}

/// The source of fresh `seq` values and the record of commits.
pub struct CommitLog {
    /// Shared by every log of a benchmark run.
    seq_source: Arc<AtomicI64>,
    commits: Mutex<Vec<Committed>>,
    changes: AtomicU64,
}

impl CommitLog {
    /// Creates a log that takes its seqs from `seq_source`, which starts
    /// above 0 because the rows start with seq 0.
    pub fn new(seq_source: Arc<AtomicI64>) -> CommitLog {
        CommitLog {
            seq_source,
            commits: Mutex::new(Vec::new()),
            changes: AtomicU64::new(0),
        }
    }

    fn allocate(&self, count: i64) -> i64 {
        self.seq_source.fetch_add(count, Ordering::Relaxed)
    }

    fn record(&self, first_seq: i64, count: i64, at: Instant) {
        self.commits
            .lock()
            .expect("commit log lock")
            .push(Committed { first_seq, count, at });
        self.changes.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Changes committed so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Returns the commits so far, sorted by seq.
    pub fn snapshot(&self) -> Vec<Committed> {
        let mut commits = self.commits.lock().expect("commit log lock").clone();
        commits.sort_by_key(|commit| commit.first_seq);
        commits
    }
}

/// Looks up the commit Instant of a seq in a snapshot sorted by seq.
pub fn commit_time(commits: &[Committed], seq: i64) -> Option<Instant> {
    let index = commits.partition_point(|commit| commit.first_seq <= seq);
    let commit = commits.get(index.checked_sub(1)?)?;
    (seq < commit.first_seq + commit.count).then_some(commit.at)
}

/// The bound that keeps a saturating writer's backlog finite: the writer
/// pauses while the webhooks written but not yet received exceed `window`.
pub struct FlowControl {
    /// The endpoints that receive every change and whose progress counts,
    /// with their request counts when the writers started.
    pub tracked: ArrivalMark,
    /// The maximum webhooks in flight, summed over the tracked endpoints.
    pub window: u64,
}

impl FlowControl {
    fn must_wait(&self, written: u64) -> bool {
        let endpoints = self.tracked.endpoint_count() as u64;
        let received: u64 = self.tracked.received_since().iter().sum();
        written * endpoints > received + self.window
    }
}

/// The shape of the saturating writers.
#[derive(Debug, Clone, Copy)]
pub struct SaturatingShape {
    /// Writer connections, each with its own share of the rows.
    pub writers: usize,
    /// Single-row updates per transaction.
    pub batch: usize,
    pub stock_rows: i64,
}

/// Writers that keep the system saturated: each commits transactions of
/// `batch` single-row updates, sent in one pipeline, as fast as flow control
/// lets it, until `stop` is set. Writer `w` changes only rows whose id is
/// `w` modulo the writer count, so two writers never wait for each other's
/// row locks or deadlock.
pub async fn run_saturating(
    url: String,
    log: Arc<CommitLog>,
    shape: SaturatingShape,
    flow: Arc<FlowControl>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for writer in 0..shape.writers {
        let client = connect(&url).await?;
        let log = Arc::clone(&log);
        let flow = Arc::clone(&flow);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let statement = client.prepare(UPDATE_ONE).await?;
            let writers = shape.writers as i64;
            let slots = (shape.stock_rows - writer as i64 + writers - 1) / writers;
            while !stop.load(Ordering::Relaxed) {
                if flow.must_wait(log.changes()) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let first_seq = log.allocate(shape.batch as i64);
                let mut ids: Vec<i64> = (0..shape.batch)
                    .map(|_| rand::random_range(0..slots) * writers + writer as i64 + 1)
                    .collect();
                ids.sort_unstable();
                let transaction = client.transaction().await?;
                let updates = ids.iter().enumerate().map(|(offset, id)| {
                    let seq = first_seq + offset as i64;
                    let statement = &statement;
                    let transaction = &transaction;
                    async move { transaction.execute(statement, &[&seq, id]).await }
                });
                try_join_all(updates).await?;
                transaction.commit().await?;
                log.record(first_seq, shape.batch as i64, Instant::now());
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a writer task panicked")??;
    }
    Ok(())
}

/// The changes an open-loop writer made, and how many started late.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoopResult {
    pub changes: u64,
    pub elapsed: Duration,
    /// Changes that started more than 10 ms after their scheduled time,
    /// because every connection was busy.
    pub late: u64,
}

/// Writes open-loop: one single-row change per transaction, scheduled at
/// `rate` per second for `duration`, whatever the commits take. The changes
/// are spread over `connections` connections, so a slow commit delays only
/// its own connection.
pub async fn run_open_loop(
    url: &str,
    log: Arc<CommitLog>,
    rate: f64,
    duration: Duration,
    connections: usize,
    stock_rows: i64,
) -> anyhow::Result<OpenLoopResult> {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let next_slot = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = connect(url).await?;
        let log = Arc::clone(&log);
        let next_slot = Arc::clone(&next_slot);
        let late = Arc::clone(&late);
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(UPDATE_ONE).await?;
            loop {
                let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                if slot >= total {
                    return anyhow::Ok(());
                }
                let scheduled = start + Duration::from_secs_f64(slot as f64 / rate);
                let now = tokio::time::Instant::now();
                if now < scheduled {
                    tokio::time::sleep_until(scheduled).await;
                } else if now - scheduled > Duration::from_millis(10) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                let seq = log.allocate(1);
                let id = rand::random_range(1..=stock_rows);
                client.execute(&statement, &[&seq, &id]).await?;
                log.record(seq, 1, Instant::now());
            }
        }));
    }
    for task in tasks {
        task.await.context("a writer task panicked")??;
    }
    Ok(OpenLoopResult {
        changes: total,
        elapsed: tokio::time::Instant::now() - start,
        late: late.load(Ordering::Relaxed),
    })
}

/// Writes `changes` changes in transactions of up to `chunk` rows each,
/// every transaction one UPDATE of a range of ids. Returns how long it took.
pub async fn run_bulk_backlog(
    url: &str,
    log: &CommitLog,
    changes: i64,
    chunk: i64,
    stock_rows: i64,
) -> anyhow::Result<Duration> {
    let client = connect(url).await?;
    let statement = client
        .prepare(
            "update bench_stock set count_on_hand = count_on_hand + 1, seq = $1 + (id - $2)
             where id between $2 and $3",
        )
        .await?;
    let chunk = chunk.min(stock_rows);
    let started = Instant::now();
    let mut written = 0;
    let mut first_id = 1;
    while written < changes {
        let count = chunk.min(changes - written).min(stock_rows - first_id + 1);
        let last_id = first_id + count - 1;
        let first_seq = log.allocate(count);
        let updated = client.execute(&statement, &[&first_seq, &first_id, &last_id]).await?;
        anyhow::ensure!(updated == count as u64, "updated {updated} rows, expected {count}");
        log.record(first_seq, count, Instant::now());
        written += count;
        first_id = if last_id >= stock_rows { 1 } else { last_id + 1 };
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_time_finds_range() {
        let at = Instant::now();
        let later = at + Duration::from_secs(1);
        let commits = vec![
            Committed {
                first_seq: 10,
                count: 5,
                at,
            },
            Committed {
                first_seq: 20,
                count: 1,
                at: later,
            },
        ];
        assert_eq!(commit_time(&commits, 9), None);
        assert_eq!(commit_time(&commits, 10), Some(at));
        assert_eq!(commit_time(&commits, 14), Some(at));
        assert_eq!(commit_time(&commits, 15), None);
        assert_eq!(commit_time(&commits, 20), Some(later));
        assert_eq!(commit_time(&commits, 21), None);
    }
}
