//! Model test of the replica: a seeded random driver applies writes, zero ranges and
//! markers, cuts points, flushes, prunes, and crashes (process crash, power cut with a torn
//! tail, power cut at the Nth sync in the middle of an operation), reopening each time and
//! redoing what the change log would still hold. After every step it checks the replica
//! against a plain model (a `Vec<u8>` per disk, a `BTreeMap` of points): every retained
//! point and sampled sequence numbers of the any-moment window read bit-exact, pruned
//! points are gone. Failing seeds found here stay below as named regression tests.

// `is_multiple_of` is newer than the workspace's minimum Rust version.
#![allow(clippy::manual_is_multiple_of)]

use standby_engine::policy::Policy;
use standby_engine::record::{Consistency, Marker, Op, Record};
use standby_engine::replica::{DiskSpec, PointKind, Replica, ReplicaConfig};
use standby_engine::vfs::{SimFs, Vfs};
use standby_engine::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const DIR: &str = "/vault/replica/vm";
const SEC_US: u64 = 1_000_000;
const T0: u64 = 1_700_000_000 * SEC_US;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug, PartialEq)]
struct MPoint {
    seq: u64,
    time_us: u64,
    kind: PointKind,
}

struct Model {
    sizes: Vec<u64>,
    /// Every record generated, `log[i].seq == i + 1`: what the change log holds.
    log: Vec<Record>,
    /// Disk states at some seqs (every 32nd and every point's), for replay.
    snaps: BTreeMap<u64, Vec<Vec<u8>>>,
    cur: Vec<Vec<u8>>,
    points: BTreeMap<u64, MPoint>,
    pruned: BTreeSet<u64>,
    /// Everything up to here was made durable by a successful flush, cut or prune.
    durable: u64,
    last_prune_now: Option<u64>,
    clock: u64,
}

impl Model {
    fn applied(&self) -> u64 {
        self.log.len() as u64
    }

