//! AWS SDK configuration shared by every client: region, profile, endpoint
//! overrides, and credentials from the default chain (never from our config).

use std::sync::Arc;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;

use crate::config::AwsConfig;

/// An SDK error as a person reads it: the messages of its chain of causes on
/// one line, without the SDK's debug dump (requests, headers, bodies). A
/// missing credential chain is said plainly.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        let m = x.to_string();
        if !m.is_empty() && !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = x.source();
    }
    let text = parts.join(": ");
    if text.contains("loading credentials") || text.contains("no credentials") {
        return "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY \
                (or run where an instance role is available)"
            .into();
    }
    let mut short: String = text.chars().take(400).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// Load the SDK configuration for `aws` (region, profile; credentials from the default chain).
pub async fn sdk_config(aws: &AwsConfig) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(aws.region.clone()));
    if let Some(p) = &aws.profile {
        loader = loader.profile_name(p);
    }
    loader.load().await
}

/// Bridges the SDK's credential chain to `object_store`, so S3 access uses
/// exactly the credentials the Kinesis client uses (profiles and SSO included).
#[derive(Debug)]
pub struct SdkCredentials {
    provider: aws_credential_types::provider::SharedCredentialsProvider,
}

impl SdkCredentials {
    /// The bridge for `sdk`, or `None` when the SDK found no credential chain.
    pub fn from_sdk(sdk: &SdkConfig) -> Option<Arc<Self>> {
        sdk.credentials_provider()
            .map(|provider| Arc::new(SdkCredentials { provider }))
    }
}

#[async_trait::async_trait]
impl object_store::CredentialProvider for SdkCredentials {
    type Credential = object_store::aws::AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<Self::Credential>> {
        let c = self.provider.provide_credentials().await.map_err(|e| {
            object_store::Error::Generic {
                store: "S3",
                source: format!("no AWS credentials from the default chain: {e}").into(),
            }
        })?;
        Ok(Arc::new(object_store::aws::AwsCredential {
            key_id: c.access_key_id().to_string(),
            secret_key: c.secret_access_key().to_string(),
            token: c.session_token().map(str::to_string),
        }))
    }
}
