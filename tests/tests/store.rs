//! The node store and offline autonomy, with the real edge-rt binary:
//! power cuts during heavy writes, a reboot with no cloud, a week offline,
//! a full disk and a corrupt file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Read};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edge_rt::store::{Class, Kind, Report, Store, StoreConfig};
use outrigger_tests::util::*;

/// What `edge-rt store churn` printed, i.e. what it had committed.
#[derive(Default)]
struct Model {
    /// (kind, uid) -> (put?, rv) of the last printed change.
    objects: HashMap<(String, String), (bool, u64)>,
    max_rv: u64,
    /// Printed outbox rows not acked: seq -> (class, key).
    out: BTreeMap<i64, (String, String)>,
    acked: BTreeSet<i64>,
    /// About to be acked when the process died: may be gone or not.
    acking: BTreeSet<i64>,
    /// The newest sequence number seen per (class, key).
    newest: HashMap<(String, String), i64>,
}

impl Model {
    fn feed(&mut self, line: &str) -> Result<()> {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["ready", _] => {}
            [op @ ("put" | "del"), kind, uid, rv] => {
                let rv: u64 = rv.parse()?;
                self.objects
                    .insert((kind.to_string(), uid.to_string()), (*op == "put", rv));
                self.max_rv = self.max_rv.max(rv);
            }
            ["ack?", seq, _, _] => {
                self.acking.insert(seq.parse()?);
            }
            ["out", seq, class, key] | ["ack", seq, class, key] => {
                let seq: i64 = seq.parse()?;
                let ck = (class.to_string(), key.to_string());
                let n = self.newest.entry(ck.clone()).or_insert(seq);
                *n = (*n).max(seq);
                if f[0] == "out" {
                    self.out.insert(seq, ck);
                } else {
                    self.out.remove(&seq);
                    self.acked.insert(seq);
                }
            }
            _ => bail!("unexpected line {line:?}"),
        }
        Ok(())
    }

    /// Everything committed is there, consistent, and acks took effect.
    fn check(&mut self, store: &Store) -> Result<()> {
        let problems = store.integrity_check()?;
        ensure!(problems.is_empty(), "integrity_check: {problems:?}");
        let stats = store.stats()?;
        let mut have: HashMap<(String, String), u64> = HashMap::new();
        for kind in Kind::ALL {
            let objects = store.objects(kind)?;
            ensure!(
                objects.len() as u64 == stats.objects.get(kind.as_str()).copied().unwrap_or(0),
                "a stored {} does not read back",
                kind.as_str()
            );
            for o in objects {
                let rv: u64 = o.resource_version.parse()?;
                ensure!(
                    o.body["metadata"]["resourceVersion"] == o.resource_version.as_str()
                        && o.body["data"]["rv"] == o.resource_version.as_str(),
                    "{} {} row and body disagree",
                    kind.as_str(),
                    o.uid
                );
                have.insert((kind.as_str().to_string(), o.uid), rv);
            }
        }
        let cursor = Kind::ALL
            .iter()
            .filter_map(|k| store.cursor(*k).ok().flatten())
            .filter_map(|c| c.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        ensure!(
            cursor >= self.max_rv,
            "cursor {cursor} behind committed {}",
            self.max_rv
        );
        // Commits a process made but did not live to print all have
        // versions above everything printed; nothing else may differ.
        let printed = self.max_rv;
        for ((kind, uid), (put, rv)) in &self.objects {
            match (put, have.get(&(kind.clone(), uid.clone()))) {
                (true, Some(n)) if n == rv || *n > printed => {}
                (true, Some(n)) => bail!("{kind} {uid} committed at {rv} is at {n}"),
                (true, None) if cursor > printed => {}
                (true, None) => bail!("committed {kind} {uid} at {rv} is lost"),
                (false, Some(n)) if *n > printed => {}
                (false, Some(n)) => bail!("{kind} {uid} deleted at {rv} is back at {n}"),
                (false, None) => {}
            }
        }
        for ((kind, uid), n) in &have {
            let known = self.objects.contains_key(&(kind.clone(), uid.clone()));
            ensure!(
                known || *n > printed,
                "{kind} {uid} at {n} was never committed"
            );
        }
        // The store is the truth from here on.
        for (k, v) in self.objects.iter_mut() {
            *v = match have.get(k) {
                Some(n) => (true, *n),
                None => (false, v.1),
            };
        }
        for (k, n) in have {
            self.objects.entry(k).or_insert((true, n));
        }
        self.max_rv = cursor;
        let rows: BTreeMap<i64, (String, String)> = store
            .pending(0, usize::MAX >> 1)?
            .into_iter()
            .map(|r| {
                let class = if r.class == Class::Event {
                    "event"
                } else {
                    "status"
                };
                (r.seq, (class.to_string(), r.key))
            })
            .collect();
        let mut newest_in_db: HashMap<&(String, String), i64> = HashMap::new();
        for (seq, ck) in &rows {
            newest_in_db.insert(ck, *seq);
        }
        for seq in &self.acked {
            ensure!(
                !rows.contains_key(seq),
                "acked outbox row {seq} is still there"
            );
        }
        for (seq, ck) in &self.out {
            let replaced = self.newest.get(ck).is_some_and(|n| n > seq)
                || newest_in_db.get(ck).is_some_and(|n| n > seq);
            ensure!(
                rows.contains_key(seq) || replaced || self.acking.contains(seq),
                "unacked outbox row {seq} {ck:?} is gone"
            );
        }
        // Rows replaced or acked for good need no more checking.
        self.out.retain(|seq, _| rows.contains_key(seq));
        self.acking.clear();
        Ok(())
    }
}

