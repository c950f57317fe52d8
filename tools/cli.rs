//! The command line: clap's description of every command, and the parsers of its values.

use clap::{Args, Parser, Subcommand};
use standby_engine::vault::{DiskSource, PointSpec};
use standby_engine::Error;
use std::path::PathBuf;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  standby demo                                  # the whole flow on a throw-away vault
  standby init /srv/vault
  export STANDBY_VAULT=/srv/vault
  standby policy set gold --crash-interval 1m --retention 72h --rpo-threshold 15m
  standby protect web01 --disk os=/images/web01-os.raw --disk data=new:20GiB --policy gold \\
      --resource-group prod --network prod-net --subnet web
  standby process --follow                      # apply the cache, cut points (Ctrl-C stops)
  standby point web01 --app-consistent --name before-upgrade
  standby points web01
  standby status --json
  standby failover web01 --point latest-app-consistent
  standby failover-commit web01";

#[derive(Parser)]
#[command(
    name = "standby",
    version,
    about = "Keep point-in-time replicas of VM disks at a second site and fail over to any moment.",
    after_help = EXAMPLES
)]
pub(crate) struct Cli {
    /// The vault directory (default: $STANDBY_VAULT; set but empty counts as unset).
    #[arg(long, value_name = "VAULT", global = true)]
    pub vault: Option<PathBuf>,
    /// How long a command waits for a VM or vault another process holds before it gives
    /// up naming the holder (`forever` waits for good). Commands that a running agent or
    /// follower can answer (point, points, status, verify, test-failover, mount) go
    /// through it instead and do not wait.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_wait, value_name = "DURATION")]
    pub wait: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a vault: a directory that holds the catalog, change logs and replicas.
    #[command(after_help = "Example:\n  standby init /srv/vault")]
    Init {
        /// Directory to create (an existing one must be empty).
        vault: PathBuf,
    },
    /// Create, change or list replication policies (`default` always exists).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Enable replication of a VM: register it, run initial replication, cut the initial point.
    #[command(
        after_help = "Examples:\n  standby protect web01 --disk os=/images/web01.raw\n  standby protect db01 --disk os=/images/db01.raw --disk logs=new:10GiB \\\n      --resource-group prod --network prod-net --subnet db --availability-set db-set \\\n      --target-resource-group dr-prod --network-mapping prod-net=dr-net\n\nTarget settings default from the source: RG-asr, NET-asr (or the network --network-mapping\nmaps NET to; a --target-network that contradicts it is refused), the same subnet, SET-asr."
    )]
    Protect(ProtectArgs),
    /// Apply pending changes into the replicas and cut points per policy.
    #[command(
        after_help = "Examples:\n  standby process            # every protected VM, once\n  standby process web01 --follow\n  standby process --cache 10.0.0.2:7500 --follow   # target site: pull remote VMs and process\n\nWith --follow, remote VMs (protected with --cache) are pulled from their cache service into\nthe vault and processed. While connected, the follower owns such a VM: point, points,\nstatus, verify, mount and test-failover go through it (the link stays up); a failover\nmakes it let go of the VM for as long as the failover runs."
    )]
    Process {
        /// Only this VM.
        vm: Option<String>,
        /// Keep processing until interrupted (Ctrl-C or SIGTERM stop cleanly).
        #[arg(long)]
        follow: bool,
        /// Pause between passes with --follow.
        #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
        every: Duration,
        /// Only remote VMs whose cache service is here (with --follow, pull from it).
        #[arg(long, value_name = "ADDR")]
        cache: Option<String>,
    },
    /// Serve a VM's disks over NBD through the write tap, and replicate them.
    #[command(
        after_help = "Every write, trim and write-zeroes is appended to the VM's change log before it is\nacknowledged and reaches the source image only once durable there. The agent also\nprocesses the log into the replica per the VM's policy; `point`, `points`, `status`,\n`verify`, `test-failover` and `mount` go through it while it runs. Ctrl-C or SIGTERM stop it cleanly.\n\nExamples:\n  standby agent web01 --listen 127.0.0.1:10809\n  qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/os,format=raw ..."
    )]
    Agent(AgentArgs),
    /// The source site's cache service, which owns the VMs' change logs.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// The site-to-site link's credentials.
    #[command(subcommand)]
    Link(LinkCmd),
    /// Serve every disk of a recovery point over NBD, read-only, without a restore.
    #[command(
        after_help = "POINT is anything failover accepts. Start-up costs the point's index, not its data;\nblock status reports holes, so copies stay sparse. With --writable, writes go to a\nthrow-away copy-on-write overlay: the point never changes. Ctrl-C stops it.\n\nExamples:\n  standby mount web01 --point latest-app-consistent\n  qemu-img convert -O raw nbd://127.0.0.1:10810/os os.raw\n  nbdfuse /mnt/os nbd://127.0.0.1:10810/os & mount -o ro,loop /mnt/os/nbd /mnt/fs"
    )]
    Mount {
        vm: String,
        #[arg(long, value_parser = parse_spec)]
        point: PointSpec,
        /// Address to serve NBD on (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1:10810")]
        listen: String,
        /// Accept writes into a throw-away copy-on-write overlay.
        #[arg(long)]
        writable: bool,
    },
    /// Cut a recovery point now (ordered with the VM's writes).
    #[command(
        after_help = "Examples:\n  standby point web01 --app-consistent --name before-upgrade\n  standby point web01 --app-consistent --quiesce-command 'ssh web01 fsfreeze -f /data' \\\n      --thaw-command 'ssh web01 fsfreeze -u /data'\n  standby point web01 --app-consistent --journal /var/lib/standby/web01   # source site, remote VM"
    )]
    Point(PointArgs),
    /// List a VM's recovery points.
    #[command(after_help = "Example:\n  standby points web01 --json")]
    Points {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Replication state, health, RPO and backlog of every VM (or one).
    #[command(after_help = "Example:\n  standby status web01 --json")]
    Status {
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fail a VM over: materialize its disks at a point in the target resource group.
    #[command(
        after_help = "POINT is latest, latest-processed, latest-app-consistent, a point id, a point's name\n(the newest point of that name; name:NAME for a name that looks like another form), seq:N\nor time:RFC3339 (inside the any-moment window; fractions of a second are kept).\n\nExamples:\n  standby failover web01 --point latest\n  standby failover web01 --point before-upgrade\n  standby failover web01 --point time:2026-11-26T09:30:00Z --out /srv/recovered/web01"
    )]
    Failover(FailoverArgs),
    /// End a failover: it becomes final and the VM's recovery points are deleted.
    FailoverCommit { vm: String },
    /// Materialize a point into an isolated network while replication keeps running.
    #[command(after_help = "Example:\n  standby test-failover web01 --point latest-processed")]
    TestFailover {
        #[command(flatten)]
        f: FailoverArgs,
        /// The isolated network (default: the target network with -test). vm.json maps every
        /// source network to it (by default each mapped network to its own -test twin).
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove a test failover's disks.
    TestFailoverCleanup { vm: String },
    /// Check every checksum of a VM's log and replica; exit 0 only if all is sound.
    #[command(after_help = "Example:\n  standby verify web01 --point latest-app-consistent")]
    Verify {
        vm: String,
        /// Only report damage this point reads.
        #[arg(long, value_parser = parse_spec)]
        point: Option<PointSpec>,
        #[arg(long)]
        json: bool,
    },
    /// Run the whole flow on a throw-away vault: protect, write, process, fail over, verify.
    #[command(after_help = "Example:\n  standby demo --dir /tmp/standby-demo")]
    Demo {
        /// Where to create the demo vault and source disks (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum CacheCmd {
    /// Serve the change logs of the source site's VMs: agents ship to it, the target
    /// site's processor pulls from it. Ctrl-C or SIGTERM stop it cleanly.
    #[command(
        after_help = "Examples:\n  standby cache serve --dir /srv/standby-cache --listen 10.0.0.2:7500 --creds /etc/standby\n  standby cache serve --dir /tmp/c --listen 127.0.0.2:7500 --creds ./creds --insecure-loopback\n\nCREDS is the directory `standby link export` wrote at the target site."
    )]
    Serve {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[arg(long, value_name = "DIR")]
        creds: PathBuf,
        /// Plain TCP, refused anywhere but 127.0.0.0/8.
        #[arg(long)]
        insecure_loopback: bool,
        /// Limit each VM's log; when full, agents fall back to their dirty bitmaps.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        capacity: Option<u64>,
    },
}

