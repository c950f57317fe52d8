//! `standby`: the command-line face of the Standby engine. It parses arguments, calls the
//! engine, and prints tables (or one JSON document with `--json`); errors become one line
//! on stderr and exit status 1 (2 for usage errors). Nothing here touches vault files
//! directly.

/// Every line the CLI prints to stdout goes through [`output::line`]: this shadows std's
/// `println!` for the whole crate (the modules below included), so a closed pipe
/// (`standby status | head -1`) ends the command quietly instead of panicking.
macro_rules! println {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod agent;
mod demo;
mod output;
mod owner;
mod progress;
mod remote;

use clap::{Args, Parser, Subcommand};
use output::bytes;
use standby_engine::record::Consistency;
use standby_engine::vault::{
    DiskSource, LockWait, PlacementOverrides, PointSpec, ProtectRequest, Vault,
};
use standby_engine::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
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
struct Cli {
    /// The vault directory (default: $STANDBY_VAULT; set but empty counts as unset).
    #[arg(long, value_name = "VAULT", global = true)]
    vault: Option<PathBuf>,
    /// How long a command waits for a VM or vault another process holds before it gives
    /// up naming the holder (`forever` waits for good). Commands that a running agent or
    /// follower can answer (point, points, status, verify, test-failover, mount) go
    /// through it instead and do not wait.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_wait, value_name = "DURATION")]
    wait: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    Agent {
        vm: String,
        /// Address to serve NBD on (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// How often the log is processed into the replica.
        #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
        process_every: Duration,
        /// Ship to the cache service at ADDR (source site) instead of a local vault.
        #[arg(long, value_name = "ADDR", requires_all = ["creds", "journal"])]
        cache: Option<String>,
        /// With --cache: the source site's credentials (`standby link export`).
        #[arg(long, value_name = "DIR")]
        creds: Option<PathBuf>,
        /// With --cache: the agent's journal directory (every write is kept here until
        /// the cache service has it durable).
        #[arg(long, value_name = "DIR")]
        journal: Option<PathBuf>,
        /// With --cache: limit the journal; once full (link down long enough) the agent
        /// tracks writes in its dirty bitmap and resyncs later.
        #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "1GiB")]
        journal_capacity: u64,
        /// With --cache: NAME=PATH of a source disk's raw image (repeatable).
        #[arg(long = "disk", value_name = "NAME=PATH", value_parser = parse_pair)]
        disks: Vec<(String, String)>,
        /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
        #[arg(long)]
        insecure_loopback: bool,
    },
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
    Point {
        vm: String,
        /// Mark the point app-consistent (the guest was quiesced).
        #[arg(long)]
        app_consistent: bool,
        /// Name the point; `--point NAME` picks it later (the newest, if names repeat).
        #[arg(long)]
        name: Option<String>,
        /// Run this (with sh -c) before an app-consistent marker, e.g. fsfreeze in the guest;
        /// if it fails, nothing is cut (and the thaw command still runs).
        #[arg(long, requires = "app_consistent")]
        quiesce_command: Option<String>,
        /// Run this after the marker: always, also when the quiesce command or the cut
        /// failed, so the guest is never left frozen.
        #[arg(long, requires = "app_consistent")]
        thaw_command: Option<String>,
        /// At the source site of a remote VM: write the marker through the running agent
        /// whose journal is DIR; the target cuts the point when the marker arrives.
        #[arg(long, value_name = "DIR")]
        journal: Option<PathBuf>,
    },
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
enum CacheCmd {
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
enum LinkCmd {
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
enum PolicyCmd {
    /// Create or change a policy; unset options keep their current (or default) value.
    #[command(
        after_help = "Example:\n  standby policy set gold --crash-interval 1m --app-interval off --retention 72h"
    )]
    Set {
        name: String,
        /// How often crash-consistent points are cut (at least 1s).
        #[arg(long, value_parser = parse_duration)]
        crash_interval: Option<Duration>,
        /// How often app-consistent points are expected, or `off`.
        #[arg(long, value_parser = parse_interval, value_name = "DURATION|off")]
        app_interval: Option<Interval>,
        /// Points older than this are pruned.
        #[arg(long, value_parser = parse_duration)]
        retention: Option<Duration>,
        /// Every write newer than this is kept: recover to any moment inside it.
        #[arg(long, value_parser = parse_duration)]
        any_moment_window: Option<Duration>,
        /// Points older than this are thinned to one per hour.
        #[arg(long, value_parser = parse_duration)]
        thin_after: Option<Duration>,
        /// Health turns critical once the RPO exceeds this.
        #[arg(long, value_parser = parse_duration)]
        rpo_threshold: Option<Duration>,
    },
    /// List policies.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ProtectArgs {
    vm: String,
    /// NAME=PATH of a raw image, or NAME=new:SIZE to create an empty sparse one at
    /// VAULT/sources/VM/NAME.raw, or NAME=new:SIZE:PATH to create it at PATH (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH|NAME=new:SIZE[:PATH]", required_unless_present = "cache", value_parser = parse_disk)]
    disks: Vec<(String, DiskSource)>,
    /// The VM's source site is remote: its agent ships to the cache service at ADDR, which
    /// says what disks it has (start the agent first).
    #[arg(long, value_name = "ADDR", conflicts_with = "disks")]
    cache: Option<String>,
    /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
    #[arg(long, requires = "cache")]
    insecure_loopback: bool,
    #[arg(long)]
    policy: Option<String>,
    #[arg(long)]
    resource_group: Option<String>,
    #[arg(long)]
    network: Option<String>,
    #[arg(long)]
    subnet: Option<String>,
    #[arg(long)]
    availability_set: Option<String>,
    #[arg(long)]
    target_resource_group: Option<String>,
    #[arg(long)]
    target_network: Option<String>,
    #[arg(long)]
    target_subnet: Option<String>,
    #[arg(long)]
    target_availability_set: Option<String>,
    /// SRC=DST source network to target network (repeatable).
    #[arg(long, value_name = "SRC=DST", value_parser = parse_pair)]
    network_mapping: Vec<(String, String)>,
    /// Limit the VM's change log (e.g. 4GiB); when it is full the agent tracks writes in a
    /// dirty bitmap and resyncs them later. Default: no limit.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    cache_capacity: Option<u64>,
}

#[derive(Args)]
struct FailoverArgs {
    vm: String,
    /// latest, latest-processed, latest-app-consistent, an id, a name (the newest point of
    /// that name), seq:N or time:RFC3339.
    #[arg(long, value_parser = parse_spec)]
    point: PointSpec,
    /// Output directory (default: VAULT/failover/TARGET-RG/VM).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report (point, disks with their sha256, placement) as one JSON document.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30s, 5m, 1h, 2d: {e}"))
}

/// A duration or `off`. Its own type because clap's derive reads `Option<Option<T>>` as
/// "a flag with an optional value" and would then ask for a bare `T`.
#[derive(Clone, Copy, Debug)]
struct Interval(Option<Duration>);

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
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// Open the vault; a command that finds a lock busy says who holds it, then waits.
fn open_vault(path: &Path, who: &str) -> Result<Vault, Error> {
    let wait = WAIT.get().copied().unwrap_or(Duration::from_secs(60));
    let mut v = Vault::open(path, who, LockWait::Until(wait))?;
    v.on_wait(Box::new(|holder| {
        eprintln!("standby: waiting for the lock, held by {holder}")
    }));
    Ok(v)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("standby: {}", output::one_line(&e));
            ExitCode::from(1)
        }
    }
}