/// The crash test: `edge-rt store churn` (object batches with cursors,
/// status and event churn, acks) killed with SIGKILL at a random instant,
/// then the store reopened as a restarted edge-rt opens it and checked.
/// 200 kills (about 40 s); `OUTRIGGER_CRASH_ITERATIONS=N` for more or
/// fewer (CI keeps the default).
#[test]
fn sigkill_during_heavy_writes_loses_nothing_committed() -> Result<()> {
    let iterations: u64 = std::env::var("OUTRIGGER_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[node]\ndata_dir = {:?}\n", dir.path()))?;
    let mut model = Model::default();
    let mut rng = edge_rt::store::churn::Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let mut lines_total = 0usize;
    for i in 0..iterations {
        let mut child = std::process::Command::new(edge_rt_bin())
            .arg("--config")
            .arg(&config)
            .args(["store", "churn", "--seed", &(i + 1).to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut first = String::new();
        out.read_line(&mut first)?;
        ensure!(first.starts_with("ready"), "churn did not start: {first:?}");
        // Kill at a random instant 20-300 ms into the load.
        std::thread::sleep(Duration::from_millis(20 + rng.below(280)));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        child.wait()?;
        let mut rest = String::new();
        out.read_to_string(&mut rest)?;
        // A line cut by the kill (no newline) was never fully printed.
        let complete = match rest.rfind('\n') {
            Some(n) => &rest[..n],
            None => "",
        };
        for line in complete.lines() {
            model.feed(line)?;
            lines_total += 1;
        }
        let store = Store::open(&StoreConfig::default(), dir.path())?;
        model
            .check(&store)
            .with_context(|| format!("after kill {} of {iterations}", i + 1))?;
    }
    ensure!(
        lines_total > iterations as usize * 10,
        "the load hardly ran ({lines_total} commits printed)"
    );
    eprintln!("{iterations} kills, {lines_total} commits checked");
    Ok(())
}

/// A week offline: 50 pods' status every 5 minutes, 20 events per tick
/// from crash loops, no acks. The outbox holds one status per pod and the
/// newest `events_max` events, and the file stops growing after the first
/// day.
#[test]
fn a_week_offline_keeps_the_outbox_bounded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = StoreConfig {
        events_max: 2000,
        ..Default::default()
    };
    let store = Store::open(&cfg, dir.path())?;
    let start = 1_700_000_000_000i64;
    let tick = 5 * 60 * 1000;
    let ticks_per_day = 24 * 12;
    let mut size_day2 = 0;
    let mut event = 0u64;
    for t in 0..7 * ticks_per_day {
        let now = start + t as i64 * tick;
        let mut reports: Vec<Report> = (0..50)
            .map(|p| Report {
                class: Class::Status,
                key: format!("pod/p{p}"),
                body: serde_json::json!({"restartCount": t, "pad": "x".repeat(300)}),
            })
            .collect();
        for _ in 0..20 {
            event += 1;
            reports.push(Report {
                class: Class::Event,
                key: format!("event/{event}"),
                body: serde_json::json!({"reason": "BackOff", "message": "x".repeat(200)}),
            });
        }
        store.report(&reports, now)?;
        if t == 2 * ticks_per_day {
            size_day2 = store.stats()?.file_bytes;
        }
    }
    let s = store.stats()?;
    assert_eq!(s.outbox_status, 50);
    assert_eq!(s.outbox_events, 2000);
    assert_eq!(s.events_dropped, event - 2000);
    // The newest events are the ones kept: all from the last day.
    let end = start + (7 * ticks_per_day - 1) as i64 * tick;
    let oldest = s.oldest_unsent_ms.context("rows")?;
    assert!(end - oldest < 24 * 3600 * 1000, "oldest {oldest} end {end}");
    // Freed pages are reused: five more days add (almost) nothing.
    assert!(
        s.file_bytes <= size_day2 + 64 * 1024,
        "store grew from {size_day2} to {}",
        s.file_bytes
    );
    assert!(s.file_bytes < 8 << 20, "{} bytes", s.file_bytes);
    Ok(())
}

