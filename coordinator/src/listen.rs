//! What the coordinator checks before it serves clients: that some token
//! can authenticate (there is no default one), and that gRPC off this
//! machine is TLS — plain gRPC only on loopback, or where the operator
//! says a proxy in front ends TLS (`insecure_plaintext`).

use std::net::{IpAddr, SocketAddr};
use tonic::transport::{Identity, ServerTlsConfig};
use trainyard_core::config::CoordinatorConfig;

/// Why the coordinator will not serve.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "coordinator.tokens is empty: no client could authenticate; add a line printed by \
         `yard token new --tenant <tenant>` (or set TY_COORDINATOR__TOKENS)"
    )]
    NoTokens,
    #[error(
        "coordinator.grpc_addr {0} is not loopback and gRPC has no TLS: set \
         coordinator.tls_cert_file and tls_key_file, or insecure_plaintext = true when a proxy \
         in front ends TLS"
    )]
    PlainOffLoopback(String),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The gRPC TLS settings (`None`: plain), once the checks pass.
pub fn checked(config: &CoordinatorConfig) -> Result<Option<ServerTlsConfig>, ListenError> {
    if config.tokens.is_empty() {
        return Err(ListenError::NoTokens);
    }
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        if !is_loopback(&config.grpc_addr) && !config.insecure_plaintext {
            return Err(ListenError::PlainOffLoopback(config.grpc_addr.clone()));
        }
        return Ok(None);
    };
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ListenError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let identity = Identity::from_pem(read("tls_cert_file", cert)?, read("tls_key_file", key)?);
    // rustls is built with two crypto providers in this workspace; a
    // server config needs the process default chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}

/// Whether a listen address is on loopback (`localhost:…` counts).
pub fn is_loopback(addr: &str) -> bool {
    match addr.parse::<SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => addr
            .rsplit_once(':')
            .and_then(|(host, _)| host.parse::<IpAddr>().ok().map(|ip| ip.is_loopback()))
            .unwrap_or_else(|| addr.starts_with("localhost:")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tokens_or_plain_grpc_off_loopback_is_refused() {
        let mut config = CoordinatorConfig::default();
        assert!(matches!(checked(&config), Err(ListenError::NoTokens)));
        config
            .tokens
            .insert(trainyard_core::auth::token_key("t"), "acme".into());
        assert!(checked(&config).unwrap().is_none());
        config.grpc_addr = "0.0.0.0:50051".into();
        assert!(matches!(
            checked(&config),
            Err(ListenError::PlainOffLoopback(_))
        ));
        config.insecure_plaintext = true;
        assert!(checked(&config).unwrap().is_none());
        for (addr, loopback) in [
            ("127.0.0.1:0", true),
            ("[::1]:50051", true),
            ("localhost:50051", true),
            ("10.0.0.5:50051", false),
            ("example.com:50051", false),
        ] {
            assert_eq!(is_loopback(addr), loopback, "{addr}");
        }
    }
}
