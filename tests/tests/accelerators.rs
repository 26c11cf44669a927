//! Accelerators end to end on a standalone node: stand-in GPUs (device
//! nodes made with mknod under a directory the configuration names as
//! /dev), a stand-in NPU that is a real loop device (so a container that
//! was given it reads its bytes), vendors' CDI specs, allocation across
//! edge-rt restarts and a reboot, a pod refused while the devices are
//! held, and containers that were not given a device failing to open it
//! through a node they made themselves (the device cgroup, not a missing
//! file, stops them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use outrigger_tests::util::*;

/// A loop device over a file of known bytes, detached when dropped.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(dir: &Path, content: &[u8]) -> Result<Loop> {
        let file = dir.join("npu-backing.img");
        let mut bytes = content.to_vec();
        bytes.resize(1 << 20, 0);
        std::fs::write(&file, bytes)?;
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }

    fn numbers(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.dev)?.rdev();
        Ok((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) -> Result<()> {
    use nix::sys::stat::{makedev, Mode};
    nix::sys::stat::mknod(
        path,
        kind,
        Mode::from_bits_truncate(0o666),
        makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", path.display()))
}

/// A pod asking for devices: `limits` lines under resources.limits.
fn device_pod(name: &str, limits: &[(&str, u32)], annotations: &str, script: &str) -> String {
    let mut l = String::new();
    for (r, n) in limits {
        l.push_str(&format!("        {r}: {n}\n"));
    }
    let resources = if l.is_empty() {
        String::new()
    } else {
        format!("    resources:\n      limits:\n{l}")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{annotations}spec:\n  containers:\n  - name: main\n    image: busybox:latest\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", {script:?}]\n{resources}"
    )
}

fn waiting_reason(p: &k8s_openapi::api::core::v1::Pod) -> Option<(String, String)> {
    let w = p
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

#[tokio::test]
async fn accelerators_are_given_exclusively_kept_across_restarts_and_denied_to_others() -> Result<()>
{
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let d = node.dir.path();
    let (dev, sys, cdi) = (d.join("fake-dev"), d.join("fake-sys"), d.join("cdi"));
    for p in [&dev, &sys, &cdi] {
        std::fs::create_dir_all(p)?;
    }
    use nix::sys::stat::SFlag;
    // Two NVIDIA GPUs by their real numbers (no driver here: opening one
    // that was given says ENXIO, past the cgroup), and the control node.
    mknod(&dev.join("nvidia0"), SFlag::S_IFCHR, 195, 0)?;
    mknod(&dev.join("nvidia1"), SFlag::S_IFCHR, 195, 1)?;
    mknod(&dev.join("nvidiactl"), SFlag::S_IFCHR, 195, 255)?;
    // An NPU the operator names in the configuration: a real loop device.
    let npu = Loop::new(d, b"NPU-BYTES")?;
    let (lmaj, lmin) = npu.numbers()?;
    mknod(&dev.join("npu0"), SFlag::S_IFBLK, lmaj, lmin)?;
    // The vendor's CDI spec for GPU 0 (as nvidia-ctk writes one: kind
    // nvidia.com/gpu, device "0"): a driver library mount and env; and a
    // device that is no accelerator of the node, asked by annotation.
    let lib = d.join("libfake-cuda.so");
    std::fs::write(&lib, "fake driver library\n")?;
    std::fs::write(
        cdi.join("nvidia.yaml"),
        format!(
            "cdiVersion: \"0.6.0\"\nkind: nvidia.com/gpu\ncontainerEdits:\n  mounts:\n  - {{hostPath: {lib:?}, containerPath: /usr/lib/libcuda.so.1, options: [ro, nosuid, nodev, bind]}}\ndevices:\n- name: \"0\"\n  containerEdits:\n    env: [\"CDI_GPU=zero\"]\n"
        ),
    )?;
    std::fs::write(
        cdi.join("led.json"),
        r#"{"cdiVersion": "0.5.0", "kind": "example.com/led",
            "devices": [{"name": "red", "containerEdits": {"env": ["LED=red"],
              "deviceNodes": [{"path": "/dev/led-red", "hostPath": "/dev/null"}]}}]}"#,
    )?;
    let mut cfg = std::fs::read_to_string(&node.config)?;
    cfg.push_str(&format!(
        "\n[accelerators]\ndev_dir = {dev:?}\nsys_dir = {sys:?}\ncdi_spec_dirs = [{cdi:?}]\n\n[[accelerators.device]]\nresource = \"example.com/npu\"\nglob = \"npu*\"\n"
    ));
    std::fs::write(&node.config, cfg)?;
    let daemon = node.start().await?;

    let status = text(&node.cli(&["status"])?);
    assert!(
        status.contains("Accelerator: nvidia.com/gpu: 0 of 2 held")
            && status.contains("Accelerator: example.com/npu: 0 of 1 held"),
        "{status}"
    );

    // gpu-a: a GPU and the NPU. It reads the NPU's bytes, sees GPU 0's
    // CDI edits and reaches the (driverless) GPU past the cgroup.
    let a_script =
        "ls /dev; echo visible=$NVIDIA_VISIBLE_DEVICES cdi=$CDI_GPU; cat /usr/lib/libcuda.so.1; \
                    head -c 9 /dev/npu0; echo; head -c1 /dev/nvidia0 2>&1; echo done; sleep 3600";
    std::fs::write(
        node.manifests.join("gpu-a.yaml"),
        device_pod(
            "gpu-a",
            &[("nvidia.com/gpu", 1), ("example.com/npu", 1)],
            "",
            a_script,
        ),
    )?;
    let l = node.wait_log("gpu-a", "done").await?;
    assert!(l.contains("visible=0 cdi=zero"), "{l}");
    assert!(l.contains("fake driver library"), "{l}");
    assert!(l.contains("NPU-BYTES"), "the loop device's bytes: {l}");
    assert!(
        l.contains("No such device or address"),
        "past the cgroup to the missing driver: {l}"
    );
    assert!(l.contains("nvidiactl") && !l.contains("nvidia1"), "{l}");

    // gpu-b: the other GPU.
    std::fs::write(
        node.manifests.join("gpu-b.yaml"),
        device_pod(
            "gpu-b",
            &[("nvidia.com/gpu", 1)],
            "",
            "echo visible=$NVIDIA_VISIBLE_DEVICES; ls /dev; echo done; sleep 3600",
        ),
    )?;
    let l = node.wait_log("gpu-b", "done").await?;
    assert!(
        l.contains("visible=1") && l.contains("nvidia1") && !l.contains("nvidia0"),
        "{l}"
    );

    // gpu-c: none left; it waits, saying why.
    std::fs::write(
        node.manifests.join("gpu-c.yaml"),
        device_pod(
            "gpu-c",
            &[("nvidia.com/gpu", 1)],
            "",
            "echo visible=$NVIDIA_VISIBLE_DEVICES; echo done; sleep 3600",
        ),
    )?;
    let c = wait_pod(&node, "gpu-c", "gpu-c waiting for a GPU", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "InsufficientDevices")
    })
    .await?;
    assert_eq!(phase(&c), "Pending");
    let (_, msg) = waiting_reason(&c).unwrap_or_default();
    assert!(
        msg.contains("insufficient nvidia.com/gpu") && msg.contains("0 of 2 free"),
        "{msg}"
    );

    // A container not given the devices cannot open them, even through
    // nodes it makes itself (it holds CAP_MKNOD, as containerd's defaults
    // give): the device cgroup refuses.
    let plain = format!(
        "mknod /tmp/gpu c 195 0; head -c1 /tmp/gpu 2>&1; mknod /tmp/npu b {lmaj} {lmin}; head -c 9 /tmp/npu 2>&1; echo; echo done; sleep 3600"
    );
    std::fs::write(
        node.manifests.join("plain.yaml"),
        device_pod("plain", &[], "", &plain),
    )?;
    let l = node.wait_log("plain", "done").await?;
    assert_eq!(
        l.matches("Operation not permitted").count(),
        2,
        "both opens refused by the cgroup: {l}"
    );
    assert!(!l.contains("NPU-BYTES"), "{l}");

    // A CDI device asked for by annotation (no accelerator of the node):
    // applied as its spec says. An unknown one is refused.
    std::fs::write(
        node.manifests.join("led.yaml"),
        device_pod(
            "led",
            &[],
            "  annotations:\n    cdi.k8s.io/led: example.com/led=red\n",
            "echo led=$LED; echo on > /dev/led-red && echo wrote; echo done; sleep 3600",
        ),
    )?;
    let l = node.wait_log("led", "done").await?;
    assert!(l.contains("led=red") && l.contains("wrote"), "{l}");
    std::fs::write(
        node.manifests.join("bad-cdi.yaml"),
        device_pod(
            "bad-cdi",
            &[],
            "  annotations:\n    cdi.k8s.io/x: example.com/led=blue\n",
            "sleep 3600",
        ),
    )?;
    let bad = wait_pod(&node, "bad-cdi", "bad-cdi refused", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "CreateContainerConfigError")
    })
    .await?;
    assert!(
        waiting_reason(&bad)
            .unwrap_or_default()
            .1
            .contains("example.com/led=blue"),
        "{bad:?}"
    );

    // edge-rt restarted: the pods run on, and gpu-c still waits (the
    // allocations came back from the store, not from who asks first).
    daemon.terminate()?;
    let daemon = node.start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = find(&node.pods()?, "gpu-c").cloned().context("gpu-c")?;
    assert_eq!(
        waiting_reason(&c).map(|w| w.0).as_deref(),
        Some("InsufficientDevices"),
        "{c:?}"
    );

    // A reboot: every container gone, edge-rt starts again. Each pod gets
    // the same devices back, whatever order they start in.
    drop(daemon);
    node.cleanup().await?;
    let daemon = node.start().await?;
    let l = node.wait_log("gpu-a", "done").await?;
    assert!(l.contains("visible=0") && l.contains("NPU-BYTES"), "{l}");
    let l = node.wait_log("gpu-b", "done").await?;
    assert!(l.contains("visible=1"), "{l}");
    let c = wait_pod(&node, "gpu-c", "gpu-c still waiting", |p| {
        waiting_reason(p).is_some_and(|(r, _)| r == "InsufficientDevices")
    })
    .await?;
    assert_eq!(phase(&c), "Pending");

    // gpu-a removed: its GPU goes to gpu-c.
    std::fs::remove_file(node.manifests.join("gpu-a.yaml"))?;
    let l = node.wait_log("gpu-c", "done").await?;
    assert!(l.contains("visible=0"), "{l}");

    // Hotplug: a third GPU appears under /dev, and goes.
    mknod(&dev.join("nvidia2"), SFlag::S_IFCHR, 195, 2)?;
    wait_for("a third GPU counted", Duration::from_secs(10), || async {
        let s = text(&node.cli(&["status"]).ok()?);
        s.contains("nvidia.com/gpu: 2 of 3 held").then_some(())
    })
    .await?;
    std::fs::remove_file(dev.join("nvidia2"))?;
    wait_for("the third GPU gone", Duration::from_secs(10), || async {
        let s = text(&node.cli(&["status"]).ok()?);
        s.contains("nvidia.com/gpu: 2 of 2 held").then_some(())
    })
    .await?;

    drop(daemon);
    node.cleanup().await?;
    drop(npu);
    Ok(())
}
