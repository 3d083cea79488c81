//! One test at a time, each on a runtime of its own: for the root crate's test targets whose
//! tests each start a whole stack (operator, nodes, site, maybe a browser), which wants more
//! than one of the machine's cores and whose timings mean nothing when two tests share them.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Runs `test` alone (after any other test of the target that runs through here), on its own
/// two-worker runtime, within `limit`. The runtime is dropped when the test ends or panics,
/// and with it every task the test spawned.
pub fn run(limit: Duration, test: impl Future<Output = ()>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(async {
        if tokio::time::timeout(limit, test).await.is_err() {
            panic!("test not done within {limit:?}");
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}
