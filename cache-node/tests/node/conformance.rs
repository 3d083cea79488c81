//! memccapable, libmemcached's protocol checker, run against a node: the same suite client
//! library authors use to check a memcached server.

use std::time::Duration;

use crate::support::{show, start_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memccapable_ascii_suite_passes() {
    let node = start_node(64).await;
    let run = tokio::process::Command::new("memccapable")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.addr.port().to_string(),
            "-a",
            "-t",
            "5",
        ])
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "memccapable is not installed: run scripts/test (it installs libmemcached-tools) \
             before the test suite"
        ),
        Ok(Err(err)) => panic!("cannot run memccapable: {err}"),
        Err(_) => panic!("memccapable did not finish within 60 s"),
    };
    node.shutdown().await;
    let stdout = show(&output.stdout);
    let stderr = show(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("All tests passed"),
        "memccapable failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}
