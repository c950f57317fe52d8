//! `--metrics ADDR`: `/metrics` of a running embedded agent, of the two sites' processes
//! (cache service, source-site agent, `process --follow`) read over HTTP and checked
//! against `standby status --json` (RPO, backlog, points, health, disks) and what was
//! written; every scrape goes through `promtool check metrics` (skipped, saying so, only
//! where promtool is not installed: CI installs it). A bad `--metrics` address stops each
//! command with one line before it starts anything.

mod common;

use common::{interrupt, qemu_io, Env};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A running command whose stdout and stderr lines are collected as they come.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(env: &Env, args: &[&str]) -> Running {
        let mut child = env
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The rest of the first line that contains `prefix`, waiting for it (60 s at most).
    fn after(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(prefix)) {
                return l[l.find(prefix).unwrap() + prefix.len()..].to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no '{prefix}' in: {:#?}", self.seen),
            }
        }
    }

    /// Where its `--metrics` listener is.
    fn metrics_addr(&mut self) -> String {
        let rest = self.after("metrics on http://");
        rest.trim_end_matches("/metrics").to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /metrics` at `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// Scrape `/metrics`, check it with promtool, and parse it: `name{labels}` → value.
fn scrape(addr: &str) -> Metrics {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    promtool_check(&body);
    Metrics::parse(&body)
}

fn promtool_check(body: &str) {
    let Ok(mut c) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed (Debian: apt-get install prometheus): not checking the exposition with it here");
        return;
    };
    c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{body}"
    );
}

#[derive(Debug)]
struct Metrics(BTreeMap<String, f64>, String);

impl Metrics {
    fn parse(body: &str) -> Metrics {
        let mut m = BTreeMap::new();
        for l in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (k, v) = l.rsplit_once(' ').unwrap();
            m.insert(k.to_string(), v.parse::<f64>().unwrap());
        }
        Metrics(m, body.to_string())
    }

    fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{}", self.1))
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

