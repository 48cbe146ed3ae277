//! The Prometheus scrape endpoint: `GET /metrics` in the text exposition format.

use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// The text exposition of everything in `registry`.
pub(super) fn render(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Binds `addr` now (so a busy port is an error at start-up, and port 0 is
/// resolved) and serves until the returned token is cancelled.
pub(super) fn serve(
    runtime: &tokio::runtime::Handle,
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> std::io::Result<(SocketAddr, CancellationToken)> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let token = CancellationToken::new();
    let stop = token.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        prometheus::Encoder::format_type(&prometheus::TextEncoder::new())
                            .to_string(),
                    )],
                    render(&registry),
                )
            }
        }),
    );
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve /metrics");
                return;
            }
        };
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "/metrics endpoint stopped");
        }
    });
    Ok((bound, token))
}