    fn apply_op(disks: &mut [Vec<u8>], op: &Op) {
        match op {
            Op::Write { disk, offset, data } => {
                let d = &mut disks[*disk as usize];
                d[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Op::Zero {
                disk, offset, len, ..
            } => {
                disks[*disk as usize][*offset as usize..(*offset + *len) as usize].fill(0);
            }
            Op::Marker(_) => {}
        }
    }

    fn push(&mut self, op: Op, time_step_us: u64) -> Record {
        self.clock += time_step_us;
        let rec = Record {
            seq: self.applied() + 1,
            time_us: self.clock,
            op,
        };
        Self::apply_op(&mut self.cur, &rec.op);
        self.log.push(rec.clone());
        if rec.seq % 32 == 0 {
            self.snaps.insert(rec.seq, self.cur.clone());
        }
        rec
    }

    fn state_at(&self, seq: u64) -> Vec<Vec<u8>> {
        if seq == self.applied() {
            return self.cur.clone();
        }
        let (mut at, mut disks) = match self.snaps.range(..=seq).next_back() {
            Some((s, d)) => (*s, d.clone()),
            None => (
                0,
                self.sizes.iter().map(|s| vec![0u8; *s as usize]).collect(),
            ),
        };
        while at < seq {
            Self::apply_op(&mut disks, &self.log[at as usize].op);
            at += 1;
        }
        disks
    }

    fn time_of(&self, seq: u64) -> u64 {
        if seq == 0 {
            0
        } else {
            self.log[seq as usize - 1].time_us
        }
    }

    /// An independent statement of the policy: prune past retention; past thin_after keep
    /// one point per clock hour (its newest app-consistent one, else its newest); never the
    /// newest point (which also counts as its hour's newest).
    fn plan(&self, policy: &Policy, now: u64) -> BTreeSet<u64> {
        let retention = policy.retention.as_micros() as u64;
        let thin = policy.thin_after.as_micros() as u64;
        let newest = *self.points.keys().next_back().unwrap_or(&0);
        let mut out = BTreeSet::new();
        let mut hours: BTreeMap<u64, Vec<(u64, &MPoint)>> = BTreeMap::new();
        for (id, p) in &self.points {
            let age = now.saturating_sub(p.time_us);
            if age > retention {
                out.insert(*id);
            } else if age > thin {
                hours
                    .entry(p.time_us / 3_600_000_000)
                    .or_default()
                    .push((*id, p));
            }
        }
        for (_, ps) in hours {
            let keep = ps
                .iter()
                .rev()
                .find(|(_, p)| p.kind == PointKind::AppConsistent)
                .or(ps.last())
                .map(|(id, _)| *id);
            for (id, _) in &ps {
                if Some(*id) != keep {
                    out.insert(*id);
                }
            }
        }
        out.remove(&newest);
        out
    }
}

fn policy() -> Policy {
    Policy {
        crash_interval: Duration::from_secs(60),
        app_interval: None,
        retention: Duration::from_secs(8 * 3600),
        thin_after: Duration::from_secs(2 * 3600),
        any_moment_window: Duration::from_secs(1800),
        rpo_threshold: Duration::from_secs(600),
    }
}

fn config(rng: &mut Rng) -> ReplicaConfig {
    ReplicaConfig {
        data_file_max_bytes: 16 << 10 << rng.below(4),
        compress: rng.chance(70),
    }
}

fn read_all(view: &standby_engine::replica::View, disk: u16, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    view.read(disk, 0, &mut buf).unwrap();
    buf
}

/// What a run exercised, so a run that stopped exercising something fails.
#[derive(Default, Debug)]
struct Coverage {
    reopens: u64,
    torn_tails: u64,
    interrupted_prunes: u64,
    interrupted_cuts: u64,
    pruned_points: u64,
    rewritten_layers: u64,
    punched_ranges: u64,
    healed_on_open: u64,
    window_views: u64,
}

struct Harness {
    cov: Coverage,
    rng: Rng,
    fs: SimFs,
    replica: Option<Replica>,
    m: Model,
    step: usize,
    seed: u64,
}

/// The operation that was running when the power was cut.
#[derive(Clone, Copy, PartialEq, Debug)]
enum InFlight {
    None,
    Cut(u64),
    Prune(u64),
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let fs = SimFs::new();
        let sizes = vec![64 << 10, 24 << 10];
        let disks: Vec<DiskSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| DiskSpec {
                name: format!("disk{i}"),
                size_bytes: *s,
            })
            .collect();
        let cfg = config(&mut rng);
        let replica = Replica::create(Arc::new(fs.clone()), DIR, &disks, cfg).unwrap();
        let cur: Vec<Vec<u8>> = sizes.iter().map(|s| vec![0u8; *s as usize]).collect();
        Harness {
            cov: Coverage::default(),
            rng,
            fs,
            replica: Some(replica),
            m: Model {
                sizes,
                log: Vec::new(),
                snaps: BTreeMap::new(),
                cur,
                points: BTreeMap::new(),
                pruned: BTreeSet::new(),
                durable: 0,
                last_prune_now: None,
                clock: T0,
            },
            step: 0,
            seed,
        }
    }

    fn r(&mut self) -> &mut Replica {
        self.replica.as_mut().unwrap()
    }

