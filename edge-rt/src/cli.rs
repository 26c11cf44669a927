//! How the CLI prints what the local API returns: kubectl's layouts, so
//! that what an operator knows from a cluster reads the same on a gateway.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{NodeStatus, PodDetail};

/// "5s", "3m", "2h", "4d", as kubectl shows ages.
pub fn age(since: Option<&Time>) -> String {
    let Some(t) = since else {
        return "<unknown>".into();
    };
    let s = (jiff::Timestamp::now().as_second() - t.0.as_second()).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The STATUS column of `kubectl get pods`, worked out as kubectl does.
pub fn pod_reason(pod: &Pod) -> String {
    let st = pod.status.clone().unwrap_or_default();
    let mut reason = st
        .reason
        .clone()
        .or(st.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let inits = st.init_container_statuses.clone().unwrap_or_default();
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let state = c.state.clone().unwrap_or_default();
        if let Some(t) = &state.terminated {
            if t.exit_code == 0 {
                continue;
            }
            reason = match &t.reason {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => format!("Init:ExitCode:{}", t.exit_code),
            };
        } else if let Some(r) = state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.clone())
            .filter(|r| !r.is_empty() && r != "PodInitializing")
        {
            reason = format!("Init:{r}");
        } else {
            reason = format!("Init:{i}/{}", inits.len());
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in st.container_statuses.iter().flatten().rev() {
            let state = c.state.clone().unwrap_or_default();
            if let Some(r) = state
                .waiting
                .and_then(|w| w.reason)
                .filter(|r| !r.is_empty())
            {
                reason = r;
            } else if let Some(t) = state.terminated {
                reason = t
                    .reason
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| format!("ExitCode:{}", t.exit_code));
            } else if state.running.is_some() && c.ready {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if pod.metadata.deletion_timestamp.is_some() {
        reason = "Terminating".into();
    }
    reason
}

fn restarts(pod: &Pod) -> i32 {
    let st = pod.status.clone().unwrap_or_default();
    st.container_statuses
        .iter()
        .flatten()
        .map(|c| c.restart_count)
        .sum()
}

/// `kubectl get pods` (with -A, a NAMESPACE column).
pub fn pods_table(pods: &[Pod], all_namespaces: bool) -> String {
    let mut rows = vec![];
    for p in pods {
        let st = p.status.clone().unwrap_or_default();
        let cs = st.container_statuses.clone().unwrap_or_default();
        let ready = cs.iter().filter(|c| c.ready).count();
        let total = p.spec.as_ref().map(|s| s.containers.len()).unwrap_or(0);
        let mut row = vec![];
        if all_namespaces {
            row.push(crate::pods::namespace(p).to_string());
        }
        row.extend([
            crate::pods::name(p).to_string(),
            format!("{ready}/{total}"),
            pod_reason(p),
            restarts(p).to_string(),
            age(st.start_time.as_ref()),
            st.pod_ip.clone().unwrap_or_else(|| "<none>".into()),
        ]);
        rows.push(row);
    }
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE");
    }
    head.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"]);
    columns(&head, &rows)
}

fn columns(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}   ");
            }
        }
        out.push('\n');
    };
    line(head.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn time(t: &Option<Time>) -> String {
    t.as_ref()
        .map(|t| t.0.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string())
        .unwrap_or_else(|| "<unknown>".into())
}

fn container_block(
    out: &mut String,
    c: &ContainerStatus,
    spec: Option<&k8s_openapi::api::core::v1::Container>,
) {
    let _ = writeln!(out, "  {}:", c.name);
    let _ = writeln!(
        out,
        "    Container ID:  {}",
        c.container_id.clone().unwrap_or_default()
    );
    let _ = writeln!(out, "    Image:         {}", c.image);
    let _ = writeln!(out, "    Image ID:      {}", c.image_id);
    if let Some(cmd) = spec.and_then(|s| s.command.as_ref()) {
        let _ = writeln!(out, "    Command:       {}", cmd.join(" "));
    }
    let state_lines =
        |label: &str, s: &Option<k8s_openapi::api::core::v1::ContainerState>, out: &mut String| {
            let s = s.clone().unwrap_or_default();
            if let Some(r) = s.running {
                let _ = writeln!(out, "    {label:<15}Running");
                let _ = writeln!(out, "      Started:     {}", time(&r.started_at));
            } else if let Some(t) = s.terminated {
                let _ = writeln!(out, "    {label:<15}Terminated");
                let _ = writeln!(out, "      Reason:      {}", t.reason.unwrap_or_default());
                let _ = writeln!(out, "      Exit Code:   {}", t.exit_code);
                if let Some(sig) = t.signal {
                    let _ = writeln!(out, "      Signal:      {sig}");
                }
                let _ = writeln!(out, "      Started:     {}", time(&t.started_at));
                let _ = writeln!(out, "      Finished:    {}", time(&t.finished_at));
            } else if let Some(w) = s.waiting {
                let _ = writeln!(out, "    {label:<15}Waiting");
                let _ = writeln!(out, "      Reason:      {}", w.reason.unwrap_or_default());
                if let Some(m) = w.message {
                    let _ = writeln!(out, "      Message:     {m}");
                }
            } else {
                let _ = writeln!(out, "    {label:<15}<none>");
            }
        };
    state_lines("State:", &c.state, out);
    if c.last_state
        .as_ref()
        .is_some_and(|s| s.terminated.is_some())
    {
        state_lines("Last State:", &c.last_state, out);
    }
    let _ = writeln!(
        out,
        "    Ready:         {}",
        if c.ready { "True" } else { "False" }
    );
    let _ = writeln!(out, "    Restart Count: {}", c.restart_count);
    if let Some(limits) = spec
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.limits.as_ref())
    {
        let _ = writeln!(out, "    Limits:");
        for (k, v) in limits {
            let _ = writeln!(out, "      {k}:  {}", v.0);
        }
    }
}

