//! `--metrics ADDR`: Prometheus text exposition on `http://ADDR/metrics`, for the embedded
//! and the source-site agent, `process --follow` and `cache serve` (every metric, its
//! labels and meaning: docs/metrics.md).
//!
//! The figures are never computed a second way: a vault's VMs are rendered from the very
//! status `standby status --json` prints ([`crate::cmd::report::vm_status`]: through the
//! VM's running owner, else computed from the vault), the write path's from the tap's
//! atomic counters ([`standby_engine::util::latency`]), a source agent's and a cache
//! service's from the engine's own reports. One listener thread answers the scrapes; it
//! never takes a lock of the write path (the agent's control socket, like `status`, runs
//! on its own thread and reads published views).
//!
//! For a vault (what `standby serve` mounts on its `/metrics` too): [`render_vault`].

use crate::cmd::report::{vm_status, Reported};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use standby_engine::link::service::VmReport;
use standby_engine::runtime::SourceReport;
use standby_engine::util::latency::{HistogramSnapshot, WriteStats};
use standby_engine::vault::{Health, Vault, VmState};
use standby_engine::Error;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The content type of Prometheus' text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone)]
enum Value {
    Gauge(f64),
    Counter(u64),
    Histogram(HistogramSnapshot),
}

#[derive(Debug, Clone)]
struct Family {
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Vec<(&'static str, String)>, Value)>,
}

/// Metric families being gathered for one scrape; each name is written once, its samples
/// in the order they were added.
#[derive(Debug, Clone, Default)]
pub(crate) struct Families {
    by_name: BTreeMap<&'static str, Family>,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        labels: Vec<(&'static str, String)>,
        value: Value,
    ) {
        self.by_name
            .entry(name)
            .or_insert_with(|| Family {
                help,
                kind,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value));
    }

    fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        v: f64,
    ) {
        self.add(
            name,
            help,
            MetricType::Gauge,
            owned(labels),
            Value::Gauge(v),
        );
    }

    /// A counter; `name` without `_total` (the encoder adds it).
    fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        v: u64,
    ) {
        self.add(
            name,
            help,
            MetricType::Counter,
            owned(labels),
            Value::Counter(v),
        );
    }

    /// The families in Prometheus' text format.
    pub(crate) fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

