//! `flannel-ingress`: the Ingress reverse proxy. Follows the etcd registry (Ingresses,
//! IngressClasses, Secrets, Services, Endpoints, pods) and serves HTTP and HTTPS routed by host
//! and path to the Services' pods (docs/ingress.md).

/// mimalloc rather than glibc's malloc: 3 % less CPU per request (some allocations per request
/// are above glibc's per-thread cache), twice the RSS (docs/ingress.md, Performance (g)).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use etcd_access::{Connection, EtcdOptions, Password};
use ingress::class::ClassConfig;
use ingress::logwriter::NonBlocking;
use ingress::metrics::Metrics;
use ingress::proxy::{Proxy, ProxyOptions};
use ingress::run::Controller;
use ingress::snapshot::Snapshot;
use ingress::{server, tls};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// flannel's Ingress controller: a reverse proxy for networking.k8s.io/v1 Ingresses.
#[derive(Debug, Parser)]
#[command(name = "flannel-ingress", version)]
struct Flags {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "FLANNEL_INGRESS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// etcd prefix holding `config`, `subnets/` and `registry/`.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_PREFIX", default_value = etcd_access::options::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// TLS client key for etcd.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// TLS client certificate for etcd.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// CA that signed etcd's certificate (requires https:// endpoints).
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<Password>,
    /// Seconds to wait for each etcd request.
    #[arg(long, env = "FLANNEL_INGRESS_ETCD_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    etcd_timeout: u64,

    /// Where to serve plain HTTP.
    #[arg(long, env = "FLANNEL_INGRESS_HTTP_ADDR", default_value = "0.0.0.0:80")]
    http_addr: SocketAddr,
    /// Where to serve HTTPS.
    #[arg(
        long,
        env = "FLANNEL_INGRESS_HTTPS_ADDR",
        default_value = "0.0.0.0:443"
    )]
    https_addr: SocketAddr,
    /// Where to serve /healthz and /metrics.
    #[arg(
        long,
        env = "FLANNEL_INGRESS_HEALTH_ADDR",
        default_value = "0.0.0.0:10254"
    )]
    health_addr: SocketAddr,

    /// The `spec.controller` of the IngressClasses this controller serves.
    #[arg(
        long,
        env = "FLANNEL_INGRESS_CONTROLLER_CLASS",
        default_value = "flannel.io/ingress"
    )]
    controller_class: String,
    /// The class name the legacy `kubernetes.io/ingress.class` annotation must carry.
    #[arg(long, env = "FLANNEL_INGRESS_INGRESS_CLASS", default_value = "flannel")]
    ingress_class: String,
    /// Also serve Ingresses without any class when the default class is not ours.
    #[arg(long, env = "FLANNEL_INGRESS_WATCH_INGRESS_WITHOUT_CLASS")]
    watch_ingress_without_class: bool,

    /// Milliseconds to wait for more registry changes before rebuilding the routes.
    #[arg(long, env = "FLANNEL_INGRESS_DEBOUNCE_MS", default_value_t = 20)]
    debounce_ms: u64,
    /// Seconds to connect to an endpoint.
    #[arg(long, env = "FLANNEL_INGRESS_CONNECT_TIMEOUT", default_value_t = 5)]
    connect_timeout: u64,
    /// Seconds for a client's TLS handshake and request head.
    #[arg(long, env = "FLANNEL_INGRESS_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds for a request body and the upstream's response head.
    #[arg(long, env = "FLANNEL_INGRESS_UPSTREAM_TIMEOUT", default_value_t = 60)]
    upstream_timeout: u64,
    /// Largest request head in bytes.
    #[arg(long, env = "FLANNEL_INGRESS_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    /// Largest upstream response head in bytes (status line and headers; 502 beyond, as
    /// nginx's proxy_buffer_size).
    #[arg(long, env = "FLANNEL_INGRESS_MAX_RESPONSE_HEADER_BYTES", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    max_response_header_bytes: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "FLANNEL_INGRESS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Endpoints tried per request (after a connect failure; after a failed exchange or a
    /// timeout for idempotent methods).
    #[arg(long, env = "FLANNEL_INGRESS_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    attempts: u64,
    /// Worker threads serving connections (0: one per CPU; 1: a single-threaded runtime, the
    /// event loop on the main thread as one nginx worker).
    #[arg(long, env = "FLANNEL_INGRESS_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Which server answers HTTP/1.1 requests without a body: `own` (ours, the default) or
    /// `hyper` (hyper's serves every HTTP/1.1 request; requests with a body, upgrades and
    /// anything unusual go to hyper's either way).
    #[arg(long, env = "FLANNEL_INGRESS_HTTP1_SERVER", default_value = "own", value_parser = ["own", "hyper"])]
    http1_server: String,
}