    fn random_op(&mut self) -> Op {
        let rng = &mut self.rng;
        let disk = rng.below(2) as u16;
        let size = self.m.sizes[disk as usize];
        let sectors = size / 512;
        let start = rng.below(sectors);
        let n = 1 + rng.below((sectors - start).min(16));
        if rng.chance(80) {
            let mut data = vec![0u8; (n * 512) as usize];
            if rng.chance(50) {
                data.iter_mut().for_each(|b| *b = rng.next() as u8);
            } else {
                let v = rng.next() as u8;
                data.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = v.wrapping_add((i / 64) as u8));
            }
            Op::Write {
                disk,
                offset: start * 512,
                data,
            }
        } else {
            Op::Zero {
                disk,
                offset: start * 512,
                len: n * 512,
                trim: rng.chance(50),
            }
        }
    }

    fn time_step(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=89 => SEC_US * (1 + self.rng.below(30)),
            90..=97 => SEC_US * 60 * (1 + self.rng.below(20)),
            _ => SEC_US * 3600 * (1 + self.rng.below(2)),
        }
    }

    /// Apply a record; if it is a marker, cut its point. Model updated on success.
    fn apply_and_cut(&mut self, rec: &Record) -> Result<(), Error> {
        let applied = self.r().apply(rec)?;
        if let standby_engine::replica::Applied::Marker(m) = applied {
            let p = self.r().cut_marker_point(&m)?;
            assert_eq!(p.seq, rec.seq);
            self.m.points.insert(
                p.id,
                MPoint {
                    seq: p.seq,
                    time_us: rec.time_us,
                    kind: p.kind,
                },
            );
            self.m.snaps.insert(p.seq, self.m.state_at(p.seq));
            self.m.durable = self.m.durable.max(p.seq);
        }
        Ok(())
    }

    /// One random mutating step. Returns what was in flight if it failed.
    fn mutate(&mut self) -> Result<(), (Error, InFlight)> {
        let roll = self.rng.below(100);
        if std::env::var("MODEL_TRACE").is_ok() {
            eprintln!(
                "step {} roll {roll} applied {} syncs {}",
                self.step,
                self.m.applied(),
                self.fs.sync_count()
            );
        }
        match roll {
            0..=59 => {
                let op = self.random_op();
                let t = self.time_step();
                let rec = self.m.push(op, t);
                self.apply_and_cut(&rec).map_err(|e| (e, InFlight::None))
            }
            60..=62 => {
                // Beyond the end of a disk: refused, never applied.
                let disk = self.rng.below(2) as u16;
                let size = self.m.sizes[disk as usize];
                let rec = Record {
                    seq: self.m.applied() + 1,
                    time_us: self.m.clock,
                    op: Op::Write {
                        disk,
                        offset: size - 512 * self.rng.below(2),
                        data: vec![1u8; 1024],
                    },
                };
                match self.r().apply(&rec) {
                    Err(Error::Invalid(_)) => Ok(()),
                    other => panic!("write past the end: {other:?}"),
                }
            }
            63..=72 => {
                let consistency = if self.rng.chance(40) {
                    Consistency::App
                } else {
                    Consistency::Crash
                };
                let name = self.rng.chance(30).then(|| format!("p{}", self.step));
                let t = self.time_step();
                let rec = self.m.push(
                    Op::Marker(Marker {
                        consistency,
                        name,
                        group: None,
                        kind: standby_engine::record::MarkerKind::Point,
                    }),
                    t,
                );
                self.apply_and_cut(&rec).map_err(|e| (e, InFlight::None))
            }
            73..=75 => {
                if !self.r().changed_since_last_point() {
                    return Ok(());
                }
                let seq = self.r().applied_seq();
                let id = self.r().points().last().map_or(1, |p| p.id + 1);
                match self
                    .r()
                    .cut_point(PointKind::CrashConsistent, Some("manual"))
                {
                    Ok(p) => {
                        assert_eq!((p.id, p.seq), (id, seq));
                        self.m.points.insert(
                            p.id,
                            MPoint {
                                seq,
                                time_us: self.m.time_of(seq),
                                kind: p.kind,
                            },
                        );
                        self.m.snaps.insert(seq, self.m.state_at(seq));
                        self.m.durable = self.m.durable.max(seq);
                        Ok(())
                    }
                    Err(e) => Err((e, InFlight::Cut(id))),
                }
            }
            76..=83 => match self.r().flush() {
                Ok(seq) => {
                    assert_eq!(seq, self.m.applied());
                    self.m.durable = seq;
                    Ok(())
                }
                Err(e) => Err((e, InFlight::None)),
            },
            _ => {
                let now = self.m.clock + SEC_US * self.rng.below(600);
                self.prune(now).map_err(|e| (e, InFlight::Prune(now)))
            }
        }
    }

    fn prune(&mut self, now: u64) -> Result<(), Error> {
        let plan = self.m.plan(&policy(), now);
        let report = self.r().prune(&policy(), now)?;
        self.cov.rewritten_layers += report.rewritten_layers as u64;
        self.cov.punched_ranges += report.punched_ranges as u64;
        self.cov.pruned_points += report.pruned_points.len() as u64;
        let got: BTreeSet<u64> = report.pruned_points.iter().copied().collect();
        assert_eq!(
            got,
            plan,
            "prune at {now}: points {:?}",
            self.m
                .points
                .iter()
                .map(|(id, p)| (
                    id,
                    (now - p.time_us) / SEC_US,
                    p.time_us / 3_600_000_000,
                    p.kind
                ))
                .collect::<Vec<_>>()
        );
        self.settle_prune(plan, now);
        Ok(())
    }

    fn settle_prune(&mut self, plan: BTreeSet<u64>, now: u64) {
        for id in plan {
            self.m.points.remove(&id);
            self.m.pruned.insert(id);
        }
        // Coalescing follows the latest `now` any prune saw.
        self.m.last_prune_now = Some(self.m.last_prune_now.map_or(now, |n| n.max(now)));
    }

    fn reopen(&mut self, fs: SimFs, in_flight: InFlight) {
        self.replica = None;
        self.fs = fs;
        let cfg = config(&mut self.rng);
        let (r, report) = Replica::open(Arc::new(self.fs.clone()), DIR, cfg)
            .unwrap_or_else(|e| panic!("seed {} step {}: reopen: {e}", self.seed, self.step));
        self.cov.reopens += 1;
        if std::env::var("MODEL_TRACE").is_ok() {
            eprintln!("step {} reopen {in_flight:?}: {report:?}", self.step);
        }
        self.cov.torn_tails += report.truncated.is_some() as u64;
        self.cov.healed_on_open += (report.punched_ranges > 0) as u64;
        match in_flight {
            InFlight::Prune(_) => self.cov.interrupted_prunes += 1,
            InFlight::Cut(_) => self.cov.interrupted_cuts += 1,
            InFlight::None => {}
        }
        self.replica = Some(r);
        let a = self.r().applied_seq();
        assert!(
            a >= self.m.durable && a <= self.m.applied(),
            "applied {a} outside [{}, {}]",
            self.m.durable,
            self.m.applied()
        );
        let have: BTreeMap<u64, u64> = self.r().points().iter().map(|p| (p.id, p.seq)).collect();
        match in_flight {
            InFlight::Cut(id) => {
                if let Some(seq) = have.get(&id) {
                    let seq = *seq;
                    self.m.points.insert(
                        id,
                        MPoint {
                            seq,
                            time_us: self.m.time_of(seq),
                            kind: PointKind::CrashConsistent,
                        },
                    );
                    self.m.snaps.insert(seq, self.m.state_at(seq));
                }
            }
            InFlight::Prune(now) => {
                // Whether the swap happened or not, pruning again converges.
                let plan = self.m.plan(&policy(), now);
                self.r().prune(&policy(), now).unwrap();
                self.settle_prune(plan, now);
            }
            InFlight::None => {}
        }
        // Redo what the change log still holds beyond what survived.
        let a = self.r().applied_seq();
        let redo: Vec<Record> = self.m.log[a as usize..].to_vec();
        for rec in redo {
            self.apply_and_cut(&rec).unwrap();
        }
        let d = self.r().flush().unwrap();
        assert_eq!(d, self.m.applied());
        self.m.durable = d;
    }

    fn crash(&mut self) {
        let kind = self.rng.below(3);
        if std::env::var("MODEL_TRACE").is_ok() {
            eprintln!("step {} crash kind {kind}", self.step);
        }
        match kind {
            0 => {
                let fs = self.fs.process_crash();
                self.reopen(fs, InFlight::None);
            }
            1 => {
                let torn = self.rng.below(6000) as usize;
                let fs = self.fs.crash(torn);
                self.reopen(fs, InFlight::None);
            }
            _ => {
                self.fs.fail_at_sync(1 + self.rng.below(8));
                let mut in_flight = InFlight::None;
                for _ in 0..50 {
                    if let Err((_, f)) = self.mutate() {
                        in_flight = f;
                        break;
                    }
                }
                let torn = self.rng.below(6000) as usize;
                let fs = self.fs.crash(torn);
                // Records the driver generated while the power was failing are still in
                // the log; their durability is whatever survived.
                self.m.durable = self.m.durable.min(self.m.applied());
                self.reopen(fs, in_flight);
            }
        }
    }

    fn check(&mut self) {
        let seed = self.seed;
        let step = self.step;
        let r = self.replica.as_ref().unwrap();
        let got: Vec<(u64, u64, u64)> = r
            .points()
            .iter()
            .map(|p| (p.id, p.seq, p.time_us))
            .collect();
        let want: Vec<(u64, u64, u64)> = self
            .m
            .points
            .iter()
            .map(|(id, p)| (*id, p.seq, p.time_us))
            .collect();
        assert_eq!(got, want, "seed {seed} step {step}: points");
        assert_eq!(r.applied_seq(), self.m.applied(), "seed {seed} step {step}");
        let sizes = self.m.sizes.clone();
        let compare = |what: &str, view: &standby_engine::replica::View, seq: u64| {
            let want = self.m.state_at(seq);
            for (d, size) in sizes.iter().enumerate() {
                let got = read_all(view, d as u16, *size);
                if got != want[d] {
                    let first = got.iter().zip(&want[d]).position(|(a, b)| a != b).unwrap();
                    let writers: Vec<(u64, bool)> = self
                        .m
                        .log
                        .iter()
                        .filter(|r| r.seq <= seq)
                        .filter_map(|r| match &r.op {
                            Op::Write { disk, offset, data }
                                if *disk as usize == d
                                    && (*offset..*offset + data.len() as u64)
                                        .contains(&(first as u64)) =>
                            {
                                Some((r.seq, true))
                            }
                            Op::Zero {
                                disk, offset, len, ..
                            } if *disk as usize == d
                                && (*offset..*offset + *len).contains(&(first as u64)) =>
                            {
                                Some((r.seq, false))
                            }
                            _ => None,
                        })
                        .collect();
                    panic!(
                        "seed {seed} step {step}: {what} seq {seq} disk {d} differs at byte {first}: got {:?} want {:?}; writers {:?}; points {:?}",
                        &got[first..first + 8],
                        &want[d][first..first + 8],
                        writers,
                        self.m.points
                    );
                }
            }
        };
        // Every retained point (all of them every 8th step, else the newest two and one
        // at random).
        let ids: Vec<u64> = self.m.points.keys().copied().collect();
        let all = step % 8 == 0;
        for (i, id) in ids.iter().enumerate() {
            let pick = all || i + 2 >= ids.len() || self.rng.chance(15);
            if pick {
                let v = r.view_point(*id).unwrap();
                compare("point", &v, self.m.points[id].seq);
            }
        }
        for id in self.m.pruned.iter().rev().take(3) {
            assert!(
                matches!(r.view_point(*id), Err(Error::NotFound(_))),
                "seed {seed} step {step}: pruned point {id} still readable"
            );
        }
        compare("latest", &r.view_latest().unwrap(), self.m.applied());
        // Sampled seqs: those inside the window must be viewable; any viewable one exact.
        let window_start = self.m.last_prune_now.map_or(0, |n| {
            n.saturating_sub(policy().any_moment_window.as_micros() as u64)
        });
        for _ in 0..3 {
            let seq = self.rng.below(self.m.applied() + 1);
            let in_window = self.m.time_of(seq) >= window_start && seq > 0;
            match r.view_seq(seq) {
                Ok(v) => {
                    compare("seq", &v, seq);
                    self.cov.window_views += 1;
                    // The same moment by wall-clock time (record times strictly increase).
                    if seq > 0 {
                        let v = r.view_time(self.m.time_of(seq)).unwrap_or_else(|e| {
                            panic!(
                                "seed {seed} step {step}: time view of seq {seq}: {e}; points {:?} ranges {:?}",
                                r.points().iter().map(|p| (p.id, p.seq, p.time_us)).collect::<Vec<_>>(),
                                r.viewable_ranges()
                            )
                        });
                        compare("time", &v, seq);
                    }
                }
                Err(e) => assert!(
                    !in_window,
                    "seed {seed} step {step}: seq {seq} in the window but not viewable: {e}"
                ),
            }
        }
        if step % 50 == 0 {
            let report = r.verify().unwrap();
            assert!(report.is_clean(), "seed {seed} step {step}: {report:?}");
            // Materialize one point into a file and compare.
            if let Some((id, p)) = self.m.points.iter().next_back() {
                let out = Path::new(DIR).join(format!("m{step}.raw"));
                let v = r.view_point(*id).unwrap();
                v.materialize(1, &out).unwrap();
                let f = self.fs.open(&out).unwrap();
                let mut buf = vec![0u8; sizes[1] as usize];
                f.read_full_at(&mut buf, 0).unwrap();
                assert_eq!(buf, self.m.state_at(p.seq)[1], "seed {seed} step {step}");
                self.fs.remove(&out).unwrap();
            }
        }
    }
}

