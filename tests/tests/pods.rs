//! Pod semantics with real containers: init containers, restart policies,
//! crash-loop back-off, status and events, removal.

use std::time::Duration;

use anyhow::{Context as _, Result};
use edge_rt::pods;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use outrigger_tests::podkit::*;
use outrigger_tests::util::{log_lines, require_root, wait_for};
use serde_json::json;

#[tokio::test]
async fn init_containers_run_in_order_before_the_app() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let p = pod(json!({
        "metadata": {"name": "ordered"},
        "spec": {
            "initContainers": [sh("first", "sleep 0.3"), sh("second", "sleep 0.1")],
            "containers": [sh("app", "sleep 30")],
        }
    }));
    h.run(vec![p.clone()]);
    let ready = h
        .wait("ordered", "Running and Ready", |p| {
            phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True")
        })
        .await?;
    assert_eq!(condition(&ready, "Initialized").as_deref(), Some("True"));
    let first = init(&ready, "first").context("first")?;
    let second = init(&ready, "second").context("second")?;
    let app_ = app(&ready, "app").context("app")?;
    let t = |c: &ContainerStatus| c.state.clone().and_then(|s| s.terminated).unwrap();
    assert_eq!(exit_code(&first), Some(0));
    assert_eq!(t(&first).reason.as_deref(), Some("Completed"));
    // Each starts only after the one before has finished.
    assert!(t(&first).finished_at.unwrap().0 <= t(&second).started_at.unwrap().0);
    let app_started = app_
        .state
        .and_then(|s| s.running)
        .and_then(|r| r.started_at);
    assert!(t(&second).finished_at.unwrap().0 <= app_started.unwrap().0);
    let started: Vec<Option<String>> = h
        .events(&ready)
        .into_iter()
        .filter(|(r, _)| r == "Started")
        .map(|(_, c)| c)
        .collect();
    assert_eq!(
        started,
        vec![
            Some("first".into()),
            Some("second".into()),
            Some("app".into())
        ]
    );
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_init_container_fails_a_never_pod_and_is_retried_otherwise() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let never = pod(json!({
        "metadata": {"name": "init-never"},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [sh("setup", "exit 3")],
            "containers": [sh("app", "sleep 30")],
        }
    }));
    let retry = pod(json!({
        "metadata": {"name": "init-retry"},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [sh("setup", "exit 3")],
            "containers": [sh("app", "sleep 30")],
        }
    }));
    h.run(vec![never, retry]);
    let failed = h
        .wait("init-never", "Failed", |p| phase(p) == "Failed")
        .await?;
    assert_eq!(exit_code(&init(&failed, "setup").unwrap()), Some(3));
    let app_ = app(&failed, "app").unwrap();
    assert!(app_.state.unwrap().waiting.is_some(), "the app never ran");
    assert_eq!(condition(&failed, "Initialized").as_deref(), Some("False"));

    let retried = h
        .wait("init-retry", "init restarted", |p| {
            init(p, "setup").is_some_and(|c| c.restart_count >= 1)
        })
        .await?;
    assert_eq!(phase(&retried), "Pending");
    assert!(app(&retried, "app").unwrap().container_id.is_none());
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn restart_policies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mk = |name: &str, policy: &str, code: i32| {
        pod(json!({
            "metadata": {"name": name},
            "spec": {"restartPolicy": policy, "containers": [sh("c", &format!("sleep 0.2; exit {code}"))]}
        }))
    };
    h.run(vec![
        mk("always-ok", "Always", 0),
        mk("onfailure-ok", "OnFailure", 0),
        mk("onfailure-bad", "OnFailure", 3),
        mk("never-bad", "Never", 3),
        mk("never-ok", "Never", 0),
    ]);
    let restarted = |p: &Pod| app(p, "c").is_some_and(|c| c.restart_count >= 1);
    let p = h.wait("always-ok", "restarted", restarted).await?;
    assert_eq!(phase(&p), "Running");
    let p = h.wait("onfailure-bad", "restarted", restarted).await?;
    assert_eq!(phase(&p), "Running");
    let last = app(&p, "c")
        .unwrap()
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));

    let p = h
        .wait("onfailure-ok", "Succeeded", |p| phase(p) == "Succeeded")
        .await?;
    assert_eq!(app(&p, "c").unwrap().restart_count, 0);
    let p = h
        .wait("never-bad", "Failed", |p| phase(p) == "Failed")
        .await?;
    let c = app(&p, "c").unwrap();
    assert_eq!((c.restart_count, exit_code(&c)), (0, Some(3)));
    assert_eq!(condition(&p, "Ready").as_deref(), Some("False"));
    h.wait("never-ok", "Succeeded", |p| phase(p) == "Succeeded")
        .await?;

    // Terminal pods stay so: nothing restarts them later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["onfailure-ok", "never-bad", "never-ok"] {
        let p = h.pods.find("default", name).unwrap();
        assert_eq!(app(&p, "c").unwrap().restart_count, 0, "{name}");
    }
    h.teardown().await;

    Ok(())
}

