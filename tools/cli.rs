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

// Parsed once per run: the size of its largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
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
        /// With --follow: serve Prometheus metrics of the vault's VMs on http://ADDR/metrics
        /// (e.g. 127.0.0.1:9100; see docs/metrics.md).
        #[arg(long, value_name = "ADDR", requires = "follow")]
        metrics: Option<String>,
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
        /// The protected VM whose point to serve.
        vm: String,
        /// The point to serve: latest, latest-processed, latest-app-consistent, an id, a
        /// name, seq:N or time:RFC3339 (as failover takes).
        #[arg(long, value_parser = parse_spec)]
        point: PointSpec,
        /// Address to serve NBD on (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1:10810", value_name = "ADDR")]
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
        /// The protected VM (omitted with --group).
        #[arg(default_value = "", hide_default_value = true)]
        vm: String,
        /// Print one JSON document (id, seq, time, kind, name, bytes, readable) for scripts.
        #[arg(long)]
        json: bool,
        /// List a consistency group's group points instead of a VM's points.
        #[arg(long, value_name = "G", conflicts_with = "vm")]
        group: Option<String>,
    },
    /// Replication state, health, RPO and backlog of every VM (or one).
    #[command(
        after_help = "Examples:\n  standby status web01 --json\n  standby status --check || echo 'not healthy'   # exit 0 healthy, 1 warning, 2 critical"
    )]
    Status {
        /// Only this VM (default: every VM of the vault).
        vm: Option<String>,
        /// Print one JSON document (every VM's state, health, reasons, RPO, backlog,
        /// points, disks) for scripts.
        #[arg(long)]
        json: bool,
        /// Exit status by the worst health shown: 0 healthy, 1 warning, 2 critical (the
        /// report is printed all the same).
        #[arg(long)]
        check: bool,
    },
    /// Fail a VM over: materialize its disks at a point in the target resource group.
    #[command(
        after_help = "POINT is latest, latest-processed, latest-app-consistent, a point id, a point's name\n(the newest point of that name; name:NAME for a name that looks like another form), seq:N\nor time:RFC3339 (inside the any-moment window; fractions of a second are kept).\n\nExamples:\n  standby failover web01 --point latest\n  standby failover web01 --point before-upgrade\n  standby failover web01 --point time:2026-11-26T09:30:00Z --out /srv/recovered/web01"
    )]
    Failover(FailoverArgs),
    /// End a failover: it becomes final and the VM's recovery points are deleted.
    FailoverCommit {
        /// The failed-over VM (omitted with --group).
        #[arg(default_value = "", hide_default_value = true)]
        vm: String,
        /// Every member of this consistency group.
        #[arg(long, value_name = "G", conflicts_with = "vm")]
        group: Option<String>,
    },
    /// Materialize a point into an isolated network while replication keeps running.
    #[command(
        after_help = "The disks and vm.json go to VAULT/test-failover/TARGET-RG/VM unless --out says otherwise.\n\nExample:\n  standby test-failover web01 --point latest-processed"
    )]
    TestFailover {
        #[command(flatten)]
        f: FailoverArgs,
        /// The isolated network (default: the target network with -test). vm.json maps every
        /// source network to it (by default each mapped network to its own -test twin).
        #[arg(long, value_name = "NET")]
        network: Option<String>,
    },
    /// Remove a test failover's disks.
    TestFailoverCleanup {
        /// The VM whose test failover to remove (omitted with --group).
        #[arg(default_value = "", hide_default_value = true)]
        vm: String,
        /// Every member of this consistency group.
        #[arg(long, value_name = "G", conflicts_with = "vm")]
        group: Option<String>,
    },
    /// Check every checksum of a VM's log and replica; exit 0 only if all is sound.
    #[command(after_help = "Example:\n  standby verify web01 --point latest-app-consistent")]
    Verify {
        /// The protected VM.
        vm: String,
        /// Only report damage this point reads.
        #[arg(long, value_parser = parse_spec)]
        point: Option<PointSpec>,
        /// Print one JSON document (`sound`, `damage[]`) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole flow on a throw-away vault: protect, write, process, fail over, verify.
    #[command(after_help = "Example:\n  standby demo --dir /tmp/standby-demo")]
    Demo {
        /// Where to create the demo vault and source disks (default: a new temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Not used by demo (it makes its own vault): refused.
        #[arg(long, hide = true, value_name = "VAULT")]
        vault: Option<PathBuf>,
    },
    /// Serve the dashboard and its JSON API over the vault (Ctrl-C or SIGTERM stop it).
    #[command(
        after_help = "Examples:\n  standby serve                                   # http://127.0.0.1:8080/\n  STANDBY_DASHBOARD_TOKEN=$(cat /etc/standby/dashboard-token) standby serve --listen 0.0.0.0:8443\n\nAn address other than loopback needs --token: every request then carries it\n(Authorization: Bearer TOKEN, or open /?token=TOKEN once to get a cookie). See docs/dashboard.md."
    )]
    Serve(ServeArgs),
    /// The byte ranges (64 KiB blocks) where two states of a VM differ, and their total.
    #[command(
        after_help = "A and B are anything failover accepts (a point id, a name, latest, seq:N, ...).\nRanges both states read from the same stored bytes are equal without a read; only the\nrest is hashed.\n\nExamples:\n  standby diff web01 3 latest\n  standby diff web01 before-upgrade latest-processed --json"
    )]
    Diff {
        /// The protected VM.
        vm: String,
        /// The first state: a point id, a name, latest, seq:N, time:T, ...
        #[arg(value_parser = parse_spec)]
        a: PointSpec,
        /// The second state, in the same forms.
        #[arg(value_parser = parse_spec)]
        b: PointSpec,
        /// Print the ranges and totals as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// End a VM's protection and free its name; its points stay readable until deleted.
    #[command(
        after_help = "Without --delete-points the points are kept under the name VM.unprotected-N, which\npoints, mount, failover and verify accept; `standby unprotect VM.unprotected-N\n--delete-points` deletes them. Refused while the VM's agent runs.\n\nExamples:\n  standby unprotect web01\n  standby unprotect web01 --delete-points"
    )]
    Unprotect {
        /// The protected VM (or VM.unprotected-N, to delete kept points).
        vm: String,
        /// Delete the VM's points and replication data too.
        #[arg(long)]
        delete_points: bool,
    },
    /// Reverse a failover: the failed-over disks become the VM's source, its original site
    /// the target, seeded from what that site still has; only differing blocks are shipped.
    #[command(
        after_help = "Afterwards `standby agent VM` serves the failed-over disks. Writes the old source took\nafter the failover point are reverted in the replica and counted. After a committed\nfailover the replica is seeded from the original images first.\n\nTwo sites (README, \"The way back\"): run it at the vault that will pull, naming the cache\nservice where the VM runs now; the agent there starts with --seeded and a new journal.\n\nExamples:\n  standby failover web01 --point latest && standby reprotect web01\n  standby failback web01 && standby reprotect web01      # back in the original direction\n  standby reprotect web01 --cache siteb:7000 --seed os=/srv/vm/web01-os.raw"
    )]
    Reprotect {
        /// The failed-over VM.
        vm: String,
        /// Print the report (shipped_bytes, compared_bytes per disk and in total) as JSON.
        #[arg(long)]
        json: bool,
        /// Two sites: the cache service at the site that becomes the VM's source (where
        /// it runs now); this vault becomes its target and pulls from it.
        #[arg(long, value_name = "ADDR")]
        cache: Option<String>,
        /// With --cache, for a VM this vault does not know (the first reprotect, at the
        /// original site): NAME=PATH of the image the disk ran on here (repeatable).
        #[arg(long = "seed", value_name = "NAME=PATH", value_parser = parse_pair, requires = "cache")]
        seed: Vec<(String, String)>,
        /// With --seed: the VM's policy in this vault.
        #[arg(long, requires = "seed")]
        policy: Option<String>,
        /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
        #[arg(long, requires = "cache")]
        insecure_loopback: bool,
    },
    /// The planned return: write a point into the VM's original images in place (only the
    /// blocks that differ); then `standby reprotect VM` protects it in the original direction.
    #[command(
        after_help = "Refused while the VM's agent runs. Everything pending is processed first; the default\npoint is latest, so nothing acknowledged is lost. A failback that was stopped is\nfinished by the next `standby failback VM`.\n\nExample:\n  standby failback web01 --point latest --json"
    )]
    Failback {
        /// The failed-over VM.
        vm: String,
        /// The point written into the original images (latest, an id, a name, seq:N, time:T).
        #[arg(long, value_parser = parse_spec, default_value = "latest")]
        point: PointSpec,
        /// Print the report (shipped_bytes, compared_bytes per disk and in total) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Consistency groups: VMs recovered together to one group point (docs/groups.md).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Add a disk to a protected VM or grow one; older points keep the disks they had.
    #[command(subcommand)]
    Disk(DiskCmd),
}