static VAULT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
static WAIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

fn wait() -> Duration {
    WAIT.get().copied().unwrap_or(Duration::from_secs(60))
}

/// The vault this command works on.
fn vault() -> Result<PathBuf, Error> {
    // Read here rather than by clap, which refuses a set-but-empty variable as a missing
    // value of --vault.
    let from_env = || {
        std::env::var_os("STANDBY_VAULT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    VAULT
        .get()
        .cloned()
        .flatten()
        .or_else(from_env)
        .ok_or_else(|| {
            Error::Invalid("no vault given: pass --vault VAULT or set STANDBY_VAULT".into())
        })
}

fn who(what: &str) -> String {
    format!("standby {what}")
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    let _ = VAULT.set(cli.vault.clone());
    let _ = WAIT.set(cli.wait);
    match cli.command {
        Command::Init { vault } => {
            Vault::init(&vault)?;
            println!("created vault {}", vault.display());
            println!(
                "next: export STANDBY_VAULT={} and `standby protect VM --disk NAME=PATH`",
                vault.display()
            );
        }
        Command::Policy(PolicyCmd::Set {
            name,
            crash_interval,
            app_interval,
            retention,
            any_moment_window,
            thin_after,
            rpo_threshold,
        }) => {
            let mut vault = open_vault(&vault()?, &who("policy set"))?;
            let mut p = vault.catalog().policy(&name).unwrap_or_default();
            if let Some(d) = crash_interval {
                p.crash_interval = d;
            }
            if let Some(Interval(d)) = app_interval {
                p.app_interval = d;
            }
            if let Some(d) = retention {
                p.retention = d;
            }
            if let Some(d) = any_moment_window {
                p.any_moment_window = d;
            }
            if let Some(d) = thin_after {
                p.thin_after = d;
            }
            if let Some(d) = rpo_threshold {
                p.rpo_threshold = d;
            }
            vault.set_policy(&name, &p)?;
            println!("policy {name}: {}", output::policy_line(&p));
        }
        Command::Policy(PolicyCmd::List { json }) => {
            let vault = open_vault(&vault()?, &who("policy list"))?;
            output::policies(vault.catalog(), json);
        }
        Command::Protect(a) => protect(a)?,
        Command::Process {
            vm,
            follow,
            every,
            cache,
        } => return process(&vault()?, vm, follow, every, cache),
        Command::Cache(CacheCmd::Serve {
            dir,
            listen,
            creds,
            insecure_loopback,
            capacity,
        }) => remote::serve(remote::ServeOptions {
            dir,
            listen,
            creds,
            insecure_loopback,
            capacity,
        })?,
        Command::Link(LinkCmd::Export { out }) => {
            let vault = open_vault(&vault()?, &who("link export"))?;
            vault.link_export(&out)?;
            println!(
                "wrote the source site's credentials to {} (keep them secret: they hold keys)",
                out.display()
            );
            println!(
                "source site: standby cache serve --dir DIR --listen ADDR --creds {}",
                out.display()
            );
        }
        Command::Link(LinkCmd::Init) => {
            let vault = open_vault(&vault()?, &who("link init"))?;
            vault.link_init()?;
            println!("created the link credentials of {}", vault.root().display());
        }
        Command::Mount {
            vm,
            point,
            listen,
            writable,
        } => {
            let req = standby_engine::runtime::control::Request::Mount {
                point: point.clone(),
                listen: listen.clone(),
                writable,
            };
            owner::run(
                &vault()?,
                &who(&format!("mount {vm}")),
                &vm,
                &req,
                wait(),
                |v| mount(v, &vm, point.clone(), &listen, writable),
                |reply, session| mounted_through_owner(&vm, reply, session, writable),
            )?;
        }
        Command::Agent {
            vm,
            listen,
            cache: Some(cache),
            creds,
            journal,
            journal_capacity,
            disks,
            insecure_loopback,
            ..
        } => remote::agent(remote::AgentOptions {
            vm,
            cache,
            creds: creds.unwrap_or_default(),
            insecure_loopback,
            journal: journal.unwrap_or_default(),
            journal_capacity: Some(journal_capacity),
            disks: disks
                .into_iter()
                .map(|(n, p)| (n, PathBuf::from(p)))
                .collect(),
            listen,
        })?,
        Command::Agent {
            vm,
            listen,
            process_every,
            ..
        } => {
            agent::run(
                &vault()?,
                &vm,
                agent::Options {
                    listen,
                    process_every,
                },
            )?;
        }
        Command::Point {
            vm,
            app_consistent,
            name,
            quiesce_command,
            thaw_command,
            journal: Some(journal),
        } => {
            let hooked = with_hooks(
                quiesce_command.as_deref(),
                thaw_command.as_deref(),
                || remote::marker(&journal, &vm, app_consistent, name.as_deref()),
                |seq| format!("wrote the marker for {vm} at seq {seq}"),
            );
            let seq = match hooked {
                Ok(seq) => seq,
                Err(line) => {
                    eprintln!("standby: {line}");
                    return Ok(ExitCode::from(1));
                }
            };
            println!(
                "wrote {} marker for {vm} at seq {seq}; the target cuts the point when it arrives",
                if app_consistent {
                    "an app-consistent"
                } else {
                    "a crash-consistent"
                }
            );
        }
        Command::Point {
            vm,
            app_consistent,
            name,
            quiesce_command,
            thaw_command,
            journal: None,
        } => {
            Vault::open(&vault()?, &who("point"), LockWait::Fail)?
                .catalog()
                .vm(&vm)?;
            let root = vault()?;
            let hooked = with_hooks(
                quiesce_command.as_deref(),
                thaw_command.as_deref(),
                || cut_point(&root, &vm, app_consistent, name.as_deref()),
                |p| format!("cut point {} of {vm} at seq {}", p["id"], p["seq"]),
            );
            let p = match hooked {
                Ok(p) => p,
                Err(line) => {
                    eprintln!("standby: {line}");
                    return Ok(ExitCode::from(1));
                }
            };
            println!(
                "cut point {} of {vm} at seq {} ({}, {})",
                p["id"],
                p["seq"],
                p["kind"].as_str().unwrap_or(""),
                p["time"].as_str().unwrap_or("")
            );
        }
        Command::Points { vm, json } => {
            use standby_engine::runtime::control::{Reply, Request};
            let (points, damage) = owner::run(
                &vault()?,
                &who("points"),
                &vm,
                &Request::Points,
                wait(),
                |v| v.points_report(&vm),
                |reply, _| match reply {
                    Reply::Points { points, damage } => Ok((points, damage)),
                    other => Err(owner::unexpected(&other)),
                },
            )?;
            output::points(&vm, &points, &damage, json);
        }
        Command::Status { vm, json } => {
            use standby_engine::runtime::control::{Reply, Request};
            let root = vault()?;
            let vault = open_vault(&root, &who("status"))?;
            let names: Vec<String> = match vm {
                Some(n) => {
                    vault.catalog().vm(&n)?;
                    vec![n]
                }
                None => vault.catalog().vms.keys().cloned().collect(),
            };
            let mut docs = Vec::new();
            for n in &names {
                if vault.catalog().vm(n)?.remote.is_some() {
                    // A remote VM's status reads what its follower publishes: no waiting.
                    docs.push(output::status_json(&vault.status(n)?));
                    continue;
                }
                let doc = owner::run(
                    &root,
                    &who("status"),
                    n,
                    &Request::Status,
                    wait(),
                    |v| v.status(n).map(|st| output::status_json(&st)),
                    |reply, _| match reply {
                        Reply::Status {
                            status,
                            owner_pid,
                            resync_bytes,
                        } => {
                            let st: standby_engine::vault::VmStatus =
                                serde_json::from_value(status).map_err(|e| {
                                    Error::Conflict(format!("malformed status from the agent: {e}"))
                                })?;
                            let mut v = output::status_json(&st);
                            v["agent_pid"] = serde_json::json!(owner_pid);
                            v["resync_bytes"] = serde_json::json!(resync_bytes);
                            Ok(v)
                        }
                        other => Err(owner::unexpected(&other)),
                    },
                )?;
                docs.push(doc);
            }
            output::status_docs(&docs, json);
        }
        Command::Failover(f) => failover(f, false, None)?,
        Command::TestFailover { f, network } => failover(f, true, network)?,
        Command::FailoverCommit { vm } => {
            let mut vault = open_vault(&vault()?, &who("failover-commit"))?;
            vault.failover_commit(&vm)?;
            println!("failover of {vm} committed; its recovery points are deleted");
        }
        Command::TestFailoverCleanup { vm } => {
            let mut vault = open_vault(&vault()?, &who("test-failover-cleanup"))?;
            let dir = vault.test_failover_cleanup(&vm)?;
            println!("removed the test failover of {vm} ({})", dir.display());
        }
        Command::Verify { vm, point, json } => {
            use standby_engine::runtime::control::{Reply, Request};
            let (report, p) = owner::run(
                &vault()?,
                &who("verify"),
                &vm,
                &Request::Verify {
                    point: point.clone(),
                },
                wait(),
                |v| v.verify(&vm, point.clone()),
                |reply, _| match reply {
                    Reply::Verify { report, point } => Ok((report, point)),
                    other => Err(owner::unexpected(&other)),
                },
            )?;
            let clean = report.is_clean();
            output::verify(&vm, &report, p.as_ref(), json);
            if !clean {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Demo { dir } => demo::run(dir)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn mount(
    vault: &Vault,
    vm: &str,
    spec: PointSpec,
    listen: &str,
    writable: bool,
) -> Result<(), Error> {
    use standby_engine::mount::MountDisk;
    use standby_engine::nbd::{BlockDevice, ExportList, Server, ServerConfig};
    let m = vault.mount(vm, spec)?;
    let mut exports: Vec<(String, std::sync::Arc<dyn BlockDevice>)> = Vec::new();
    for (i, name) in m.disks.iter().enumerate() {
        let dev = if writable {
            let scratch = m
                .scratch
                .join(format!("mount-{}-{name}.overlay", std::process::id()));
            MountDisk::writable(m.view.clone(), i as u16, &scratch)?
        } else {
            MountDisk::read_only(m.view.clone(), i as u16)?
        };
        exports.push((name.clone(), std::sync::Arc::new(dev)));
    }
    let stop = agent::stop_flag()?;
    let mut server = Server::start(
        listen,
        std::sync::Arc::new(ExportList(exports)),
        ServerConfig::default(),
    )
    .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
    let addr = server.local_addr();
    let what = match m.view.point() {
        Some(p) => format!(
            "point {} ({}, seq {}, {})",
            p.id,
            output::kind(p.kind),
            p.seq,
            output::rfc3339(p.time_us)
        ),
        None => format!(
            "seq {} ({})",
            m.view.seq(),
            output::rfc3339(m.view.time_us())
        ),
    };
    println!(
        "mounted {vm} at {what}, {} on {addr} (pid {})",
        if writable {
            "writable (throw-away overlay)"
        } else {
            "read-only"
        },
        std::process::id()
    );
    for name in &m.disks {
        println!("  nbd://{addr}/{name}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop();
    eprintln!("standby: mount of {vm} stopped");
    Ok(())
}

/// A mount served by the VM's owner (its agent or follower): print where, and keep the
/// session open until Ctrl-C (the owner stops serving when this command goes).
fn mounted_through_owner(
    vm: &str,
    reply: standby_engine::runtime::control::Reply,
    session: standby_engine::runtime::control::Session,
    writable: bool,
) -> Result<(), Error> {
    use standby_engine::runtime::control::Reply;
    let Reply::Mounted {
        addr,
        disks,
        point,
        seq,
        time_us,
    } = reply
    else {
        return Err(owner::unexpected(&reply));
    };
    let stop = agent::stop_flag()?;
    let what = match point {
        Some(p) => format!(
            "point {} ({}, seq {}, {})",
            p.id,
            output::kind(p.kind),
            p.seq,
            output::rfc3339(p.time_us)
        ),
        None => format!("seq {seq} ({})", output::rfc3339(time_us)),
    };
    println!(
        "mounted {vm} at {what}, {} on {addr} (served by the VM's running agent; this command keeps it up)",
        if writable {
            "writable (throw-away overlay)"
        } else {
            "read-only"
        },
    );
    for name in &disks {
        println!("  nbd://{addr}/{name}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    session.wait(&stop);
    eprintln!("standby: mount of {vm} stopped");
    Ok(())
}

/// Cut a point through the VM's running owner if there is one, else directly.
fn cut_point(
    root: &Path,
    vm: &str,
    app: bool,
    name: Option<&str>,
) -> Result<serde_json::Value, Error> {
    use standby_engine::runtime::control::{Reply, Request};
    let req = Request::Point {
        app,
        name: name.map(str::to_string),
    };
    let c = if app {
        Consistency::App
    } else {
        Consistency::Crash
    };
    let p = owner::run(
        root,
        &who("point"),
        vm,
        &req,
        wait(),
        |v| v.cut_point(vm, c, name),
        |reply, _| match reply {
            Reply::Point { point: Some(p), .. } => Ok(p),
            other => Err(owner::unexpected(&other)),
        },
    )?;
    Ok(output::point_json(&p, None))
}

/// Run an operator's hook with `sh -c`; the error is what to tell the operator.
fn run_hook(what: &str, cmd: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| format!("the {what} command could not be started ({e}): {cmd}"))?;
    if !status.success() {
        return Err(format!("the {what} command failed ({status}): {cmd}"));
    }
    Ok(())
}

/// Cut between the quiesce and the thaw hook. Once quiesce was attempted the thaw hook
/// always runs — after a failed quiesce (nothing is cut then: the guest may not be
/// consistent) and after a failed cut too — so a guest is never left frozen. The error is
/// one line that says what happened to each step; `done` describes a cut that worked
/// when only the thaw failed.
fn with_hooks<T>(
    quiesce: Option<&str>,
    thaw: Option<&str>,
    cut: impl FnOnce() -> Result<T, Error>,
    done: impl FnOnce(&T) -> String,
) -> Result<T, String> {
    let cut = match quiesce.map(|c| run_hook("quiesce", c)) {
        Some(Err(q)) => Err(format!("{q}; nothing was cut")),
        _ => cut().map_err(|e| output::one_line(&e)),
    };
    let thawed = thaw.map(|c| run_hook("thaw", c));
    match (cut, thawed) {
        (Ok(v), None | Some(Ok(()))) => Ok(v),
        (Ok(v), Some(Err(t))) => Err(format!("{}, but {t}", done(&v))),
        (Err(e), None) => Err(e),
        (Err(e), Some(Ok(()))) => Err(format!("{e}; the thaw command ran and succeeded")),
        (Err(e), Some(Err(t))) => Err(format!("{e}; {t} too")),
    }
}

fn protect(a: ProtectArgs) -> Result<(), Error> {
    let mut vault = open_vault(&vault()?, &who("protect"))?;
    let cache = a.cache.clone();
    let insecure = a.insecure_loopback;
    let req = ProtectRequest {
        vm: a.vm.clone(),
        disks: a.disks.into_iter().map(|(n, s)| (n, Some(s))).collect(),
        policy: a.policy,
        source: PlacementOverrides {
            resource_group: a.resource_group,
            network: a.network,
            subnet: a.subnet,
            availability_set: a.availability_set,
        },
        target: PlacementOverrides {
            resource_group: a.target_resource_group,
            network: a.target_network,
            subnet: a.target_subnet,
            availability_set: a.target_availability_set,
        },
        network_mapping: a.network_mapping,
        cache_capacity_bytes: a.cache_capacity,
    };
    if let Some(addr) = cache {
        let disks = vault.protect_remote(&req, &addr, insecure)?;
        let list: Vec<String> = disks
            .iter()
            .map(|d| format!("{} ({})", d.name, bytes(d.size_bytes)))
            .collect();
        println!(
            "protected {} from the cache service at {addr}: {}",
            a.vm,
            list.join(", ")
        );
        println!("next: standby process --cache {addr} --follow   (pulls and processes; the agent's first run is the initial replication)");
        return Ok(());
    }
    let mut bar = progress::Bar::new();
    let r = vault.protect(&req, &mut bar)?;
    let rec = vault.catalog().vm(&a.vm)?;
    println!(
        "protected {}: {} disk(s), shipped {} of {} allocated (holes and zero runs skipped); initial point {} at seq {}",
        a.vm,
        rec.disks.len(),
        bytes(r.shipped_bytes),
        bytes(r.scanned_bytes),
        r.initial_point.id,
        r.initial_point.seq
    );
    for (name, path) in &r.created {
        println!(
            "created disk {name}: {} (an empty sparse image; attach it to the VM)",
            path.display()
        );
    }
    println!(
        "target: resource group {}, network {}, subnet {}{}",
        rec.target.resource_group,
        rec.target.network,
        rec.target.subnet,
        rec.target
            .availability_set
            .as_ref()
            .map(|s| format!(", availability set {s}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn process(
    path: &Path,
    vm: Option<String>,
    follow: bool,
    every: Duration,
    cache: Option<String>,
) -> Result<ExitCode, Error> {
    use std::sync::atomic::Ordering;
    let stop = if follow {
        agent::stop_flag()?
    } else {
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
    };
    // Remote VMs, followed each on its own thread (started as they get protected).
    let mut followers: std::collections::HashMap<String, std::thread::JoinHandle<()>> =
        std::collections::HashMap::new();
    let wanted = |rec: &standby_engine::vault::VmRecord| {
        vm.as_ref().is_none_or(|n| n == &rec.name)
            && match (&cache, &rec.remote) {
                (Some(c), Some(r)) => &r.cache == c,
                (Some(_), None) => false,
                _ => true,
            }
    };
    let mut failed = false;
    let mut errors: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        {
            let mut vault = open_vault(
                path,
                &who(if follow {
                    "process --follow"
                } else {
                    "process"
                }),
            )?;
            if let Some(n) = &vm {
                vault.catalog().vm(n)?;
            }
            if follow {
                for n in vault.remote_vms() {
                    let rec = vault.catalog().vm(&n)?.clone();
                    if !wanted(&rec) || followers.get(&n).is_some_and(|t| !t.is_finished()) {
                        continue;
                    }
                    let (root, stop, name) = (path.to_path_buf(), stop.clone(), n.clone());
                    let who = who("process --follow");
                    println!(
                        "{n}: following the cache service at {}",
                        rec.remote.as_ref().map(|r| r.cache.as_str()).unwrap_or("")
                    );
                    followers.insert(
                        n,
                        std::thread::spawn(move || {
                            if let Err(e) = standby_engine::runtime::follow(
                                &root,
                                &who,
                                &name,
                                every,
                                &stop,
                                agent::events(),
                            ) {
                                eprintln!("standby: {name}: {}", output::one_line(&e));
                            }
                        }),
                    );
                }
            }
            let names: Vec<String> = match &vm {
                Some(n) => vec![n.clone()],
                None => vault.processable_vms(),
            };
            for n in names {
                let rec = vault.catalog().vm(&n)?.clone();
                if !wanted(&rec) || (follow && rec.remote.is_some()) {
                    continue;
                }
                if vm.is_none() || follow {
                    if let Err(Error::Locked(holder)) = vault.try_lock_vm(&n).map(drop) {
                        if !follow {
                            println!("{n}: processed by {holder}");
                        }
                        continue;
                    }
                }
                let r = match vault.process(&n) {
                    Ok(r) => r,
                    Err(e) if vm.is_none() => {
                        // One VM's failure (a damaged replica, say) leaves the others be;
                        // --follow says it again only when it changes.
                        let line = output::one_line(&e);
                        if errors.get(&n) != Some(&line) {
                            eprintln!("standby: {n}: {line}");
                        }
                        errors.insert(n.clone(), line);
                        failed = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                errors.remove(&n);
                if !follow
                    || r.applied > 0
                    || !r.points.is_empty()
                    || !r.prune.pruned_points.is_empty()
                {
                    println!(
                        "{n}: applied {} records ({}), {} new point(s), {} pruned, durable to seq {}",
                        r.applied,
                        bytes(r.applied_bytes),
                        r.points.len(),
                        r.prune.pruned_points.len(),
                        r.durable_seq
                    );
                }
            }
        }
        if !follow {
            return Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        let until = std::time::Instant::now() + every;
        while std::time::Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::SeqCst) {
            for (_, t) in followers {
                let _ = t.join();
            }
            eprintln!("standby: stopped");
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn failover(f: FailoverArgs, test: bool, network: Option<String>) -> Result<(), Error> {
    use standby_engine::runtime::control::{Reply, Request};
    let what = if test { "test-failover" } else { "failover" };
    let r = if test {
        // A test failover runs beside replication: through the VM's owner if it runs.
        let req = Request::TestFailover {
            point: f.point.clone(),
            out: f
                .out
                .as_ref()
                .map(|o| std::path::absolute(o).unwrap_or_else(|_| o.clone())),
            network: network.clone(),
        };
        owner::run(
            &vault()?,
            &who(what),
            &f.vm,
            &req,
            wait(),
            |v| {
                let mut bar = progress::Bar::new();
                v.failover(
                    &f.vm,
                    f.point.clone(),
                    f.out.as_deref(),
                    true,
                    network.as_deref(),
                    &mut bar,
                )
            },
            |reply, _| match reply {
                Reply::TestFailover { report } => Ok(report),
                other => Err(owner::unexpected(&other)),
            },
        )?
    } else {
        let mut vault = open_vault(&vault()?, &who(what))?;
        let mut bar = progress::Bar::new();
        vault.failover(&f.vm, f.point, f.out.as_deref(), false, None, &mut bar)?
    };
    if f.json {
        output::print_json(&serde_json::to_value(&r).unwrap_or_default());
    } else {
        output::failover(&r);
    }
    Ok(())
}