/// `kubectl describe pod`.
pub fn describe(d: &PodDetail) -> String {
    let p = &d.pod;
    let st = p.status.clone().unwrap_or_default();
    let spec = p.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "Name:         {}", crate::pods::name(p));
    let _ = writeln!(out, "Namespace:    {}", crate::pods::namespace(p));
    let _ = writeln!(out, "UID:          {}", crate::pods::uid(p));
    let _ = writeln!(out, "Start Time:   {}", time(&st.start_time));
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "Labels:       {}",
        if labels.is_empty() {
            "<none>".to_string()
        } else {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    );
    let _ = writeln!(
        out,
        "Status:       {}",
        st.phase.clone().unwrap_or_default()
    );
    if let Some(r) = &st.reason {
        let _ = writeln!(out, "Reason:       {r}");
    }
    if let Some(m) = &st.message {
        let _ = writeln!(out, "Message:      {m}");
    }
    let _ = writeln!(
        out,
        "IP:           {}",
        st.pod_ip.clone().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "QoS Class:    {}",
        st.qos_class.clone().unwrap_or_default()
    );
    for (title, statuses, specs) in [
        (
            "Init Containers",
            st.init_container_statuses.clone().unwrap_or_default(),
            spec.init_containers.clone().unwrap_or_default(),
        ),
        (
            "Containers",
            st.container_statuses.clone().unwrap_or_default(),
            spec.containers.clone(),
        ),
    ] {
        if statuses.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}:");
        for c in &statuses {
            container_block(&mut out, c, specs.iter().find(|s| s.name == c.name));
        }
    }
    let _ = writeln!(out, "Conditions:");
    let _ = writeln!(out, "  Type              Status");
    for c in st.conditions.iter().flatten() {
        let _ = writeln!(out, "  {:<17} {}", c.type_, c.status);
    }
    let _ = writeln!(out, "Events:");
    if d.events.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        let rows: Vec<Vec<String>> = d
            .events
            .iter()
            .map(|e| {
                let last = e.last_timestamp.parse::<jiff::Timestamp>().ok().map(Time);
                let age = if e.count > 1 {
                    format!("{} (x{})", age(last.as_ref()), e.count)
                } else {
                    age(last.as_ref())
                };
                vec![
                    format!("{:?}", e.kind),
                    e.reason.clone(),
                    age,
                    "edge-rt".into(),
                    e.message.clone(),
                ]
            })
            .collect();
        for l in columns(&["Type", "Reason", "Age", "From", "Message"], &rows).lines() {
            let _ = writeln!(out, "  {l}");
        }
    }
    out
}