#[derive(Subcommand)]
pub(crate) enum DiskCmd {
    /// Add a disk: it joins the VM's consistency (one sequence across all its disks); only
    /// its allocated blocks are copied, then a point named `disk-add` is cut.
    #[command(
        after_help = "While the VM's embedded agent runs, it does the copy beside the VM's writes (which go\non); it serves the new disk once restarted. Points older than `disk-add` do not have\nthe disk: failover and mount of them give the disks they had.\n\nExamples:
  standby disk add web01 data=/images/web01-data.raw
  standby disk add web01 logs=new:10GiB          # an empty sparse image in the vault
  standby disk add web01 logs=new:10GiB:/images/web01-logs.raw --json"
    )]
    Add {
        /// The protected VM.
        vm: String,
        /// NAME=PATH of a raw image, NAME=new:SIZE (an empty sparse image at
        /// VAULT/sources/VM/NAME.raw) or NAME=new:SIZE:PATH.
        #[arg(value_name = "NAME=PATH|NAME=new:SIZE[:PATH]", value_parser = parse_disk)]
        disk: (String, DiskSource),
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a disk (shrinking is refused); nothing is copied. Older points keep their size.
    #[command(
        after_help = "The source image is grown to SIZE if it is smaller (`truncate -s` before is fine too).
Refused while the VM's agent runs: stop it, resize, start it again (it serves the new
size).