fn apply(node: &Node, yaml: &str) -> Result<std::process::Output> {
    let f = node.dir.path().join("apply.yaml");
    std::fs::write(&f, yaml)?;
    node.cli(&["apply", "-f", f.to_str().context("path")?])
}

const CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: app-config}
data: {greeting: hello-offline}
---
apiVersion: v1
kind: Secret
metadata: {name: app-secret}
stringData: {token: s3cr3t-token}
";

fn app_pod(name: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'echo started; sleep 3600']
    env:
    - name: TOKEN
      valueFrom: {{secretKeyRef: {{name: app-secret, key: token}}}}
    volumeMounts: [{{name: cfg, mountPath: /etc/app}}]
  volumes:
  - name: cfg
    configMap: {{name: app-config}}
"
    )
}

async fn exec_out(node: &Node, pod: &str, script: &str) -> Result<String> {
    let o = node.cli(&["exec", pod, "--", "sh", "-c", script])?;
    ensure!(
        o.status.success(),
        "exec in {pod}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(text(&o).trim().to_string())
}

/// What a power cut does to a node: edge-rt and every container die at
/// once, and the tmpfs state directory and every mount are gone.
fn power_cut(node: &Node, daemon: Daemon) {
    let mut daemon = daemon;
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    for r in node.records() {
        if let Some(pid) = r.pid.filter(|_| r.exit.is_none()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    unmount_under(node.dir.path());
    let _ = std::fs::remove_dir_all(&node.state);
}

#[tokio::test]
async fn after_a_power_cut_every_pod_runs_again_with_no_cloud() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    // An image on the node whose registry is gone (a closed port): with
    // the default policy of `:latest` (Always) it must still run offline.
    let o = node.cli(&[
        "images",
        "import",
        node.dir
            .path()
            .join("preload/busybox.tar")
            .to_str()
            .context("path")?,
        "--name",
        "127.0.0.1:9/offline/busybox:latest",
    ])?;
    ensure!(
        o.status.success(),
        "import: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let daemon = node.start().await?;
    let names = ["app-a", "app-b", "app-c"];
    let yaml = format!(
        "{CONFIG}{}---
apiVersion: v1
kind: Pod
metadata: {{name: cached}}
spec:
  containers: [{{name: main, image: '127.0.0.1:9/offline/busybox:latest', command: [sleep, '3600']}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: missing}}
spec:
  containers: [{{name: main, image: '127.0.0.1:9/offline/missing:1', command: [sleep, '3600']}}]
",
        names.iter().map(|n| app_pod(n)).collect::<String>()
    );
    let o = apply(&node, &yaml)?;
    ensure!(
        o.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(text(&o).contains("pod/app-a created"), "{}", text(&o));
    for n in names {
        wait_pod(&node, n, "Running", |p| phase(p) == "Running").await?;
    }
    // A second apply of the same objects changes nothing.
    let o = apply(&node, &yaml)?;
    ensure!(text(&o).contains("pod/app-b unchanged"), "{}", text(&o));
    let uid_before = node
        .pods()?
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("app-a"))
        .and_then(|p| p.metadata.uid.clone());

    power_cut(&node, daemon);
    let daemon = node.start().await?;
    for n in names {
        let p = wait_pod(&node, n, "Running after the cut", |p| phase(p) == "Running").await?;
        if n == "app-a" {
            ensure!(
                p.metadata.uid == uid_before,
                "the pod came back as another pod"
            );
        }
        ensure!(exec_out(&node, n, "cat /etc/app/greeting").await? == "hello-offline");
        ensure!(exec_out(&node, n, "echo $TOKEN").await? == "s3cr3t-token");
    }
    wait_pod(&node, "cached", "the cached image running", |p| {
        phase(p) == "Running"
    })
    .await?;
    let d = text(&node.cli(&["describe", "pod", "cached"])?);
    ensure!(d.contains("RegistryUnreachable"), "{d}");
    // An image the node does not have waits for a registry.
    wait_pod(&node, "missing", "ImagePullBackOff", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .is_some_and(|r| r == "ImagePullBackOff" || r == "ErrImagePull")
    })
    .await?;
    // The status of the pods went to the outbox, for the cloud to read.
    wait_for(
        "pod status in the outbox",
        Duration::from_secs(10),
        || async {
            let o = node.cli(&["store", "stats", "-o", "json"]).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["outbox_status"].as_u64()? >= 6).then_some(())
        },
    )
    .await?;
    // The secret is sealed on disk, and shown redacted by default.
    let dump = text(&node.cli(&["store", "dump", "secrets"])?);
    ensure!(
        dump.contains("redacted") && !dump.contains("s3cr3t"),
        "{dump}"
    );
    drop(daemon);
    node.cleanup().await
}

#[tokio::test]
async fn a_full_disk_refuses_new_objects_keeps_pods_running_and_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let fs = node.dir.path().join("storefs");
    std::fs::create_dir_all(&fs)?;
    nix::mount::mount(
        Some("tmpfs"),
        &fs,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m"),
    )?;
    let mut cfg = std::fs::read_to_string(&node.config)?;
    cfg.push_str(&format!(
        "\n[store]\npath = {:?}\nkey_file = {:?}\nmin_free_bytes = 1048576\n",
        fs.join("store.db"),
        fs.join("store.key")
    ));
    std::fs::write(&node.config, cfg)?;
    let daemon = node.start().await?;
    // One container sleeps, the other crash-loops: status keeps changing.
    let o = apply(
        &node,
        "apiVersion: v1
kind: Pod
metadata: {name: busy}
spec:
  containers:
  - {name: main, image: busybox:latest, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}
  - {name: flaky, image: busybox:latest, imagePullPolicy: IfNotPresent, command: [sh, -c, 'sleep 1; exit 3']}
",
    )?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_pod(&node, "busy", "Running", |p| phase(p) == "Running").await?;

    // Fill the filesystem to the last byte.
    let filler = fs.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let one = [0u8; 1];
        while f.write_all(&one).is_ok() {}
    }
    let o = apply(&node, &manifest("late", "sleep 3600", ""))?;
    ensure!(!o.status.success(), "an object was accepted on a full disk");
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(err.contains("disk is full"), "unclear error: {err}");
    // Pods go on, restarting by policy, and stay reachable.
    let restarts = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == "flaky"))
            .map(|c| c.restart_count)
            .unwrap_or(0)
    };
    let before = node
        .pods()?
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("busy"))
        .map(restarts)
        .unwrap_or(0);
    wait_pod(&node, "busy", "a restart while full", |p| {
        restarts(p) > before && phase(p) == "Running"
    })
    .await?;
    let o = node.cli(&["exec", "busy", "-c", "main", "--", "echo", "alive"])?;
    ensure!(text(&o).trim() == "alive", "exec while full: {o:?}");
    wait_for("the outbox error", Duration::from_secs(10), || async {
        node.daemon_log()
            .contains("cannot write the outbox")
            .then_some(())
    })
    .await?;

    // Space returns: everything catches up by itself.
    std::fs::remove_file(&filler)?;
    wait_for(
        "the outbox to catch up",
        Duration::from_secs(10),
        || async {
            node.daemon_log()
                .contains("outbox writable again")
                .then_some(())
        },
    )
    .await?;
    let o = apply(&node, &manifest("late", "sleep 3600", ""))?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_pod(&node, "late", "Running", |p| phase(p) == "Running").await?;
    drop(daemon);
    node.cleanup().await?;
    unmount_under(node.dir.path());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_store_is_moved_aside_and_the_node_starts_empty() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    std::fs::write(
        node.manifests.join("static.yaml"),
        manifest("static", "sleep 3600", ""),
    )?;
    let daemon = node.start().await?;
    let o = apply(&node, &manifest("stored", "sleep 3600", ""))?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_pod(&node, "stored", "Running", |p| phase(p) == "Running").await?;
    power_cut(&node, daemon);

    // Bytes overwritten: the database's first pages, and the WAL (which
    // holds the recent ones after a power cut) as a whole.
    for f in ["data/store.db", "data/store.db-wal"] {
        let p = node.dir.path().join(f);
        if let Ok(mut bytes) = std::fs::read(&p) {
            for b in bytes.iter_mut().take(16384) {
                *b = 0xa5;
            }
            std::fs::write(&p, bytes)?;
        }
    }

    let daemon = node.start().await?;
    wait_pod(&node, "static", "the static pod", |p| phase(p) == "Running").await?;
    ensure!(
        node.daemon_log().contains("THE STORE IS CORRUPT"),
        "no loud error:\n{}",
        node.daemon_log()
    );
    let aside = std::fs::read_dir(node.dir.path().join("data"))?
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.db.corrupt-")
        });
    ensure!(aside, "the corrupt file was not kept aside");
    ensure!(
        !node
            .pods()?
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("stored")),
        "a pod from the corrupt store runs"
    );
    // The new store works.
    let o = apply(&node, &manifest("stored", "sleep 3600", ""))?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(daemon);
    node.cleanup().await
}