pub fn human(n: u64) -> String {
    const U: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// `edge-rt status`.
pub fn status_text(s: &NodeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Node:        {} ({}, kernel {}, cgroup {})",
        s.hostname, s.arch, s.kernel, s.cgroup
    );
    let _ = writeln!(
        out,
        "edge-rt:     {} up {}s{}, RSS {}",
        s.version,
        s.uptime_secs,
        if s.pid1 { " as PID 1" } else { "" },
        human(s.rss_bytes)
    );
    let phases: Vec<String> = s
        .pods_by_phase
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let _ = writeln!(
        out,
        "Pods:        {} ({})",
        s.pods,
        if phases.is_empty() {
            "none".into()
        } else {
            phases.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "Containers:  {} running, {} restarts in all",
        s.containers_running, s.restarts
    );
    let _ = writeln!(
        out,
        "Images:      {} using {} of a {} budget",
        s.images,
        human(s.image_bytes),
        human(s.image_budget_bytes)
    );
    for (resource, (total, held)) in &s.accelerators {
        let _ = writeln!(out, "Accelerator: {resource}: {held} of {total} held");
    }
    for c in &s.conditions {
        let since = c
            .last_transition_time
            .as_ref()
            .map(|t| format!(" since {:.0}", t.0))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Condition:   {}={} {}{}",
            c.type_,
            c.status,
            c.reason.as_deref().unwrap_or(""),
            since
        );
    }
    match &s.store {
        Some(Ok(st)) => {
            let objects: u64 = st.objects.values().sum();
            let _ = writeln!(
                out,
                "Store:       {} objects, outbox {} status + {} events{}",
                objects,
                st.outbox_status,
                st.outbox_events,
                st.oldest_unsent_ms
                    .map(|m| format!(", oldest unsent {}", ms_ago(m)))
                    .unwrap_or_default()
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Store:       UNAVAILABLE: {e}");
        }
        None => {}
    }
    out
}

/// Secret values replaced by their length: `store dump` output can go into
/// a bug report.
pub fn redact_secret(body: &mut serde_json::Value) {
    let redact = |v: &mut serde_json::Value| {
        let n = v.as_str().map(str::len).unwrap_or(0);
        *v = format!("<redacted, {n} characters>").into();
    };
    for field in ["data", "stringData"] {
        if let Some(m) = body.get_mut(field).and_then(|v| v.as_object_mut()) {
            m.values_mut().for_each(redact);
        }
    }
    // A service account token's.
    if let Some(t) = body.get_mut("status").and_then(|s| s.get_mut("token")) {
        redact(t);
    }
}

fn ms_ago(ms: i64) -> String {
    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or_default();
    format!("{t:.0} ({} ago)", age(Some(&Time(t))))
}

pub fn store_stats_text(s: &crate::store::Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Store:       {} (schema {}), {} + {} WAL, {} free pages",
        s.path.display(),
        s.schema_version,
        human(s.file_bytes),
        human(s.wal_bytes),
        s.free_pages
    );
    let _ = writeln!(out, "Objects:");
    if s.objects.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (k, n) in &s.objects {
        let _ = writeln!(
            out,
            "  {:<12} {:>6}  {:>10}  cursor {}",
            k,
            n,
            human(s.object_bytes.get(k).copied().unwrap_or(0)),
            s.cursors.get(k).map(String::as_str).unwrap_or("-")
        );
    }
    let _ = writeln!(
        out,
        "Outbox:      {} status, {} events, {} ({} events dropped while over the bound)",
        s.outbox_status,
        s.outbox_events,
        human(s.outbox_bytes),
        s.events_dropped
    );
    let _ = writeln!(
        out,
        "Oldest unsent: {}",
        s.oldest_unsent_ms.map(ms_ago).unwrap_or_else(|| "-".into())
    );
    let link = if s.link.connected {
        format!("connected since {}", ms_ago(s.link.since_ms))
    } else if s.link.ever_connected {
        format!("disconnected since {}", ms_ago(s.link.since_ms))
    } else {
        "never connected".into()
    };
    let _ = writeln!(out, "Cloud link:  {link}");
    out
}

