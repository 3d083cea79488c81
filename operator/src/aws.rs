//! What the operator's AWS clients (the EC2 provider, the CloudWatch sink and source) share:
//! how the SDK configuration is loaded, how a missing credential chain is told, how each
//! call is counted and timed in [`AwsCalls`], and which failures a later attempt can fix
//! ([`retryable`]).
//!
//! Calls are measured where they are made ([`observe`]) rather than by an SDK interceptor: at
//! the call site the operation's typed error is at hand, so its AWS error code becomes the
//! `outcome` label; an interceptor only sees a type-erased error.

use std::future::Future;
use std::time::Instant;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

pub use aws_config::Region;
pub use aws_credential_types::provider::SharedCredentialsProvider;

use crate::metrics::{AWS_OK, AwsCalls};

/// Attempts the SDK's standard retry makes for one call (throttling, 5xx, timeouts), with
/// exponential back-off and jitter between them.
pub const MAX_ATTEMPTS: u32 = 5;

/// The SDK's standard retry with [`MAX_ATTEMPTS`] attempts (its own back-off: up to 1 s before
/// the first retry, doubling to at most 20 s, full jitter).
pub fn retry_config() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS)
}

/// The shared SDK configuration: the default chain (environment, profile, web identity, IMDS)
/// unless `credentials` are given, `region` if given (else the chain's), and the standard retry.
pub async fn sdk_config(
    credentials: Option<SharedCredentialsProvider>,
    region: Option<String>,
) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).retry_config(retry_config());
    if let Some(credentials) = credentials {
        loader = loader.credentials_provider(credentials);
    }
    if let Some(region) = region {
        loader = loader.region(Region::new(region));
    }
    loader.load().await
}

/// Why `config` cannot sign requests (no credentials), asking the chain once; `None` when it
/// can. No AWS API is called.
pub async fn credentials_problem(config: &SdkConfig) -> Option<String> {
    use aws_credential_types::provider::ProvideCredentials as _;
    let Some(chain) = config.credentials_provider() else {
        return Some("no AWS credentials provider is configured".to_owned());
    };
    match chain.provide_credentials().await {
        Ok(_) => None,
        Err(e) => Some(format!(
            "no AWS credentials: {}; give the operator credentials (environment variables, a \
             profile, web identity or an instance role)",
            DisplayErrorContext(&e)
        )),
    }
}

/// The label of a failed call: its AWS error code, or what kind of failure it was.
pub fn outcome<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata,
{
    match (err.code(), err) {
        (Some(code), _) => code.to_owned(),
        (None, SdkError::TimeoutError(_)) => "timeout".to_owned(),
        (None, SdkError::DispatchFailure(_)) => "unreachable".to_owned(),
        (None, SdkError::ResponseError(_)) => "unreadable_response".to_owned(),
        (None, _) => "other".to_owned(),
    }
}

/// Runs one AWS call, counting it in `calls` under `service` and `api` with its outcome and
/// latency (the SDK's retries included).
pub async fn observe<T, E, R>(
    calls: &AwsCalls,
    service: &'static str,
    api: &'static str,
    call: impl Future<Output = Result<T, SdkError<E, R>>>,
) -> Result<T, SdkError<E, R>>
where
    E: ProvideErrorMetadata,
{
    let started = Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => AWS_OK.to_owned(),
        Err(e) => outcome(e),
    };
    calls.record(service, api, &outcome, started.elapsed());
    result
}

/// Whether a later attempt can succeed where `err` failed: what the SDK's standard retry
/// retries (throttling and transient error codes, 5xx answers, timeouts, no answer at all).
/// Any other error answered by the service (a 4xx such as `AccessDenied`,
/// `InvalidParameterValue`, `InvalidClientTokenId`) needs a person, not another attempt; and a
/// request that could not even be built never will be.
pub fn retryable<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
    if matches!(err, SdkError::ConstructionFailure(_)) {
        return false;
    }
    if let Some(code) = err.code()
        && (THROTTLING_ERRORS.contains(&code) || TRANSIENT_ERRORS.contains(&code))
    {
        return true;
    }
    match err.raw_response() {
        Some(answer) => {
            let status = answer.status().as_u16();
            // An answer that could not be read is a garbled transfer, whatever its status.
            status >= 500 || matches!(err, SdkError::ResponseError(_))
        }
        None => true,
    }
}