#[derive(Subcommand)]
pub(crate) enum LinkCmd {
    /// Write the source site's credentials (the vault's CA certificate, the cache service's
    /// and the agent's certificates and keys, the link key) into a new directory.
    #[command(
        after_help = "Example:\n  standby link export --out /tmp/source-creds && scp -r /tmp/source-creds source-host:/etc/standby"
    )]
    Export {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Create the link credentials of a vault made before they existed.
    Init,
}

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Create or change a policy; unset options keep their current (or default) value.
    #[command(
        after_help = "Example:\n  standby policy set gold --crash-interval 1m --app-interval off --retention 72h"
    )]
    Set(PolicySetArgs),
    /// List policies.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct ProtectArgs {
    pub vm: String,
    /// NAME=PATH of a raw image, or NAME=new:SIZE to create an empty sparse one at
    /// VAULT/sources/VM/NAME.raw, or NAME=new:SIZE:PATH to create it at PATH (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH|NAME=new:SIZE[:PATH]", required_unless_present = "cache", value_parser = parse_disk)]
    pub disks: Vec<(String, DiskSource)>,
    /// The VM's source site is remote: its agent ships to the cache service at ADDR, which
    /// says what disks it has (start the agent first).
    #[arg(long, value_name = "ADDR", conflicts_with = "disks")]
    pub cache: Option<String>,
    /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
    #[arg(long, requires = "cache")]
    pub insecure_loopback: bool,
    #[arg(long)]
    pub policy: Option<String>,
    #[arg(long)]
    pub resource_group: Option<String>,
    #[arg(long)]
    pub network: Option<String>,
    #[arg(long)]
    pub subnet: Option<String>,
    #[arg(long)]
    pub availability_set: Option<String>,
    #[arg(long)]
    pub target_resource_group: Option<String>,
    #[arg(long)]
    pub target_network: Option<String>,
    #[arg(long)]
    pub target_subnet: Option<String>,
    #[arg(long)]
    pub target_availability_set: Option<String>,
    /// SRC=DST source network to target network (repeatable).
    #[arg(long, value_name = "SRC=DST", value_parser = parse_pair)]
    pub network_mapping: Vec<(String, String)>,
    /// Limit the VM's change log (e.g. 4GiB); when it is full the agent tracks writes in a
    /// dirty bitmap and resyncs them later. Default: no limit.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub cache_capacity: Option<u64>,
}

