//! The gRPC client every command uses: a channel to the coordinator and a
//! bearer token on every call. Also how a failed call reads on the terminal.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trainyard_core::Config;
use trainyard_core::service::ServiceArgs;
use trainyard_proto::v1::job_service_client::JobServiceClient;

pub type Client = JobServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Adds `authorization: Bearer <token>` and the current trace context
/// (`traceparent`) to every request.
#[derive(Clone)]
pub struct BearerAuth(AsciiMetadataValue);

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        // The current span's trace context (nothing with tracing off).
        trainyard_core::telemetry::propagation::grpc_client_interceptor(request)
    }
}

/// Where the client calls and as whom.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port`, or `https://…` for a coordinator serving TLS.
    pub server: String,
    /// `None`: the local fleet's ([`resolve_token`]), read at connect.
    pub token: Option<String>,
    /// The CA an `https://` server's certificate is checked against
    /// (else the system's roots).
    pub ca: Option<PathBuf>,
}

/// Where `yard dev` and `yard demo` keep their token, under the data dir.
pub const DEV_TOKEN_FILE: &str = "dev-token";

/// The token of a command: `--token`/`TY_TOKEN`, else the local fleet's
/// (`.trainyard/dev-token`, written by `yard dev`).
pub fn resolve_token(given: Option<String>) -> anyhow::Result<String> {
    if let Some(token) = given {
        return Ok(token);
    }
    let path = Path::new(".trainyard").join(DEV_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        _ => anyhow::bail!(
            "no token: pass --token or set TY_TOKEN (a local `yard dev` keeps its own in {})",
            path.display()
        ),
    }
}

/// Connects to the coordinator at `target.server`.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let server = &target.server;
    let token = resolve_token(target.token.clone())?;
    let header: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .context("the token holds characters a header cannot carry")?;
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .with_context(|| format!("{server:?} is not a valid server URL"))?
        .connect_timeout(Duration::from_secs(5));
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &target.ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read the CA file {}", ca.display()))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .context("cannot set up TLS for the coordinator")?;
    } else if target.ca.is_some() {
        anyhow::bail!("--ca is given but {server} is not https://");
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the coordinator at {server}: {} (is `yard dev` running? set --server or TY_SERVER)",
                error_chain(&e)
            )
        })?;
    Ok(JobServiceClient::with_interceptor(
        channel,
        BearerAuth(header),
    ))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The canonical name of a gRPC code, as the NATS API spells it too.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How an error is printed: `<CODE>: <message>` for a gRPC status, the
/// whole cause chain otherwise.
pub fn describe(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) if status.message().is_empty() => code_name(status.code()).to_string(),
        Some(status) => format!("{}: {}", code_name(status.code()), status.message()),
        None => format!("{error:#}"),
    }
}

/// Loads the layered config from the shared service flags; `None` when
/// `--print-config` printed it. `quiet` lowers the default log level to
/// warnings, so service logs do not run through a client's output.
pub fn load_config(
    args: &ServiceArgs,
    service: &str,
    quiet: bool,
) -> anyhow::Result<Option<Config>> {
    let mut config = Config::load(args.config.as_deref(), &args.overrides)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(None);
    }
    if quiet && config.telemetry.log_filter == Config::default().telemetry.log_filter {
        config.telemetry.log_filter = "warn".into();
    }
    // The services own the scrape port; `yard` beside one must not take it.
    let telemetry = trainyard_core::config::TelemetryConfig {
        metrics_port: 0,
        ..config.telemetry.clone()
    };
    let telemetry = trainyard_core::telemetry::init(service, &telemetry)
        .map_err(|e| anyhow::anyhow!("cannot start telemetry: {e}"))?;
    let mut kept = TELEMETRY.lock().unwrap_or_else(|e| e.into_inner());
    if kept.is_none() {
        *kept = Some(telemetry);
    } else {
        telemetry.keep();
    }
    Ok(Some(config))
}

/// The telemetry [`load_config`] started, flushed at exit.
static TELEMETRY: std::sync::Mutex<Option<trainyard_core::telemetry::Telemetry>> =
    std::sync::Mutex::new(None);

/// Exports the spans still buffered (a submit's trace starts in `yard`)
/// and stops the exporters; called once the command is done.
pub async fn shutdown_telemetry() {
    let telemetry = TELEMETRY.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_print_as_code_and_message() {
        let error = anyhow::Error::new(tonic::Status::not_found("job not found"));
        assert_eq!(describe(&error), "NOT_FOUND: job not found");
        let error = anyhow::Error::new(tonic::Status::unauthenticated(""));
        assert_eq!(describe(&error), "UNAUTHENTICATED");
        let error = anyhow::anyhow!("plain");
        assert_eq!(describe(&error.context("outer")), "outer: plain");
    }
}