#[tokio::test]
async fn a_crash_loop_backs_off_and_reports_it() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    h.run(vec![pod(json!({
        "metadata": {"name": "crasher"},
        "spec": {"containers": [sh("c", "echo bye; exit 2")]}
    }))]);
    // The first restart is immediate; the second waits 10 s.
    let p = h
        .wait("crasher", "CrashLoopBackOff", |p| {
            app(p, "c").is_some_and(|c| {
                c.state
                    .as_ref()
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.as_deref())
                    == Some("CrashLoopBackOff")
            })
        })
        .await?;
    let c = app(&p, "c").unwrap();
    assert_eq!(c.restart_count, 1);
    assert!(!c.ready);
    let msg = c
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(
        msg.starts_with("back-off 10s restarting failed container=c"),
        "{msg}"
    );
    assert_eq!(
        c.last_state.unwrap().terminated.unwrap().exit_code,
        2,
        "lastState holds the crash"
    );
    assert!(h.events(&p).iter().any(|(r, _)| r == "BackOff"));
    // Still backing off a moment later: no third start yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = h.pods.find("default", "crasher").unwrap();
    assert_eq!(app(&p, "c").unwrap().restart_count, 1);
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn removing_a_pod_stops_it_with_its_grace_period_and_cleans_up() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let p = pod(json!({
        "metadata": {"name": "graceful"},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [sh("c", "trap 'echo got TERM; sleep 0.5; exit 0' TERM; echo ready; while true; do sleep 0.1; done")],
        }
    }));
    h.run(vec![p.clone()]);
    h.wait("graceful", "running", |p| phase(p) == "Running")
        .await?;
    let rec =
        h.rt.list()
            .into_iter()
            .find(|r| r.pod.name == "graceful")
            .unwrap();
    // The trap is set once it says so.
    wait_for("ready", Duration::from_secs(10), || async {
        log_lines(&rec.log_path)
            .ok()
            .filter(|l| l.iter().any(|(_, c)| c == "ready"))
    })
    .await?;
    let log_dir = rec
        .log_path
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(log_dir.exists());
    let t0 = std::time::Instant::now();
    h.run(vec![]);
    h.pods.settle().await;
    // It used its grace: the trap ran and took its half second.
    assert!(t0.elapsed() >= Duration::from_millis(400));
    assert!(h.pods.find("default", "graceful").is_none());
    assert!(h.rt.list().iter().all(|r| r.pod.name != "graceful"));
    assert!(!log_dir.exists(), "logs of a removed pod go with it");
    assert!(h
        .pods
        .context()
        .events
        .about(pods::uid(&p))
        .iter()
        .any(|e| e.reason == "Killing"));
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn a_changed_container_spec_restarts_that_container() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut p = pod(json!({
        "metadata": {"name": "changing"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [sh("a", "sleep 30"), sh("b", "sleep 30")]}
    }));
    h.run(vec![p.clone()]);
    let before = h
        .wait("changing", "running", |p| phase(p) == "Running")
        .await?;
    let id_b = app(&before, "b").unwrap().container_id;
    p.spec.as_mut().unwrap().containers[0].command =
        Some(vec!["sh".into(), "-c".into(), "sleep 31".into()]);
    h.run(vec![p]);
    let after = h
        .wait("changing", "a restarted", |p| {
            app(p, "a").is_some_and(|c| {
                c.restart_count == 1 && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
        })
        .await?;
    assert_eq!(app(&after, "b").unwrap().container_id, id_b, "b untouched");
    h.teardown().await;
    Ok(())
}

fn ready(p: &Pod) -> bool {
    condition(p, "Ready").as_deref() == Some("True")
}

fn reasons(h: &Harness, p: &Pod) -> Vec<String> {
    h.events(p).into_iter().map(|(r, _)| r).collect()
}

#[tokio::test]
async fn a_failing_liveness_probe_kills_and_restarts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut c = sh(
        "app",
        "touch /tmp/healthy; sleep 1; rm /tmp/healthy; sleep 600",
    );
    c["livenessProbe"] = json!({"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 1, "failureThreshold": 2});
    h.run(vec![pod(json!({
        "metadata": {"name": "live"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [c]}
    }))]);
    let p = h
        .wait("live", "restarted by the probe", |p| {
            app(p, "app").is_some_and(|c| c.restart_count >= 1)
        })
        .await?;
    let ev = h.pods.context().events.about(pods::uid(&p));
    let unhealthy = ev
        .iter()
        .find(|e| e.reason == "Unhealthy")
        .context("Unhealthy")?;
    assert!(
        unhealthy.message.starts_with("Liveness probe failed: "),
        "{}",
        unhealthy.message
    );
    assert!(ev
        .iter()
        .any(|e| e.reason == "Killing" && e.message.contains("failed liveness probe")));
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn readiness_flips_ready_and_startup_gates_it() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut c = sh(
        "app",
        "sleep 1; touch /tmp/up; sleep 1; touch /tmp/ready; sleep 2; rm /tmp/ready; sleep 600",
    );
    c["startupProbe"] = json!({"exec": {"command": ["test", "-f", "/tmp/up"]}, "periodSeconds": 1, "failureThreshold": 30});
    c["readinessProbe"] =
        json!({"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1});
    h.run(vec![pod(json!({
        "metadata": {"name": "ready"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [c]}
    }))]);
    let p = h
        .wait("ready", "running", |p| phase(p) == "Running")
        .await?;
    let c0 = app(&p, "app").unwrap();
    assert_eq!(
        (c0.started, c0.ready),
        (Some(false), false),
        "not started yet"
    );
    let p = h
        .wait("ready", "started", |p| {
            app(p, "app").and_then(|c| c.started) == Some(true)
        })
        .await?;
    assert!(!ready(&p));
    h.wait("ready", "Ready", ready).await?;
    let p = h.wait("ready", "not Ready again", |p| !ready(p)).await?;
    assert_eq!(
        app(&p, "app").unwrap().restart_count,
        0,
        "readiness never restarts"
    );
    assert!(reasons(&h, &p).contains(&"Unhealthy".to_string()));
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn http_and_tcp_probes_reach_the_pod_network() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut web = sh(
        "web",
        "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www",
    );
    web["ports"] = json!([{"name": "http", "containerPort": 8080}]);
    web["readinessProbe"] =
        json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1});
    web["livenessProbe"] = json!({"tcpSocket": {"port": 8080}, "periodSeconds": 1});
    let mut missing = sh("missing", "sleep 600");
    missing["readinessProbe"] =
        json!({"httpGet": {"path": "/nope", "port": 8080}, "periodSeconds": 1});
    h.run(vec![pod(json!({
        "metadata": {"name": "web"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [web, missing]}
    }))]);
    // The second container probes the first one's server over the pod's
    // shared localhost: a 404 keeps it unready.
    let p = h
        .wait("web", "web ready", |p| {
            app(p, "web").is_some_and(|c| c.ready)
        })
        .await?;
    assert!(!app(&p, "missing").unwrap().ready);
    let p = h
        .wait("web", "a 404 reported", |p| {
            h.pods
                .context()
                .events
                .about(pods::uid(p))
                .iter()
                .any(|e| e.message.contains("statuscode: 404"))
        })
        .await?;
    assert_eq!(
        app(&p, "web").unwrap().restart_count,
        0,
        "tcp liveness holds"
    );
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn pre_stop_runs_before_sigterm_and_post_start_after_start() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut c = sh(
        "app",
        "trap '[ -f /tmp/prestop ] && exit 0 || exit 1' TERM; while true; do sleep 0.1; done",
    );
    c["lifecycle"] = json!({
        "postStart": {"exec": {"command": ["sh", "-c", "echo started > /tmp/poststart"]}},
        "preStop": {"exec": {"command": ["sh", "-c", "touch /tmp/prestop"]}},
    });
    let p = pod(json!({
        "metadata": {"name": "hooks"},
        "spec": {"terminationGracePeriodSeconds": 5, "containers": [c]}
    }));
    h.run(vec![p.clone()]);
    h.wait("hooks", "running", |p| phase(p) == "Running")
        .await?;
    let rec =
        h.rt.list()
            .into_iter()
            .find(|r| r.pod.name == "hooks")
            .unwrap();
    let args: Vec<String> = ["cat", "/tmp/poststart"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (code, out) =
        h.rt.exec_capture(&rec.id, &args, Duration::from_secs(5), 100)
            .await?
            .context("cat in time")?;
    assert_eq!((code, out.as_str()), (0, "started\n"));
    // Removal: preStop, then SIGTERM; the trap's exit code says whether
    // preStop had run by then.
    let (rt, id) = (h.rt.clone(), rec.id.clone());
    let exit = tokio::spawn(async move { rt.wait(&id).await });
    tokio::task::yield_now().await; // the waiter subscribes before removal
    h.run(vec![]);
    h.pods.settle().await;
    let exit = exit.await??;
    assert_eq!(exit.exit_code, 0, "{exit:?}: SIGTERM came before preStop");
    h.teardown().await;
    Ok(())
}

fn objects(h: &Harness, greeting: &str) -> Result<()> {
    let cm = serde_json::from_value(json!({
        "metadata": {"name": "settings", "namespace": "default"},
        "data": {"greeting": greeting, "LEVEL": "debug"}
    }))?;
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "creds", "namespace": "default"},
        "data": {"password": "czNjcjN0"} // "s3cr3t"
    }))?;
    h.pods
        .context()
        .objects
        .replace(vec![cm], vec![secret], vec![]);
    Ok(())
}