fn status(env: &Env, vm: &str) -> Value {
    let doc = env.json(&["status", vm, "--json"]);
    doc["vms"][0].clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The metrics a vault's VM has that `status --json` has too, compared one by one.
fn assert_matches_status(m: &Metrics, st: &Value, vm: &str) {
    let l = format!("{{vm=\"{vm}\"}}");
    assert_eq!(m.get(&format!("standby_points{l}")), f(&st["points"]));
    assert_eq!(
        m.get(&format!("standby_backlog_records{l}")),
        f(&st["backlog_records"])
    );
    assert_eq!(
        m.get(&format!("standby_backlog_bytes{l}")),
        f(&st["backlog_bytes"])
    );
    assert_eq!(
        m.get(&format!("standby_rpo_threshold_seconds{l}")),
        f(&st["rpo_threshold_seconds"])
    );
    let health = st["health"].as_str().unwrap();
    for h in ["healthy", "warning", "critical"] {
        assert_eq!(
            m.get(&format!("standby_health{{vm=\"{vm}\",state=\"{h}\"}}")),
            if h == health { 1.0 } else { 0.0 },
            "health {h}, status says {health}"
        );
    }
    for d in st["disks"].as_array().unwrap() {
        let dl = format!("{{vm=\"{vm}\",disk=\"{}\"}}", d["name"].as_str().unwrap());
        assert_eq!(
            m.get(&format!("standby_disk_size_bytes{dl}")),
            f(&d["size_bytes"])
        );
        assert_eq!(
            m.get(&format!("standby_disk_replicated_bytes{dl}")),
            f(&d["replicated_bytes"])
        );
    }
}

fn disk(root: &Path, name: &str, size: u64) -> String {
    let p = root.join(format!("{name}.raw"));
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    format!("{name}={}", p.display())
}

#[test]
fn the_agents_metrics_agree_with_status_and_count_its_writes() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let (os, data) = (
        disk(&env.root, "os", 8 * MIB),
        disk(&env.root, "data", 8 * MIB),
    );
    env.ok(&["protect", "web01", "--disk", &os, "--disk", &data]);
    let mut agent = Running::start(
        &env,
        &[
            "agent",
            "web01",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let nbd = agent.after("serving NBD on ");
    let nbd = nbd.split_whitespace().next().unwrap().to_string();
    let addr = agent.metrics_addr();

    // Nothing written yet: the histogram is there, empty.
    let m = scrape(&addr);
    assert_eq!(
        m.get("standby_write_latency_seconds_count{vm=\"web01\",disk=\"os\"}"),
        0.0
    );

    qemu_io(
        &format!("nbd://{nbd}/os"),
        &["write -P 0xab 0 1M", "write -P 0xcd 2M 1M", "flush"],
    );
    qemu_io(
        &format!("nbd://{nbd}/data"),
        &["write -P 0x11 1M 1M", "flush"],
    );
    // A point through the agent: everything written is processed and the VM is idle.
    env.ok(&["point", "web01", "--name", "after-writes"]);

    let m = scrape(&addr);
    let st = status(&env, "web01");
    assert_matches_status(&m, &st, "web01");
    assert_eq!(f(&st["points"]), 2.0, "{st}");
    assert_eq!(f(&st["backlog_records"]), 0.0, "{st}");
    // Everything acknowledged is durable and the agent owns the VM: status says RPO 0.
    assert_eq!(f(&st["rpo_seconds"]), 0.0, "{st}");
    assert_eq!(m.get("standby_rpo_seconds{vm=\"web01\"}"), 0.0);
    assert_eq!(m.get("standby_owner_up{vm=\"web01\"}"), 1.0);
    assert_eq!(m.get("standby_resync_pending_bytes{vm=\"web01\"}"), 0.0);
    assert_eq!(m.get("standby_status_up{vm=\"web01\"}"), 1.0);
    // The write path's own figures: 2 writes on os, 1 on data, every byte counted.
    let os_l = "{vm=\"web01\",disk=\"os\"}";
    let data_l = "{vm=\"web01\",disk=\"data\"}";
    assert_eq!(
        m.get(&format!("standby_write_latency_seconds_count{os_l}")),
        2.0
    );
    assert_eq!(
        m.get(&format!("standby_write_latency_seconds_count{data_l}")),
        1.0
    );
    assert_eq!(
        m.get("standby_write_latency_seconds_bucket{vm=\"web01\",disk=\"os\",le=\"+Inf\"}"),
        2.0
    );
    assert!(m.get(&format!("standby_write_latency_seconds_sum{os_l}")) > 0.0);
    // Cumulative buckets: none past the count (each of the 19 bounds and +Inf).
    let buckets: Vec<f64> =
        m.0.iter()
            .filter(|(k, _)| {
                k.starts_with("standby_write_latency_seconds_bucket{vm=\"web01\",disk=\"os\",")
            })
            .map(|(_, v)| *v)
            .collect();
    assert_eq!(buckets.len(), 20, "{}", m.1);
    assert!(buckets.iter().all(|b| *b <= 2.0), "{}", m.1);

    assert_eq!(
        m.get(&format!("standby_written_bytes_total{os_l}")),
        (2 * MIB) as f64
    );
    assert_eq!(
        m.get(&format!("standby_written_bytes_total{data_l}")),
        MIB as f64
    );
    // Applied into the replica by this process: the three writes.
    assert_eq!(
        m.get("standby_replicated_bytes_total{vm=\"web01\"}"),
        (3 * MIB) as f64
    );
    assert!(m.get("standby_last_point_age_seconds{vm=\"web01\"}") >= 0.0);
    // status --json spells the point's time in whole seconds; the metric has them too.
    let t = humantime::parse_rfc3339(st["last_point"]["time"].as_str().unwrap()).unwrap();
    let t = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    assert_eq!(
        m.get("standby_last_point_timestamp_seconds{vm=\"web01\"}")
            .floor(),
        t
    );
    // A local VM has no link to a cache service.
    assert!(!m.has("standby_link_up{vm=\"web01\"}"));
    // Anything but /metrics is not found.
    assert_eq!(get(&addr, "/").0, 404);

    interrupt(&mut agent.child);
    // With the agent stopped, status warns; so would the metrics of a follower.
    let st = status(&env, "web01");
    assert_eq!(st["health"], "warning", "{st}");
}

#[test]
fn the_dashboards_metrics_agree_with_status_on_its_own_port_and_on_metrics() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os = disk(&env.root, "os", 8 * MIB);
    env.ok(&["protect", "web01", "--disk", &os]);
    env.ok(&["point", "web01", "--name", "one"]);
    let mut serve = Running::start(
        &env,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    // "dashboard of VAULT on http://ADDR/ (pid N)" (stderr's "metrics on http://…" is
    // another line, which may come first).
    let page = serve.after("dashboard of ");
    let page = page
        .split(" on http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let metrics = serve.metrics_addr();
    let st = status(&env, "web01");
    for addr in [&page, &metrics] {
        let m = scrape(addr);
        assert_matches_status(&m, &st, "web01");
        assert_eq!(m.get("standby_points{vm=\"web01\"}"), 2.0);
    }
    interrupt(&mut serve.child);
}

#[test]
fn a_bad_metrics_address_stops_the_command_before_it_starts() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os = disk(&env.root, "os", MIB);
    env.ok(&["protect", "web01", "--disk", &os]);
    env.ok(&["link", "export", "--out", "creds"]);
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = held.local_addr().unwrap().to_string();
    let cache_dir = env.root.join("cache");
    let journal = env.root.join("journal");
    let cache_dir_s = cache_dir.to_str().unwrap();
    let journal_s = journal.to_str().unwrap();
    for bad in ["nonsense", "127.0.0.1:99999", in_use.as_str()] {
        for args in [
            vec!["agent", "web01", "--listen", "127.0.0.1:0"],
            vec![
                "agent",
                "src01",
                "--cache",
                "127.0.0.2:1",
                "--creds",
                "creds",
                "--journal",
                journal_s,
                "--disk",
                &os,
                "--insecure-loopback",
                "--listen",
                "127.0.0.1:0",
            ],
            vec!["process", "--follow"],
            vec![
                "cache",
                "serve",
                "--dir",
                cache_dir_s,
                "--listen",
                "127.0.0.2:0",
                "--creds",
                "creds",
                "--insecure-loopback",
            ],
        ] {
            let mut a = args.clone();
            a.extend(["--metrics", bad]);
            let out = env.run(&a);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{a:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{a:?}: {err}");
            assert!(err.contains("--metrics"), "{a:?}: {err}");
            assert!(
                out.stdout.is_empty(),
                "{a:?} started: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    // Nothing was started: no cache directory, no journal, no agent socket.
    assert!(!cache_dir.exists());
    assert!(!journal.exists());
    assert!(!env.vault.join("vms/web01/agent.sock").exists());
    // --metrics on a one-shot `process` would serve nothing: refused by the parser.
    let out = env.run(&["process", "--metrics", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Poll `check` until it holds (60 s at most), saying what was last seen otherwise.
fn eventually<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = probe();
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last seen {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_sites_metrics_agree_with_status() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    env.ok(&["link", "export", "--out", "creds"]);
    env.ok(&[
        "policy",
        "set",
        "fast",
        "--crash-interval",
        "1s",
        "--rpo-threshold",
        "10m",
    ]);
    let disk = env.root.join("web01-os.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let mut cache = Running::start(
        &env,
        &[
            "cache",
            "serve",
            "--dir",
            "cache",
            "--listen",
            "127.0.0.2:0",
            "--creds",
            "creds",
            "--insecure-loopback",
            "--capacity",
            "1GiB",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let cache_addr = cache.after("cache service on ");
    let cache_addr = cache_addr.split_whitespace().next().unwrap().to_string();
    let cache_metrics = cache.metrics_addr();
    let mut agent = Running::start(
        &env,
        &[
            "agent",
            "web01",
            "--cache",
            &cache_addr,
            "--creds",
            "creds",
            "--insecure-loopback",
            "--journal",
            "journal",
            "--disk",
            &format!("os={}", disk.display()),
            "--listen",
            "127.0.0.2:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let nbd = agent.after("serving NBD on ");
    let nbd = nbd.split(',').next().unwrap().to_string();
    let agent_metrics = agent.metrics_addr();
    eventually(
        "protect --cache",
        || {
            env.run(&[
                "protect",
                "web01",
                "--cache",
                &cache_addr,
                "--insecure-loopback",
                "--policy",
                "fast",
            ])
            .status
            .success()
        },
        |ok| *ok,
    );
    let mut follower = Running::start(
        &env,
        &[
            "process",
            "--cache",
            &cache_addr,
            "--follow",
            "--every",
            "200ms",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let follower_metrics = follower.metrics_addr();
    qemu_io(
        &format!("nbd://{nbd}/os"),
        &["write -P 0xab 0 2M", "write -P 0xcd 8M 1M", "flush"],
    );

    // The source agent: the link is up and the cache service has everything.
    let m = eventually(
        "the source agent's journal acknowledged",
        || scrape(&agent_metrics),
        |m| {
            m.get("standby_link_up{vm=\"web01\"}") == 1.0
                && m.get("standby_backlog_records{vm=\"web01\"}") == 0.0
                && m.get("standby_resync_pending_bytes{vm=\"web01\"}") == 0.0
        },
    );
    let os_l = "{vm=\"web01\",disk=\"os\"}";
    assert_eq!(
        m.get(&format!("standby_write_latency_seconds_count{os_l}")),
        2.0
    );
    assert_eq!(
        m.get(&format!("standby_written_bytes_total{os_l}")),
        (3 * MIB) as f64
    );
    assert_eq!(
        m.get("standby_journal_capacity_bytes{vm=\"web01\"}"),
        1024.0 * MIB as f64
    );

    // The target: caught up with the cache service (the first point cut once the initial
    // copy was in), then compared with status.
    eventually(
        "the vault caught up",
        || status(&env, "web01"),
        |st| {
            st["remote"]["link"] == "connected"
                && st["remote"]["behind_records"] == 0
                && st["backlog_records"] == 0
                && st["points"].as_u64().unwrap_or(0) >= 1
        },
    );
    // Points are cut every second meanwhile: take a scrape between two equal statuses.
    let (before, m, _after) = eventually(
        "a scrape between two equal statuses",
        || {
            let before = status(&env, "web01");
            let m = scrape(&follower_metrics);
            let after = status(&env, "web01");
            (before, m, after)
        },
        |(b, _, a)| b["points"] == a["points"] && b["backlog_records"] == a["backlog_records"],
    );
    assert_matches_status(&m, &before, "web01");
    assert_eq!(m.get("standby_link_up{vm=\"web01\"}"), 1.0);
    assert_eq!(m.get("standby_owner_up{vm=\"web01\"}"), 1.0);
    assert_eq!(
        m.get("standby_behind_cache_records{vm=\"web01\"}"),
        f(&before["remote"]["behind_records"])
    );
    // The RPO: both from the report the follower publishes every second; they differ by
    // the age of that report between the two reads, which status counts as live below 5 s.
    let rpo = m.get("standby_rpo_seconds{vm=\"web01\"}");
    assert!(
        (rpo - f(&before["rpo_seconds"])).abs() < 5.0,
        "metrics RPO {rpo}, status {}",
        before["rpo_seconds"]
    );
    // The follower applied every byte the agent shipped (the initial copy of the written
    // blocks, then nothing twice).
    assert!(m.get("standby_replicated_bytes_total{vm=\"web01\"}") >= (3 * MIB) as f64);
    assert_eq!(
        m.get("standby_cache_capacity_bytes{vm=\"web01\"}"),
        f(&before["remote"]["cache_capacity_bytes"])
    );

    // The cache service: both peers connected, nothing the target lacks, and its log's
    // size as the target's status reports it.
    let m = eventually(
        "the cache service's figures as status reports them",
        || (scrape(&cache_metrics), status(&env, "web01")),
        |(m, st)| {
            m.get("standby_link_up{vm=\"web01\",peer=\"agent\"}") == 1.0
                && m.get("standby_link_up{vm=\"web01\",peer=\"processor\"}") == 1.0
                && m.get("standby_backlog_records{vm=\"web01\"}") == 0.0
                && m.get("standby_cache_bytes{vm=\"web01\"}")
                    == f(&st["remote"]["cache_used_bytes"])
        },
    )
    .0;
    assert_eq!(
        m.get("standby_cache_capacity_bytes{vm=\"web01\"}"),
        1024.0 * MIB as f64
    );

    interrupt(&mut follower.child);
    interrupt(&mut agent.child);
    interrupt(&mut cache.child);
}

/// docs/alerts.yml is valid (`promtool check rules`) and its unit tests pass (`promtool
/// test rules docs/alerts.test.yml`: each alert fires when it should and not before).
#[test]
fn the_alert_rules_check_and_pass_their_unit_tests() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = match std::process::Command::new("promtool")
            .args(args)
            .current_dir(&docs)
            .output()
        {
            Ok(o) => o,
            Err(_) => {
                eprintln!("promtool is not installed (Debian: apt-get install prometheus): skipping promtool {args:?}");
                return;
            }
        };
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