Example:
  standby disk resize web01 os 160MiB"
    )]
    Resize {
        /// The protected VM.
        vm: String,
        /// The disk's name.
        disk: String,
        /// The new size (512, 64MiB, 20GiB, ...): at least the current one.
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum GroupCmd {
    /// Create a group of VMs (each in no other group).
    #[command(after_help = "Example:\n  standby group create erp --vm web01 --vm db01")]
    Create {
        /// The group's name.
        name: String,
        /// A member VM (repeatable).
        #[arg(long = "vm", value_name = "VM", required = true)]
        vms: Vec<String>,
        /// The policy whose intervals cut group points on their own.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Add a VM to a group (from its next group point on).
    Add {
        /// The group.
        name: String,
        /// The VM that joins it.
        vm: String,
    },
    /// Take a VM out of a group (group points already cut keep its member point).
    Remove {
        /// The group.
        name: String,
        /// The VM that leaves it.
        vm: String,
    },
    /// Delete a group (its members and their own points stay).
    Delete {
        /// The group.
        name: String,
    },
    /// List the groups, their members and their last group point.
    List {
        /// Print one JSON document (groups, members, last group point) for scripts.
        #[arg(long)]
        json: bool,
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
        /// Directory of the VMs' change logs (created if missing; one service per directory).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Address agents and the target's processor connect to (HOST:PORT).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The credentials directory `standby link export` wrote at the target site.
        #[arg(long, value_name = "DIR")]
        creds: PathBuf,
        /// Plain TCP, refused anywhere but 127.0.0.0/8.
        #[arg(long)]
        insecure_loopback: bool,
        /// Limit each VM's log; when full, agents fall back to their dirty bitmaps.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        capacity: Option<u64>,
        /// Serve Prometheus metrics of the VMs' logs on http://ADDR/metrics (see
        /// docs/metrics.md).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Not used by the cache service (it has no vault): refused.
        #[arg(long, hide = true, value_name = "VAULT")]
        vault: Option<PathBuf>,
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
        /// The directory to write (it must not exist yet); copy it to the source site.
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
        /// Print one JSON document for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Make a VM follow another policy; cadence and retention apply from then on.
    #[command(after_help = "Example:\n  standby policy assign web01 gold")]
    Assign {
        /// The protected VM.
        vm: String,
        /// The policy's name (see `standby policy list`).
        policy: String,
    },
}

#[derive(Args)]
pub(crate) struct ProtectArgs {
    /// The VM's name in the vault (letters, digits, '-', '_', '.').
    pub vm: String,
    /// NAME=PATH of a raw image, or NAME=new:SIZE to create an empty sparse one at
    /// VAULT/sources/VM/NAME.raw, or NAME=new:SIZE:PATH to create it at PATH (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH|NAME=new:SIZE[:PATH]", required_unless_present_any = ["cache", "libvirt_domain"], value_parser = parse_disk)]
    pub disks: Vec<(String, DiskSource)>,
    /// The VM's source site is remote: its agent ships to the cache service at ADDR, which
    /// says what disks it has (start the agent first).
    #[arg(long, value_name = "ADDR", conflicts_with = "disks")]
    pub cache: Option<String>,
    /// With --cache: plain TCP to a cache service on 127.0.0.0/8 (no TLS).
    #[arg(long, requires = "cache")]
    pub insecure_loopback: bool,
    /// The replication policy (`standby policy list`; default: `default`).
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// The VM's resource group at the source (default: `default`); the target's
    /// defaults to RG-asr.
    #[arg(long, value_name = "RG")]
    pub resource_group: Option<String>,
    /// The VM's virtual network at the source (default: `default-net`); the target's
    /// defaults to NET-asr, or what --network-mapping maps it to.
    #[arg(long, value_name = "NET")]
    pub network: Option<String>,
    /// The VM's subnet at the source (default: `default`); the target keeps it.
    #[arg(long, value_name = "SUBNET")]
    pub subnet: Option<String>,
    /// The VM's availability set at the source, if any; the target's defaults to SET-asr.
    #[arg(long, value_name = "SET")]
    pub availability_set: Option<String>,
    /// The resource group failover puts the VM in (default: RG-asr).
    #[arg(long, value_name = "RG")]
    pub target_resource_group: Option<String>,
    /// The network failover attaches the VM to (default: NET-asr or the mapping's).
    #[arg(long, value_name = "NET")]
    pub target_network: Option<String>,
    /// The subnet failover attaches the VM to (default: the source subnet).
    #[arg(long, value_name = "SUBNET")]
    pub target_subnet: Option<String>,
    /// The availability set failover puts the VM in (default: SET-asr).
    #[arg(long, value_name = "SET")]
    pub target_availability_set: Option<String>,
    /// SRC=DST source network to target network (repeatable).
    #[arg(long, value_name = "SRC=DST", value_parser = parse_pair)]
    pub network_mapping: Vec<(String, String)>,
    /// Limit the VM's change log (e.g. 4GiB); when it is full the agent tracks writes in a
    /// dirty bitmap and resyncs them later. Default: no limit.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub cache_capacity: Option<u64>,
    /// Take the disks from a libvirt domain's XML (`virsh dumpxml VM > FILE`): every
    /// file-backed raw disk, named after its target dev; prints the <disk> elements that
    /// route them through the agent, for `virsh edit`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["disks", "cache"])]
    pub libvirt_domain: Option<PathBuf>,
    /// With --libvirt-domain: where the agent will serve NBD, for the printed <disk>
    /// elements (as `standby agent --listen`).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:10809",
        requires = "libvirt_domain"
    )]
    pub agent_listen: String,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to serve HTTP on; one other than loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// Require this token on every request (also read from $STANDBY_DASHBOARD_TOKEN).
    #[arg(
        long,
        env = "STANDBY_DASHBOARD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// How often the server samples every VM's status for the RPO chart and the events.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub sample_every: Duration,
    /// Also serve Prometheus metrics of the vault's VMs on http://ADDR/metrics, without
    /// the token (they are on the dashboard's own /metrics too; see docs/metrics.md).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(Args)]
pub(crate) struct FailoverArgs {
    /// The protected VM.
    #[arg(default_value = "", hide_default_value = true)]
    pub vm: String,
    /// Fail over every member of this consistency group to one group point (POINT is then
    /// latest-group, latest-group-app-consistent, a group point id or time:RFC3339).
    #[arg(long, value_name = "G", conflicts_with = "vm")]
    pub group: Option<String>,
    /// latest, latest-processed, latest-app-consistent, an id, a name (the newest point of
    /// that name), seq:N or time:RFC3339.
    #[arg(long, value_parser = parse_spec)]
    pub point: PointSpec,
    /// Output directory (default: VAULT/failover/TARGET-RG/VM; for test-failover
    /// VAULT/test-failover/TARGET-RG/VM).
    #[arg(long, value_name = "DIR")]
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
    /// The VM to serve (protected in the vault; with --cache, its name at the source site).
    pub vm: String,
    /// Address to serve NBD on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
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
    /// Serve Prometheus metrics (the VM's status and its write latency) on
    /// http://ADDR/metrics (e.g. 127.0.0.1:9100; see docs/metrics.md).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// With --cache, after a two-site `standby reprotect VM --cache ADDR`: the first run
    /// (a new --journal) takes the target's block hashes from the cache service and
    /// ships only the blocks that differ.
    #[arg(long, requires = "cache")]
    pub seeded: bool,
}

#[derive(Args)]
pub(crate) struct PointArgs {
    /// The protected VM.
    #[arg(default_value = "", hide_default_value = true)]
    pub vm: String,
    /// Cut one group point across every member of this consistency group (the hooks run
    /// once per member, with STANDBY_VM set to it).
    #[arg(long, value_name = "G", conflicts_with_all = ["vm", "journal"])]
    pub group: Option<String>,
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
    /// The policy's name (created if new).
    pub name: String,
    /// How often crash-consistent points are cut (at least 1s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub crash_interval: Option<Duration>,
    /// How often app-consistent points are expected, or `off`.
    #[arg(long, value_parser = parse_interval, value_name = "DURATION|off")]
    pub app_interval: Option<Interval>,
    /// Points older than this are pruned.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub retention: Option<Duration>,
    /// Every write newer than this is kept: recover to any moment inside it.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub any_moment_window: Option<Duration>,
    /// Points older than this are thinned to one per hour.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub thin_after: Option<Duration>,
    /// Health turns critical once the RPO exceeds this.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub rpo_threshold: Option<Duration>,
}