#[derive(Args)]
pub(crate) struct FailoverArgs {
    pub vm: String,
    /// latest, latest-processed, latest-app-consistent, an id, a name (the newest point of
    /// that name), seq:N or time:RFC3339.
    #[arg(long, value_parser = parse_spec)]
    pub point: PointSpec,
    /// Output directory (default: VAULT/failover/TARGET-RG/VM).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report (point, disks with their sha256, placement) as one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30s, 5m, 1h, 2d: {e}"))
}

/// A duration or `off`. Its own type because clap's derive reads `Option<Option<T>>` as
/// "a flag with an optional value" and would then ask for a bare `T`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Interval(pub Option<Duration>);

fn parse_interval(s: &str) -> Result<Interval, String> {
    if s == "off" {
        Ok(Interval(None))
    } else {
        parse_duration(s).map(|d| Interval(Some(d)))
    }
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    if s == "forever" {
        Ok(Duration::from_secs(100 * 365 * 86400))
    } else {
        parse_duration(s)
    }
}

fn parse_spec(s: &str) -> Result<PointSpec, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("'{s}' is not SRC=DST")),
    }
}

/// Parse a size like 512, 10MiB, 20GiB, 1TiB (binary units; K/M/G/T accepted too).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512, 64MiB or 20GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_disk(s: &str) -> Result<(String, DiskSource), String> {
    let (name, path) =
        parse_pair(s).map_err(|_| format!("'{s}' is not NAME=PATH or NAME=new:SIZE"))?;
    let src = match path.strip_prefix("new:") {
        Some(rest) => match rest.split_once(':') {
            Some((size, file)) if !file.is_empty() => {
                DiskSource::New(PathBuf::from(file), parse_size(size)?)
            }
            Some(_) => return Err(format!("'{s}' has no PATH after new:SIZE:")),
            None => DiskSource::NewInVault(parse_size(rest)?),
        },
        None => DiskSource::Existing(PathBuf::from(path)),
    };
    Ok((name, src))
}