/// `edge-rt top node|pods`: the columns `kubectl top` prints (CPU in
/// millicores over the last look, memory as the working set).
pub fn top_table(s: &outrigger_proto::stats::Summary, pods: bool, all_namespaces: bool) -> String {
    use outrigger_proto::stats::{CpuStats, MemoryStats};
    let cpu = |c: Option<&CpuStats>| {
        c.and_then(|c| c.usage_nano_cores)
            .map_or("<unknown>".to_string(), |n| format!("{}m", n / 1_000_000))
    };
    let mem = |m: Option<&MemoryStats>| {
        m.and_then(|m| m.working_set_bytes)
            .map_or("<unknown>".to_string(), |b| format!("{}Mi", b / (1 << 20)))
    };
    if !pods {
        let n = &s.node;
        let pct = |used: Option<u64>, of: Option<u64>| match (used, of) {
            (Some(u), Some(t)) if t > 0 => format!("{}%", u * 100 / t),
            _ => "<unknown>".into(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let cpu_n = n.cpu.as_ref().and_then(|c| c.usage_nano_cores);
        let total_mem = n
            .memory
            .as_ref()
            .and_then(|m| Some(m.available_bytes? + m.working_set_bytes?));
        let ws = n.memory.as_ref().and_then(|m| m.working_set_bytes);
        let row = vec![
            n.node_name.clone(),
            cpu(n.cpu.as_ref()),
            pct(cpu_n, Some(cores * 1_000_000_000)),
            mem(n.memory.as_ref()),
            pct(ws, total_mem),
        ];
        return columns(
            &["NAME", "CPU(cores)", "CPU(%)", "MEMORY(bytes)", "MEMORY(%)"],
            &[row],
        );
    }
    let mut rows = vec![];
    for p in &s.pods {
        let mut row = vec![];
        if all_namespaces {
            row.push(p.pod_ref.namespace.clone());
        }
        row.extend([
            p.pod_ref.name.clone(),
            cpu(p.cpu.as_ref()),
            mem(p.memory.as_ref()),
        ]);
        rows.push(row);
    }
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE");
    }
    head.extend(["NAME", "CPU(cores)", "MEMORY(bytes)"]);
    columns(&head, &rows)
}

/// `edge-rt devices`: the columns `kubectl get devices` prints.
pub fn devices_table(devices: &[crate::devices::DeviceView], all_namespaces: bool) -> String {
    let mut rows = vec![];
    for d in devices {
        let s = &d.status;
        let mut row = vec![];
        if all_namespaces {
            row.push(d.namespace.clone());
        }
        let reported = d
            .last_read
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| age(Some(&Time(t))))
            .unwrap_or_else(|| "<none>".into());
        row.extend([
            d.name.clone(),
            s.protocol.clone().unwrap_or_default(),
            s.state.clone().unwrap_or_else(|| "Unknown".into()),
            reported,
            s.summary.clone().unwrap_or_default(),
        ]);
        rows.push(row);
    }
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE");
    }
    head.extend(["NAME", "PROTOCOL", "STATE", "READ", "VALUES"]);
    columns(&head, &rows)
}

/// `edge-rt describe device NAME`.
pub fn describe_device(d: &crate::devices::DeviceView) -> String {
    let s = &d.status;
    let mut out = String::new();
    let _ = writeln!(out, "Name:         {}", d.name);
    let _ = writeln!(out, "Namespace:    {}", d.namespace);
    let _ = writeln!(out, "UID:          {}", d.uid);
    let _ = writeln!(out, "Model:        {}", d.model);
    let _ = writeln!(out, "Protocol:     {}", s.protocol.as_deref().unwrap_or(""));
    let _ = writeln!(
        out,
        "State:        {}",
        s.state.as_deref().unwrap_or("Unknown")
    );
    let _ = writeln!(out, "Properties:");
    let rows: Vec<Vec<String>> = s
        .properties
        .iter()
        .map(|p| {
            vec![
                format!("  {}", p.name),
                p.value.clone().unwrap_or_else(|| "<none>".into()),
                p.time.clone().unwrap_or_default(),
                p.observed_desired.clone().unwrap_or_default(),
                p.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&columns(
        &["  NAME", "VALUE", "CHANGED", "DESIRED TAKEN", "ERROR"],
        &rows,
    ));
    let local: Vec<String> = s
        .properties
        .iter()
        .filter_map(|p| {
            let l = p.local_desired.as_ref()?;
            Some(format!(
                "  {}={} at {} (over the spec's {})",
                p.name,
                l.value,
                l.time,
                l.base.as_deref().unwrap_or("none")
            ))
        })
        .collect();
    if !local.is_empty() {
        let _ = writeln!(out, "Set at the node (edge-rt device set):");
        for l in local {
            let _ = writeln!(out, "{l}");
        }
    }
    let _ = writeln!(out, "Conditions:");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {}={} {} since {}: {}",
            c.type_, c.status, c.reason, c.last_transition_time.0, c.message
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        out,
        "Counters:     polls {}, poll errors {}, timeouts {}, writes {}, write errors {}, mean latency {:.1} ms",
        c.polls, c.poll_errors, c.timeouts, c.writes, c.write_errors, d.mean_latency_ms
    );
    let _ = writeln!(out, "Recent errors:");
    if d.recent_errors.is_empty() {
        let _ = writeln!(out, "  <none>");
    }
    for (t, m) in &d.recent_errors {
        let _ = writeln!(out, "  {t}  {m}");
    }
    out
}