fn run(seed: u64, steps: usize) -> Coverage {
    let mut h = Harness::new(seed);
    for step in 0..steps {
        h.step = step;
        if h.rng.chance(4) {
            h.crash();
        } else if let Err((e, _)) = h.mutate() {
            panic!("seed {seed} step {step}: {e}");
        }
        h.check();
    }
    h.cov
}

#[test]
fn model_random_seeds() {
    let seeds: u64 = std::env::var("MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let steps: usize = std::env::var("MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let base: u64 = std::env::var("MODEL_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut total = Coverage::default();
    for seed in base..base + seeds {
        let c = run(seed, steps);
        total.reopens += c.reopens;
        total.torn_tails += c.torn_tails;
        total.interrupted_prunes += c.interrupted_prunes;
        total.interrupted_cuts += c.interrupted_cuts;
        total.pruned_points += c.pruned_points;
        total.rewritten_layers += c.rewritten_layers;
        total.punched_ranges += c.punched_ranges;
        total.healed_on_open += c.healed_on_open;
        total.window_views += c.window_views;
    }
    eprintln!("model coverage: {total:?}");
    let c = &total;
    for (what, n) in [
        ("reopens", c.reopens),
        ("torn tails", c.torn_tails),
        ("interrupted prunes", c.interrupted_prunes),
        ("pruned points", c.pruned_points),
        ("rewritten layers", c.rewritten_layers),
        ("punched ranges", c.punched_ranges),
        ("window views", c.window_views),
    ] {
        assert!(n > 0, "the model run never exercised {what}");
    }
}

/// Seed 1 once failed at step ~120: `durable_seq` counted frames that were written but not
/// yet synced, so a power cut lost records the change log had been told it could trim.
#[test]
fn regression_seed_1_durable_seq_counted_unsynced_frames() {
    run(1, 200);
}

/// Seed 4 once failed at step 1409: with data files rotated without a sync, a power cut
/// kept frames of the new file while the old file lost its unsynced tail (ending cleanly
/// at a frame boundary), so the scan stitched a gap into the open layer. Each data file
/// now records where the previous one ended, and the scan stops at such a gap.
#[test]
fn regression_seed_4_later_file_survived_an_earlier_files_lost_tail() {
    run(4, 1410);
}

#[test]
fn durable_seq_counts_only_synced_frames() {
    let fs = SimFs::new();
    let disks = [DiskSpec {
        name: "os".into(),
        size_bytes: 1 << 20,
    }];
    let mut r =
        Replica::create(Arc::new(fs.clone()), DIR, &disks, ReplicaConfig::default()).unwrap();
    for seq in 1..=3 {
        r.apply(&Record {
            seq,
            time_us: seq,
            op: Op::Write {
                disk: 0,
                offset: seq * 4096,
                data: vec![seq as u8; 4096],
            },
        })
        .unwrap();
    }
    assert_eq!((r.applied_seq(), r.durable_seq()), (3, 0));
    let lost = fs.crash(0);
    let (r2, _) = Replica::open(Arc::new(lost), DIR, ReplicaConfig::default()).unwrap();
    assert_eq!(r2.applied_seq(), 0);
    assert_eq!(r.flush().unwrap(), 3);
    let kept = fs.crash(0);
    let (r3, _) = Replica::open(Arc::new(kept), DIR, ReplicaConfig::default()).unwrap();
    assert_eq!((r3.applied_seq(), r3.durable_seq()), (3, 3));
}