fn owned(labels: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl prometheus_client::collector::Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, f) in &self.by_name {
            let mut m = encoder.encode_descriptor(name, f.help, None, f.kind)?;
            for (labels, v) in &f.samples {
                let mut s = m.encode_family(labels)?;
                match v {
                    Value::Gauge(g) => s.encode_gauge(g)?,
                    Value::Counter(c) => s
                        .encode_counter::<prometheus_client::encoding::NoLabelSet, u64, f64>(
                            c, None,
                        )?,
                    Value::Histogram(h) => {
                        // The encoder sums the buckets itself: hand it each bucket's own
                        // count, not the snapshot's cumulative ones.
                        let mut below = 0;
                        let own: Vec<(f64, u64)> = h
                            .buckets
                            .iter()
                            .map(|&(le, c)| {
                                let n = c - below;
                                below = c;
                                (le, n)
                            })
                            .collect();
                        s.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            h.sum_seconds,
                            h.count,
                            &own,
                            None,
                        )?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every VM of the vault at `root` (or only `only`), as `standby status --json` reports
/// them, plus what this process counted for them (bytes applied into their replicas), in
/// Prometheus' text format. A VM whose status cannot be had right now (a short-lived
/// command holds it) shows `standby_status_up 0` and nothing else.
pub fn render_vault(root: &Path, only: Option<&str>) -> String {
    let mut f = Families::default();
    vault_families(root, only, &mut f);
    f.render()
}

/// The families of [`render_vault`], added to `f`.
pub(crate) fn vault_families(root: &Path, only: Option<&str>, f: &mut Families) {
    let vault = match Vault::open(
        root,
        "standby metrics",
        standby_engine::vault::LockWait::Fail,
    ) {
        Ok(v) => v,
        Err(_) => {
            f.gauge(
                "standby_vault_up",
                "1 if the vault could be read for this scrape.",
                &[],
                0.0,
            );
            return;
        }
    };
    f.gauge(
        "standby_vault_up",
        "1 if the vault could be read for this scrape.",
        &[],
        1.0,
    );
    let names: Vec<String> = vault
        .catalog()
        .vms
        .keys()
        .filter(|n| only.is_none_or(|o| o == n.as_str()))
        .cloned()
        .collect();
    let now_us = standby_engine::now_us();
    for n in &names {
        // Never wait: a scrape is answered now or the VM is marked unknown for it.
        match vm_status(root, &vault, n, Duration::ZERO) {
            Ok(r) => {
                f.gauge(
                    "standby_status_up",
                    "1 if the VM's status could be had for this scrape (its other metrics are then present).",
                    &[("vm", n)],
                    1.0,
                );
                vm_families(n, &r, now_us, f);
            }
            Err(_) => f.gauge(
                "standby_status_up",
                "1 if the VM's status could be had for this scrape (its other metrics are then present).",
                &[("vm", n)],
                0.0,
            ),
        }
    }
    for (vm, bytes) in standby_engine::util::latency::replicated_bytes_all() {
        if names.contains(&vm) {
            f.counter(
                "standby_replicated_bytes",
                "Bytes of writes this process applied into the VM's replica since it started.",
                &[("vm", &vm)],
                bytes,
            );
        }
    }
}

/// One VM's status as metrics.
fn vm_families(vm: &str, r: &Reported, now_us: u64, f: &mut Families) {
    let st = &r.status;
    let l: &[(&'static str, &str)] = &[("vm", vm)];
    for h in [Health::Healthy, Health::Warning, Health::Critical] {
        f.gauge(
            "standby_health",
            "The VM's replication health: 1 for the current state (healthy, warning, critical), 0 for the others.",
            &[("vm", vm), ("state", h.as_str())],
            if st.health == h { 1.0 } else { 0.0 },
        );
    }
    let state = st.record.state;
    for s in [
        VmState::InitialReplication,
        VmState::Protected,
        VmState::ResyncRequired,
        VmState::FailedOver,
        VmState::TestFailover,
    ] {
        f.gauge(
            "standby_state",
            "The VM's replication state: 1 for the current one (initial-replication, protected, resync-required, failed-over, test-failover).",
            &[("vm", vm), ("state", s.as_str())],
            if state == s { 1.0 } else { 0.0 },
        );
    }
    if let Some(rpo) = st.rpo_seconds {
        f.gauge(
            "standby_rpo_seconds",
            "Recovery point objective: now minus the source time of the newest write the vault can recover (as status shows it).",
            l,
            rpo,
        );
    }
    f.gauge(
        "standby_rpo_threshold_seconds",
        "The RPO over which the VM's policy makes its health critical.",
        l,
        st.rpo_threshold_seconds as f64,
    );
    f.gauge(
        "standby_backlog_bytes",
        "Bytes of records in the VM's change log not yet applied into its replica.",
        l,
        st.backlog_bytes as f64,
    );
    f.gauge(
        "standby_backlog_records",
        "Records in the VM's change log not yet applied into its replica.",
        l,
        st.backlog_records as f64,
    );
    let (cache_bytes, capacity) = match &st.remote {
        // A remote VM's cache is the cache service's log near the source.
        Some(rm) => (
            rm.cache_used_bytes,
            Some(rm.cache_capacity_bytes).filter(|c| *c > 0),
        ),
        None => (st.cache_bytes, st.record.cache_capacity_bytes),
    };
    f.gauge(
        "standby_cache_bytes",
        "Bytes the VM's change log (its cache: in the vault, or the cache service's for a remote VM) holds.",
        l,
        cache_bytes as f64,
    );
    if let Some(c) = capacity {
        f.gauge(
            "standby_cache_capacity_bytes",
            "The limit of the VM's cache (absent: no limit).",
            l,
            c as f64,
        );
    }
    f.gauge(
        "standby_points",
        "Recovery points the VM's replica retains.",
        l,
        st.points as f64,
    );
    if let Some(p) = &st.last_point {
        f.gauge(
            "standby_last_point_age_seconds",
            "Seconds since the source time of the VM's newest recovery point.",
            l,
            now_us.saturating_sub(p.time_us) as f64 / 1e6,
        );
        f.gauge(
            "standby_last_point_timestamp_seconds",
            "Source time of the VM's newest recovery point (seconds since the Unix epoch).",
            l,
            p.time_us as f64 / 1e6,
        );
    }
    let resync = match &st.remote {
        Some(rm) => rm.resync_bytes,
        None => r.resync_bytes.unwrap_or(0),
    };
    f.gauge(
        "standby_resync_pending_bytes",
        "Bytes of blocks the agent tracked in its dirty bitmap and has yet to resync.",
        l,
        resync as f64,
    );
    f.gauge(
        "standby_owner_up",
        "1 if a process owns the VM now and answers for it (its agent, or for a remote VM a connected follower).",
        l,
        match &st.remote {
            Some(rm) => (rm.link == "connected") as u8 as f64,
            None => r.owner_pid.is_some() as u8 as f64,
        },
    );
    if let Some(rm) = &st.remote {
        f.gauge(
            "standby_link_up",
            "1 if the link to the VM's cache service is up (for a vault: its follower is connected).",
            l,
            (rm.link == "connected") as u8 as f64,
        );
        f.gauge(
            "standby_behind_cache_records",
            "Records the cache service holds that the vault has not applied.",
            l,
            rm.behind_records as f64,
        );
        f.gauge(
            "standby_behind_cache_bytes",
            "Bytes the cache service and the vault's staging log hold that the replica has not applied.",
            l,
            rm.behind_bytes as f64,
        );
        f.gauge(
            "standby_behind_cache_seconds",
            "Source-time gap between the cache service's newest record and the newest applied one.",
            l,
            rm.behind_seconds,
        );
    }
    for d in &st.disks {
        let dl: &[(&'static str, &str)] = &[("vm", vm), ("disk", &d.name)];
        f.gauge(
            "standby_disk_size_bytes",
            "The disk's virtual size.",
            dl,
            d.size_bytes as f64,
        );
        f.gauge(
            "standby_disk_replicated_bytes",
            "Bytes holding data in the disk's replica (its latest readable state).",
            dl,
            d.replicated_bytes as f64,
        );
    }
}

/// The write tap's figures of `vm` (disk names in the tap's order).
pub(crate) fn write_families(vm: &str, disks: &[String], stats: &WriteStats, f: &mut Families) {
    for (name, d) in disks.iter().zip(&stats.disks) {
        f.add(
            "standby_write_latency_seconds",
            "How long the agent took to acknowledge the VM's writes, trims and write-zeroes (in the log; durable too with FUA).",
            MetricType::Histogram,
            owned(&[("vm", vm), ("disk", name)]),
            Value::Histogram(d.latency.snapshot()),
        );
        f.counter(
            "standby_written_bytes",
            "Payload bytes of the VM's acknowledged writes through the agent since it started.",
            &[("vm", vm), ("disk", name)],
            d.written_bytes.load(Ordering::Relaxed),
        );
    }
}

/// A source-site agent's link and journal.
pub(crate) fn source_families(vm: &str, r: &SourceReport, f: &mut Families) {
    let l: &[(&'static str, &str)] = &[("vm", vm)];
    f.gauge(
        "standby_link_up",
        "1 if the link to the cache service is up.",
        l,
        r.connected as u8 as f64,
    );
    f.gauge(
        "standby_backlog_records",
        "Records in the agent's journal the cache service has not acknowledged durable.",
        l,
        r.unacked_records as f64,
    );
    f.gauge(
        "standby_backlog_bytes",
        "Bytes in the agent's journal the cache service has not acknowledged durable.",
        l,
        r.unacked_bytes as f64,
    );
    f.gauge(
        "standby_journal_bytes",
        "Bytes the agent's journal holds on disk.",
        l,
        r.journal_bytes as f64,
    );
    if let Some(c) = r.journal_capacity_bytes {
        f.gauge(
            "standby_journal_capacity_bytes",
            "The limit of the agent's journal.",
            l,
            c as f64,
        );
    }
    f.gauge(
        "standby_resync_pending_bytes",
        "Bytes of blocks the agent tracked in its dirty bitmap and has yet to resync.",
        l,
        r.resync_pending_bytes.unwrap_or(0) as f64,
    );
}

/// A cache service's VM logs.
pub(crate) fn cache_families(vms: &[VmReport], f: &mut Families) {
    for v in vms {
        let vm = v.name.as_str();
        let l: &[(&'static str, &str)] = &[("vm", vm)];
        let s = &v.state;
        f.gauge(
            "standby_cache_bytes",
            "Bytes the VM's log in the cache service holds.",
            l,
            s.used_bytes as f64,
        );
        if s.capacity_bytes > 0 {
            f.gauge(
                "standby_cache_capacity_bytes",
                "The limit of each VM's log in the cache service.",
                l,
                s.capacity_bytes as f64,
            );
        }
        f.gauge(
            "standby_backlog_records",
            "Records in the VM's log the target has not reported durable.",
            l,
            s.durable_seq.saturating_sub(v.target_seq) as f64,
        );
        f.gauge(
            "standby_backlog_bytes",
            "Bytes in the VM's log the target has not reported durable.",
            l,
            s.backlog_bytes as f64,
        );
        for (peer, up) in [
            ("agent", s.agent_connected),
            ("processor", v.processor_connected),
        ] {
            f.gauge(
                "standby_link_up",
                "1 if the peer (the VM's agent, or the target's processor) is connected to the cache service.",
                &[("vm", vm), ("peer", peer)],
                up as u8 as f64,
            );
        }
        f.gauge(
            "standby_resync_pending_bytes",
            "Bytes of blocks the VM's agent last reported it has yet to resync.",
            l,
            s.agent.resync_bytes as f64,
        );
        f.gauge(
            "standby_journal_bytes",
            "Bytes in the agent's journal not yet in the cache service, as the agent last reported.",
            l,
            s.agent.journal_bytes as f64,
        );
    }
}

/// A `--metrics` listener, bound but not yet answering: bind before anything else starts,
/// so a bad address is a one-line error and nothing has begun.
pub(crate) struct Listener {
    server: tiny_http::Server,
    addr: SocketAddr,
}

/// Bind `addr` for `--metrics` (HOST:PORT).
pub(crate) fn bind(addr: &str) -> Result<Listener, Error> {
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            Error::Invalid(format!(
                "--metrics '{addr}' is not an address like 127.0.0.1:9100: {e}"
            ))
        })?
        .collect();
    let first = resolved
        .first()
        .ok_or_else(|| Error::Invalid(format!("--metrics '{addr}' resolves to no address")))?;
    let listener = TcpListener::bind(first)
        .map_err(|e| Error::Invalid(format!("cannot listen on {addr} for --metrics: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("the --metrics listener", e))?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| Error::Invalid(format!("cannot serve --metrics on {addr}: {e}")))?;
    Ok(Listener {
        server,
        addr: local,
    })
}

/// `--metrics` answering scrapes on its own thread until dropped.
pub(crate) struct Exporter {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer `GET /metrics` with `render()` (every other path: 404), one request at a
    /// time on one thread.
    pub(crate) fn start(
        self,
        render: impl Fn() -> String + Send + 'static,
    ) -> Result<Exporter, Error> {
        let server = Arc::new(self.server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("standby-metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("");
                    let resp = if path == "/metrics" && *req.method() == tiny_http::Method::Get {
                        let mut r = tiny_http::Response::from_string(render());
                        if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE) {
                            r = r.with_header(h);
                        }
                        r
                    } else {
                        tiny_http::Response::from_string("not found; metrics are at /metrics\n")
                            .with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| Error::io("the --metrics thread", e))?;
        Ok(Exporter {
            server,
            thread: Some(thread),
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bind `--metrics` if given (before anything else starts).
pub(crate) fn bind_opt(addr: Option<&str>) -> Result<Option<Listener>, Error> {
    addr.map(bind).transpose()
}

/// Say where metrics are served (stderr, so stdout stays the command's own).
pub(crate) fn announce(l: &Listener) {
    eprintln!("standby: metrics on http://{}/metrics", l.addr());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_prometheus_text_format() {
        let mut f = Families::default();
        f.gauge("standby_points", "Points.", &[("vm", "a")], 3.0);
        f.gauge("standby_points", "Points.", &[("vm", "b")], 1.0);
        f.counter(
            "standby_written_bytes",
            "Bytes.",
            &[("vm", "a"), ("disk", "os")],
            4096,
        );
        let stats = WriteStats::new(1);
        stats.record(0, Duration::from_micros(30), 512);
        write_families("a", &["os".into()], &stats, &mut f);
        let text = f.render();
        assert!(text.contains("# TYPE standby_points gauge\n"), "{text}");
        assert!(text.contains("standby_points{vm=\"a\"} 3"), "{text}");
        assert!(text.contains("standby_points{vm=\"b\"} 1"), "{text}");
        assert_eq!(text.matches("# TYPE standby_points ").count(), 1, "{text}");
        assert!(
            text.contains("# TYPE standby_written_bytes_total counter"),
            "{text}"
        );
        // 30 µs: in no bucket up to 25 µs, in every one from 50 µs up.
        let bucket = |le: &str| {
            let key = format!(
                "standby_write_latency_seconds_bucket{{vm=\"a\",disk=\"os\",le=\"{le}\"}} "
            );
            let line = text
                .lines()
                .find(|l| l.starts_with(&key))
                .unwrap_or_else(|| panic!("{key}: {text}"));
            line[key.len()..].to_string()
        };
        assert_eq!(bucket("2.5e-05"), "0");
        assert_eq!(bucket("5e-05"), "1");
        assert_eq!(bucket("0.001"), "1");
        assert_eq!(bucket("10"), "1");
        assert_eq!(bucket("+Inf"), "1");
        assert!(
            text.contains("standby_write_latency_seconds_count{vm=\"a\",disk=\"os\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_address_is_refused_before_anything_starts() {
        assert!(matches!(bind("not an address"), Err(Error::Invalid(_))));
        let held = bind("127.0.0.1:0").unwrap();
        let e = bind(&held.addr().to_string()).err().unwrap().to_string();
        assert!(e.contains("cannot listen on"), "{e}");
    }
}