#[derive(Args)]
pub(crate) struct AgentArgs {
    pub vm: String,
    /// Address to serve NBD on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// How often the log is processed into the replica.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub process_every: Duration,
    /// Ship to the cache service at ADDR (source site) instead of a local vault.
    #[arg(long, value_name = "ADDR", requires_all = ["creds", "journal"])]
    pub cache: Option<String>,
    /// With --cache: the source site's credentials (`standby link export`).
    #[arg(long, value_name = "DIR")]
    pub creds: Option<PathBuf>,
    /// With --cache: the agent's journal directory (every write is kept here until
    /// the cache service has it durable).
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,
    /// With --cache: limit the journal; once full (link down long enough) the agent
    /// tracks writes in its dirty bitmap and resyncs later.
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "1GiB")]
    pub journal_capacity: u64,
    /// With --cache: NAME=PATH of a source disk's raw image (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH", value_parser = parse_pair)]
    pub disks: Vec<(String, String)>,
    /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
    #[arg(long)]
    pub insecure_loopback: bool,
}

#[derive(Args)]
pub(crate) struct PointArgs {
    pub vm: String,
    /// Mark the point app-consistent (the guest was quiesced).
    #[arg(long)]
    pub app_consistent: bool,
    /// Name the point; `--point NAME` picks it later (the newest, if names repeat).
    #[arg(long)]
    pub name: Option<String>,
    /// Run this (with sh -c) before an app-consistent marker, e.g. fsfreeze in the guest;
    /// if it fails, nothing is cut (and the thaw command still runs).
    #[arg(long, requires = "app_consistent")]
    pub quiesce_command: Option<String>,
    /// Run this after the marker: always, also when the quiesce command or the cut
    /// failed, so the guest is never left frozen.
    #[arg(long, requires = "app_consistent")]
    pub thaw_command: Option<String>,
    /// At the source site of a remote VM: write the marker through the running agent
    /// whose journal is DIR; the target cuts the point when the marker arrives.
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct PolicySetArgs {
    pub name: String,
    /// How often crash-consistent points are cut (at least 1s).
    #[arg(long, value_parser = parse_duration)]
    pub crash_interval: Option<Duration>,
    /// How often app-consistent points are expected, or `off`.
    #[arg(long, value_parser = parse_interval, value_name = "DURATION|off")]
    pub app_interval: Option<Interval>,
    /// Points older than this are pruned.
    #[arg(long, value_parser = parse_duration)]
    pub retention: Option<Duration>,
    /// Every write newer than this is kept: recover to any moment inside it.
    #[arg(long, value_parser = parse_duration)]
    pub any_moment_window: Option<Duration>,
    /// Points older than this are thinned to one per hour.
    #[arg(long, value_parser = parse_duration)]
    pub thin_after: Option<Duration>,
    /// Health turns critical once the RPO exceeds this.
    #[arg(long, value_parser = parse_duration)]
    pub rpo_threshold: Option<Duration>,
}
