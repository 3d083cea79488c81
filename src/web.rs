//! `cachepool web`: runs the site (`cachepool_web::serve`) until Ctrl-C or SIGTERM.

pub use cachepool_web::serve::{Web, WebArgs};

/// Runs the site until `shutdown` resolves.
pub async fn run(
    args: WebArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let web = Web::start(&args).await?;
    // The plain admin password is hashed by now; do not keep it for the process's life.
    drop(args);
    println!("site: {}", web.url());
    shutdown.await;
    web.stop().await;
    Ok(())
}