impl Flags {
    fn etcd(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            timeout: Duration::from_secs(self.etcd_timeout),
        }
    }
}

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    // Log lines (one per request) go out through a thread of their own: a request never
    // waits for stderr.
    let (log_out, _log_guard) = match NonBlocking::new(std::io::stderr()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("flannel-ingress: starting the log writer: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let access_out = log_out.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(move || log_out.clone())
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    // The access lines are written straight into the same output (ingress/src/accesslog.rs),
    // when the filter lets target `access` at info through (`RUST_LOG=info,access=off`: none).
    let access_log =
        tracing::enabled!(target: "access", tracing::Level::INFO).then_some(access_out);
    // One thread: tokio's current-thread scheduler (no work-stealing bookkeeping, no wake-ups
    // across threads); more: the multi-thread one.
    let mut builder = if flags.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if flags.worker_threads > 1 {
        builder.worker_threads(flags.worker_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(flags, access_log)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags, access_log: Option<NonBlocking>) -> Result<()> {
    let conn = Connection::connect(&flags.etcd())
        .await
        .context("connecting to etcd")?;
    let default_cert = tls::default_certificate().context("making the default certificate")?;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::empty(default_cert)));
    let metrics = Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let opts = ProxyOptions {
        connect_timeout: Duration::from_secs(flags.connect_timeout),
        header_timeout: Duration::from_secs(flags.header_timeout),
        upstream_timeout: Duration::from_secs(flags.upstream_timeout),
        max_header_bytes: flags.max_header_bytes,
        max_body_bytes: flags.max_body_bytes,
        max_response_header_bytes: usize::try_from(flags.max_response_header_bytes)
            .unwrap_or(32 * 1024),
        attempts: usize::try_from(flags.attempts).unwrap_or(3),
        own_http1: flags.http1_server == "own",
        ..ProxyOptions::default()
    };
    let mut proxy = Proxy::new(rx.clone(), opts, metrics.clone());
    if let Some(log) = access_log {
        proxy = proxy.with_access_log(log);
    }
    let proxy = Arc::new(proxy);
    let tls_config =
        tls::server_config(tls::SniResolver::new(rx.clone())).context("TLS configuration")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));

    let http = server::bind(flags.http_addr).await?;
    let https = server::bind(flags.https_addr).await?;
    let health = server::bind(flags.health_addr).await?;

    let class = ClassConfig {
        controller: flags.controller_class.clone(),
        class_name: flags.ingress_class.clone(),
        watch_without_class: flags.watch_ingress_without_class,
    };
    let (stop_tx, stop) = watch::channel(false);
    let controller = Controller::new(conn.prefix(), class, tx, metrics);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(controller.run(conn, Duration::from_millis(flags.debounce_ms), stop.clone()));
    tasks.spawn(server::serve(http, proxy.clone(), None, stop.clone()));
    tasks.spawn(server::serve(
        https,
        proxy.clone(),
        Some(acceptor),
        stop.clone(),
    ));
    tasks.spawn(server::serve_health(
        health,
        Arc::new(registry),
        rx,
        stop.clone(),
    ));
    tracing::info!(
        http = %flags.http_addr,
        https = %flags.https_addr,
        health = %flags.health_addr,
        controller = %flags.controller_class,
        "flannel-ingress: serving"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("flannel-ingress: SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("flannel-ingress: SIGINT, stopping"),
    }
    let _ = stop_tx.send(true);
    // Listeners close now; open connections get server::GRACE to finish.
    let _ = tokio::time::timeout(server::GRACE + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
