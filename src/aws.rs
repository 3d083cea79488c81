//! `cachepool operator --aws …`: the EC2 provider and CloudWatch for a standalone operator.
//!
//! Kept apart from the other operator flags (flattened into `OperatorArgs`) because the AWS
//! SDK is only in production builds (`--features production`): a build without it still
//! knows the flags, so `--aws` fails with a message saying how to get it rather than clap's
//! "unexpected argument".

use std::time::Duration;

use cachepool_operator::run::Config;

/// AWS flags of `cachepool operator`.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "AWS (production builds)")]
pub struct AwsArgs {
    /// Serve `provider: {ec2: …}` pools and CloudWatch metrics (`metrics.cloudwatch.publish`,
    /// `metrics.source: cloudwatch`) with the default AWS credential chain (environment,
    /// profile, web identity, instance role). See docs/aws.md.
    #[arg(long, env = "CACHEPOOL_AWS")]
    pub aws: bool,

    /// Endpoint of EC2, SSM and CloudWatch instead of AWS's own (a VPC endpoint; moto in
    /// tests).
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub aws_endpoint_url: Option<String>,

    /// Region of CloudWatch (EC2 pools name their own in spec.provider.ec2.region), also swept
    /// for instances no pool knows; default: the credential chain's (profile, instance
    /// metadata).
    #[arg(long, env = "AWS_REGION", value_name = "REGION")]
    pub aws_region: Option<String>,

    /// An instance tagged by this operator that no pool knows is terminated once it is this
    /// old, in seconds.
    #[arg(long, env = "CACHEPOOL_EC2_GC_GRACE_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub ec2_gc_grace_secs: u64,

    /// Path of the `cachepool` binary on the nodes' AMI (used by the default user data).
    #[arg(
        long,
        env = "CACHEPOOL_EC2_NODE_BINARY",
        default_value = "/usr/local/bin/cachepool"
    )]
    pub ec2_node_binary: String,

    /// Prefix of the SSM parameters that hold the nodes' admin tokens.
    #[arg(
        long,
        env = "CACHEPOOL_EC2_PARAMETER_PREFIX",
        default_value = "/cachepool"
    )]
    pub ec2_parameter_prefix: String,

    /// How long after a minute closes its CloudWatch data is trusted to be complete, in
    /// seconds: the autoscaler on `metrics.source: cloudwatch` judges windows ending this long
    /// ago.
    #[arg(long, env = "CACHEPOOL_CLOUDWATCH_SETTLE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(0..=900))]
    pub cloudwatch_settle_secs: u64,
}

impl AwsArgs {
    /// With `--aws`, adds the EC2 provider and the CloudWatch sink and source to `config`,
    /// counting their calls in its metrics.
    pub async fn apply(&self, config: &mut Config) -> anyhow::Result<()> {
        if !self.aws {
            return Ok(());
        }
        self.apply_aws(config).await
    }

    #[cfg(feature = "production")]
    async fn apply_aws(&self, config: &mut Config) -> anyhow::Result<()> {
        use std::sync::Arc;

        use cachepool_operator::cloudwatch::{CloudWatch, CloudWatchOptions};
        use cachepool_operator::provider::ec2::{Ec2Options, Ec2Provider};

        let ec2 = Ec2Provider::new(Ec2Options {
            endpoint: self.aws_endpoint_url.clone(),
            calls: config.aws_calls.clone(),
            gc_grace: Duration::from_secs(self.ec2_gc_grace_secs),
            gc_regions: self.aws_region.iter().cloned().collect(),
            node_binary: self.ec2_node_binary.clone(),
            parameter_prefix: self.ec2_parameter_prefix.clone(),
            ..Ec2Options::default()
        })
        .await;
        config.ec2 = Some(Arc::new(ec2));
        let cloudwatch = CloudWatch::new(CloudWatchOptions {
            endpoint: self.aws_endpoint_url.clone(),
            region: self.aws_region.clone(),
            calls: config.aws_calls.clone(),
            settle: Duration::from_secs(self.cloudwatch_settle_secs),
            ..CloudWatchOptions::default()
        })
        .await;
        config.traffic.cloudwatch = Some(cloudwatch.clone());
        config.traffic.sinks.push(cloudwatch);
        tracing::info!(endpoint = ?self.aws_endpoint_url, region = ?self.aws_region,
                       "EC2 provider and CloudWatch enabled");
        Ok(())
    }

    #[cfg(not(feature = "production"))]
    async fn apply_aws(&self, _config: &mut Config) -> anyhow::Result<()> {
        // Read so the flags are not dead in this build.
        let _ = (
            Duration::from_secs(self.ec2_gc_grace_secs),
            Duration::from_secs(self.cloudwatch_settle_secs),
        );
        anyhow::bail!(
            "--aws (CACHEPOOL_AWS): this cachepool was built without AWS support (EC2 provider, \
             CloudWatch); build it with `cargo build --release --no-default-features --features \
             production`, or run the pool with `provider: {{process: {{}}}}` and \
             `metrics.source: direct`"
        )
    }
}
