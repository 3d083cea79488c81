//! Browser tests: the site and the manager UI driven in headless Chromium over WebDriver, the
//! way a person uses them, against the real `cachepool up` stack.
//!
//! Each test starts its own stack (`cachepool up` on a fresh data directory, free ports) and
//! its own `chromedriver` and Chromium session, so tests are independent; they run one at a
//! time (`harness::run`) because a stack and a browser each want more than one of the
//! machine's two cores. Elements are found by the ids and classes of the page contract
//! (`docs/ui-contract.md`), never by layout or wording, and every wait is
//! bounded and fails with a screenshot and the page's source.
//!
//! Screenshots of the main pages are written to `target/browser-artifacts/` on every run:
//! `cargo test -p cachepool --test browser`. Chromium and chromedriver must be installed
//! (`scripts/test` installs them); a missing one fails the tests rather than skipping them.

mod harness;
mod manager;
mod site;
