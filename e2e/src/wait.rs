//! Waiting on an observable state instead of a sleep: the harness's and the
//! tests' one polling loop.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Polls `check` every 100 ms until it returns `Ok`, or panics after
/// `timeout` with `what` and the last state seen.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    poll(what, timeout, check).await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`wait_for`] as an error instead of a panic, for the harness's binaries.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > deadline => {
                bail!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
