//! Prometheus metrics of a gateway node.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// More metrics in the text format, rendered after the gateway's (the worker stages of the same
/// process).
pub type ExtraMetrics = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    process: Registry,
    extra: std::sync::Mutex<Vec<ExtraMetrics>>,
    pub connections_open: IntGauge,
    pub connections_total: IntCounter,
    pub frames_in: IntCounterVec,
    pub errors: IntCounterVec,
    pub messages_sent: IntCounter,
    pub send_seconds: Histogram,
    pub slow_consumers: IntCounter,
    /// A message accepted to its frame queued on a recipient's connection (one-to-one pushed by
    /// the gateway, groups by the fan-out stage).
    pub push_latency: Histogram,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("chat_gateway".into()), None)?;
        let m = Metrics {
            connections_open: IntGauge::new("connections_open", "open WebSocket connections")?,
            connections_total: IntCounter::new("connections_total", "WebSocket connections accepted")?,
            frames_in: IntCounterVec::new(Opts::new("frames_in_total", "client frames by type"), &["type"])?,
            errors: IntCounterVec::new(Opts::new("errors_total", "errors sent to clients by code"), &["code"])?,
            messages_sent: IntCounter::new("messages_sent_total", "messages acknowledged as sent")?,
            send_seconds: Histogram::with_opts(
                HistogramOpts::new("send_seconds", "send frame to sent ack, including the durable append")
                    .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )?,
            slow_consumers: IntCounter::new("slow_consumers_total", "connections closed because their queue was full")?,
            push_latency: Histogram::with_opts(
                HistogramOpts::new("push_latency_seconds", "message accepted to its frame queued on a recipient's connection")
                    .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            registry,
            process: process_registry()?,
            extra: std::sync::Mutex::new(Vec::new()),
        };
        m.registry.register(Box::new(m.connections_open.clone()))?;
        m.registry.register(Box::new(m.connections_total.clone()))?;
        m.registry.register(Box::new(m.frames_in.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.messages_sent.clone()))?;
        m.registry.register(Box::new(m.send_seconds.clone()))?;
        m.registry.register(Box::new(m.slow_consumers.clone()))?;
        m.registry.register(Box::new(m.push_latency.clone()))?;
        Ok(m)
    }

    /// Adds metrics rendered by someone else (a worker stage in this process).
    pub fn add_extra(&self, extra: ExtraMetrics) {
        self.extra.lock().unwrap_or_else(|p| p.into_inner()).push(extra);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = render(&self.registry);
        out.push_str(&render(&self.process));
        for extra in self.extra.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&extra());
        }
        out
    }
}

/// A registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut buf) {
        Ok(()) => String::from_utf8(buf).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The process's own metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_threads`, ...), read from /proc at each scrape.
pub fn process_registry() -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(registry)
}