async fn exec_out(h: &Harness, pod: &str, container: &str, script: &str) -> Result<String> {
    let rec =
        h.rt.list()
            .into_iter()
            .find(|r| r.pod.name == pod && r.name == container && r.exit.is_none())
            .context("running container")?;
    let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    let (_, out) =
        h.rt.exec_capture(&rec.id, &args, Duration::from_secs(5), 4096)
            .await?
            .context("exec in time")?;
    Ok(out)
}

#[tokio::test]
async fn config_map_volumes_update_in_place_and_env_comes_from_objects() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    objects(&h, "hello v1")?;
    let mut c = sh("app", "while true; do sleep 0.2; done");
    c["env"] = json!([
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "GREETING_AGAIN", "value": "$(POD) says hi"},
    ]);
    c["envFrom"] = json!([{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}]);
    c["resources"] = json!({"limits": {"memory": "64Mi"}});
    c["volumeMounts"] = json!([
        {"name": "cfg", "mountPath": "/etc/cfg"},
        {"name": "info", "mountPath": "/etc/podinfo"},
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "secret", "mountPath": "/etc/secret"},
    ]);
    h.run(vec![pod(json!({
        "metadata": {"name": "configured", "labels": {"app": "demo"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [c],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "greeting", "path": "greeting"}]}},
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
                {"name": "secret", "secret": {"secretName": "creds", "defaultMode": 256}},
            ],
        }
    }))]);
    h.wait("configured", "running", |p| phase(p) == "Running")
        .await?;
    let env = exec_out(
        &h,
        "configured",
        "app",
        "echo $PASSWORD/$POD/$MEM/$CFG_LEVEL/$GREETING_AGAIN",
    )
    .await?;
    assert_eq!(env, "s3cr3t/configured/64/debug/configured says hi\n");
    let files = exec_out(
        &h,
        "configured",
        "app",
        "cat /etc/cfg/greeting; echo; cat /etc/podinfo/labels; stat -L -c %a /etc/secret/password; grep ' /scratch ' /proc/mounts | cut -d' ' -f3; touch /etc/cfg/x 2>/dev/null || echo read-only",
    )
    .await?;
    assert_eq!(files, "hello v1\napp=\"demo\"\n400\ntmpfs\nread-only\n");

    // A new version of the ConfigMap reaches the running container, whole.
    objects(&h, "hello v2")?;
    wait_for("the new greeting", Duration::from_secs(10), || async {
        exec_out(&h, "configured", "app", "cat /etc/cfg/greeting")
            .await
            .ok()
            .filter(|o| o == "hello v2")
    })
    .await?;
    let p = h.pods.find("default", "configured").unwrap();
    assert_eq!(app(&p, "app").unwrap().restart_count, 0, "updated in place");
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn missing_objects_and_bad_host_paths_are_reported() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut env_c = sh("app", "sleep 600");
    env_c["env"] =
        json!([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]);
    let mut vol_c = sh("app", "sleep 600");
    vol_c["volumeMounts"] = json!([{"name": "host", "mountPath": "/host"}]);
    h.run(vec![
        pod(json!({"metadata": {"name": "no-cm"}, "spec": {"containers": [env_c]}})),
        pod(json!({"metadata": {"name": "no-dir"}, "spec": {
            "containers": [vol_c],
            "volumes": [{"name": "host", "hostPath": {"path": "/nonexistent/outrigger", "type": "Directory"}}],
        }})),
    ]);
    let waiting = |p: &Pod| {
        app(p, "app")
            .and_then(|c| c.state)
            .and_then(|s| s.waiting)
            .map(|w| (w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
    };
    let p = h
        .wait("no-cm", "CreateContainerConfigError", |p| {
            waiting(p).is_some_and(|(r, _)| r == "CreateContainerConfigError")
        })
        .await?;
    assert!(waiting(&p)
        .unwrap()
        .1
        .contains("configmap \"absent\" not found"));
    let p = h
        .wait("no-dir", "FailedMount", |p| {
            h.pods
                .context()
                .events
                .about(pods::uid(p))
                .iter()
                .any(|e| e.reason == "FailedMount")
        })
        .await?;
    assert_eq!(waiting(&p).unwrap().0, "ContainerCreating");
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn containers_of_a_pod_share_localhost_and_empty_dirs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut server = sh("server", "echo hello > /shared/msg; mkdir -p /www && echo pong > /www/ping && exec httpd -f -p 8080 -h /www");
    server["volumeMounts"] = json!([{"name": "shared", "mountPath": "/shared"}]);
    let mut client = sh("client", "while true; do sleep 0.2; done");
    client["volumeMounts"] = json!([{"name": "shared", "mountPath": "/data", "readOnly": true}]);
    h.run(vec![pod(json!({
        "metadata": {"name": "duo"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [server, client],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        }
    }))]);
    h.wait("duo", "both running", |p| phase(p) == "Running")
        .await?;
    let out = wait_for("the server answers", Duration::from_secs(10), || async {
        exec_out(
            &h,
            "duo",
            "client",
            "wget -qO- http://127.0.0.1:8080/ping; cat /data/msg",
        )
        .await
        .ok()
        .filter(|o| o.contains("pong"))
    })
    .await?;
    assert_eq!(out, "pong\nhello\n");
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn an_empty_dir_over_its_size_limit_evicts_the_pod() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut c = sh(
        "filler",
        "dd if=/dev/zero of=/data/blob bs=1M count=2 2>/dev/null; sleep 600",
    );
    c["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    h.run(vec![pod(json!({
        "metadata": {"name": "greedy"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [c],
            "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Mi"}}],
        }
    }))]);
    let p = h
        .wait("greedy", "Evicted", |p| phase(p) == "Failed")
        .await?;
    let st = p.status.clone().unwrap();
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    assert!(st
        .message
        .unwrap_or_default()
        .contains("EmptyDir volume \"data\""));
    assert!(app(&p, "filler")
        .unwrap()
        .state
        .unwrap()
        .terminated
        .is_some());
    h.teardown().await;
    Ok(())
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_backs_off() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let h = Harness::new()?;
    let mut c = sh("app", "true");
    // Nothing listens on port 1: the pull fails at once.
    c["image"] = json!("127.0.0.1:1/nowhere/app:v1");
    c["imagePullPolicy"] = json!("IfNotPresent");
    let mut never = sh("app", "true");
    never["image"] = json!("not-here:v1");
    h.run(vec![
        pod(json!({"metadata": {"name": "unpullable"}, "spec": {"containers": [c]}})),
        pod(json!({"metadata": {"name": "never"}, "spec": {"containers": [never]}})),
    ]);
    let reason = |p: &Pod| {
        app(p, "app")
            .and_then(|c| c.state)
            .and_then(|s| s.waiting)
            .and_then(|w| w.reason)
    };
    // ErrImagePull on a failure (briefly: a second try follows at once),
    // then ImagePullBackOff while the back-off runs.
    let p = h
        .wait("unpullable", "ImagePullBackOff", |p| {
            reason(p).as_deref() == Some("ImagePullBackOff")
        })
        .await?;
    assert_eq!(phase(&p), "Pending");
    let reasons: Vec<String> = h.events(&p).into_iter().map(|(r, _)| r).collect();
    for r in ["Pulling", "Failed", "BackOff"] {
        assert!(reasons.iter().any(|x| x == r), "{r} in {reasons:?}");
    }
    let p = h
        .wait("never", "ErrImageNeverPull", |p| {
            reason(p).as_deref() == Some("ErrImageNeverPull")
        })
        .await?;
    assert_eq!(phase(&p), "Pending");
    h.teardown().await;
    Ok(())
}
