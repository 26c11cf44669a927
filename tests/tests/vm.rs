//! edge-rt on a real kernel of another architecture: the static aarch64
//! build boots as init of an emulated arm64 machine (Debian's kernel, pure
//! cgroup v2 as on Raspberry Pi OS and most current gateway images), mounts
//! what init must, and runs pods whose limits land in cgroup v2.

use std::time::Duration;

use anyhow::{Context, Result};
use outrigger_tests::vm::{busybox_archive, Assets, Initramfs, Vm};

/// Switch to a tmpfs root first: container creation uses pivot_root, which
/// the kernel refuses on the initramfs itself (a gateway image boots from a
/// real root filesystem and has no such step).
const INIT: &str = "#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /newroot
$B mount -t tmpfs -o mode=0755 root /newroot
$B cp -a /bin /etc /usr /newroot/
$B mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/run /newroot/tmp /newroot/var
exec $B switch_root /newroot /bin/edge-rt run
";

/// No pod network: the initramfs carries no iproute2 or iptables. A
/// stand-in accelerator: /dev/kmsg's numbers (writable without a
/// capability, and not among a container's default devices) under a
/// directory of its own, named by the configuration.
const CONFIG: &str = "[runtime]\npids_limit = 16\n[network]\nenabled = false\n\
[accelerators]\ndev_dir = \"/etc/edge-rt/fake-dev\"\ncdi_spec_dirs = []\n\
[[accelerators.device]]\nresource = \"example.com/npu\"\nglob = \"npu*\"\n";

/// Each check exits with its own code, so the exit code says which failed.
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: limits}
spec:
  restartPolicy: Never
  containers:
  - name: check
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "cd /sys/fs/cgroup || exit 9; [ -f cgroup.controllers ] || exit 10; [ \"$(cat memory.max)\" = 67108864 ] || exit 11; [ \"$(cat cpu.max)\" = '50000 100000' ] || exit 12; [ \"$(cat pids.max)\" = 16 ] || exit 13"]
    resources:
      limits: {memory: 64Mi, cpu: 500m}
---
apiVersion: v1
kind: Pod
metadata: {name: oom}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived"]
    resources:
      limits: {memory: 16Mi}
---
apiVersion: v1
kind: Pod
metadata: {name: pids}
spec:
  restartPolicy: Never
  containers:
  - name: forker
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "sh -c 'i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done' 2>/dev/null; set -- /proc/[0-9]*; [ $# -le 16 ] && [ $# -ge 8 ] || exit 14"]
---
apiVersion: v1
kind: Pod
metadata: {name: npu}
spec:
  restartPolicy: Never
  containers:
  - name: given
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "echo '<2>npu-write-from-the-pod' > /dev/npu0 || exit 15"]
    resources:
      limits: {example.com/npu: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: nonpu}
spec:
  restartPolicy: Never
  containers:
  - name: denied
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "mknod /tmp/npu c 1 11 || exit 16; if echo '<2>must-not-appear' > /tmp/npu; then exit 17; fi"]
"#;

/// The value of `key=` in a tracing log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    line[at..]
        .split_whitespace()
        .next()
        .map(|v| v.trim_matches('"'))
}

#[test]
fn edge_rt_is_init_of_an_arm64_machine_with_cgroup_v2() -> Result<()> {
    let assets = Assets::locate("arm64")?;
    let work = tempfile::tempdir()?;
    let archive = busybox_archive(&assets, work.path())?;

    let mut initrd = Initramfs::default();
    initrd
        .dir("/dev")
        .char_dev("/dev/console", 5, 1)
        .dir("/bin")
        .file("/init", INIT.as_bytes(), 0o755)
        .file("/bin/busybox", &std::fs::read(&assets.busybox)?, 0o755)
        .file("/bin/edge-rt", &std::fs::read(&assets.edge_rt)?, 0o755)
        .dir("/etc/edge-rt/pods")
        .dir("/etc/edge-rt/fake-dev")
        .char_dev("/etc/edge-rt/fake-dev/npu0", 1, 11)
        .file("/etc/edge-rt/config.toml", CONFIG.as_bytes(), 0o644)
        .file("/etc/edge-rt/pods/pods.yaml", PODS.as_bytes(), 0o644)
        .dir("/usr/share/edge-rt/images")
        .file(
            "/usr/share/edge-rt/images/busybox.tar",
            &std::fs::read(&archive)?,
            0o644,
        );
    let mut vm = Vm::boot_arm64(
        &assets.kernel,
        initrd.finish(),
        "console=ttyAMA0 panic=-1 quiet",
    )?;

    let t = Duration::from_secs(90);
    let up = vm.wait_line(t, |l| l.contains("edge-rt running"))?;
    assert_eq!(field(&up, "pid1"), Some("true"), "{up}");

    // Container ids end in -<container>-<restart>; the names are unique here.
    for (pod, container, code, reason) in [
        ("limits", "check", "0", "Completed"),
        ("oom", "hog", "137", "OOMKilled"),
        ("pids", "forker", "0", "Completed"),
        // Given the device: its write reached the kernel (below). Not
        // given it: a node made with mknod is refused by the cgroup v2
        // device program.
        ("npu", "given", "0", "Completed"),
        ("nonpu", "denied", "0", "Completed"),
    ] {
        let suffix = format!("-{container}-0");
        let exited = vm.wait_line(t, |l| {
            l.contains("container exited") && field(l, "id").is_some_and(|id| id.ends_with(&suffix))
        })?;
        assert_eq!(
            (field(&exited, "code"), field(&exited, "reason")),
            (Some(code), Some(reason)),
            "{pod}/{container}: {exited}\nconsole:\n{}",
            vm.console().join("\n")
        );
    }
    let console = vm.console().join("\n");
    assert!(console.contains("npu-write-from-the-pod"), "{console}");
    assert!(!console.contains("must-not-appear"), "{console}");
    Ok(())
}

/// `edge-rt check-kernel` on the VM's kernel (Debian's arm64 one, which
/// boots edge-rt as init above): every option edge-rt needs is there;
/// and on a configuration lacking some, it says which, by feature, and
/// fails.
#[test]
fn check_kernel_reads_the_vm_kernels_configuration() -> Result<()> {
    let assets = Assets::locate("arm64")?;
    let o = std::process::Command::new(outrigger_tests::util::edge_rt_bin())
        .arg("check-kernel")
        .arg(&assets.config)
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    anyhow::ensure!(
        o.status.success() && out.contains("every required option is there"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    anyhow::ensure!(out.contains("CONFIG_USB_SERIAL_CH341"), "{out}");
    let work = tempfile::tempdir()?;
    let cut = work.path().join("config");
    let text = std::fs::read_to_string(&assets.config)?;
    std::fs::write(
        &cut,
        text.lines()
            .filter(|l| !l.starts_with("CONFIG_VETH=") && !l.starts_with("CONFIG_SECCOMP_FILTER="))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let o = std::process::Command::new(outrigger_tests::util::edge_rt_bin())
        .arg("check-kernel")
        .arg(&cut)
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    anyhow::ensure!(
        o.status.code() == Some(1)
            && out.contains("pod network: MISSING")
            && out.contains("seccomp: MISSING"),
        "{out}"
    );
    Ok(())
}

/// A gateway's disk for `arch` (boards/qemu-common/make-disk: boot, root
/// and data partitions; BusyBox init starting edge-rt from the image's init
/// script, or with `systemd` Debian's systemd starting edge-rt's units)
/// provisioned with a join token, booted under QEMU: it joins
/// cloud-gw on the host, the real control plane's scheduler places a pod
/// on it from `kubectl apply`, the pod serves on its hostPort; then the
/// power is cut, cloud-gw is gone, and the disk boots again cut off from
/// the host: the pod runs again from the store on the data partition.
fn gateway_image_survives_a_power_cut(arch: &'static str, systemd: bool) -> Result<()> {
    use outrigger_tests::cloud::Cloud;
    use outrigger_tests::k8s::{unique, Cluster, Scope};
    use outrigger_tests::registry::free_port;
    use outrigger_tests::vm::{boot_id_pod, http_get, join_conf, poll, GatewayDisk};

    let assets = Assets::locate(arch)?;
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = Cluster::get()?;
    let scope = Scope::new(&cluster, "gw")?;
    let name = unique("gw");
    scope.owns("node", &name);
    // The guest reaches this host, and so cloud-gw on 127.0.0.1, at 10.0.2.2.
    let cloud = rt.block_on(Cloud::start_for(Some(cluster.kubeconfig()), &["10.0.2.2"]))?;

    let work = tempfile::tempdir()?;
    let join = work.path().join("join.conf");
    let labels = format!("LABELS=outrigger.io/test-scope={}\n", scope.namespace);
    std::fs::write(&join, join_conf(&cloud, &name, &labels)?)?;
    let archive = busybox_archive(&assets, work.path())?;
    let rootfs = systemd.then_some(assets.systemd_rootfs.as_path());
    let disk = GatewayDisk::make(&assets, Some(&join), &[&archive], rootfs)?;
    anyhow::ensure!(
        systemd || disk.rootfs_bytes < 24 << 20,
        "root filesystem {} bytes",
        disk.rootfs_bytes
    );

    let http = free_port()?;
    let forward = [(http, 8080)];
    let mut vm = Vm::boot_disk(arch, &disk, &forward, false)?;
    let t = Duration::from_secs(240);
    vm.wait_line(t, |l| l.contains("edge-rt running"))?;
    let ready = |n: &serde_json::Value| {
        n["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    };
    poll(t, "the gateway's Node Ready", || {
        let o = scope
            .kubectl()
            .args(["get", "node", &name, "-o", "json"])
            .output()
            .ok()?;
        let n: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        ready(&n).then_some(())
    })
    .with_context(|| format!("console:\n{}", vm.console().join("\n")))?;

    let pod = boot_id_pod(&format!("nodeSelector: {{kubernetes.io/hostname: {name}}}"));
    outrigger_tests::util::with_stdin(
        {
            let mut c = scope.kubectl();
            c.args(["apply", "-f", "-"]);
            c
        },
        &pod,
    )?;
    let o = scope
        .kubectl()
        .args(["wait", "--for=condition=Ready", "pod/web", "--timeout=180s"])
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "pod not Ready: {}\nconsole:\n{}",
        String::from_utf8_lossy(&o.stderr),
        vm.console().join("\n")
    );
    let first = poll(t, "the pod's page", || http_get(http))
        .with_context(|| format!("console:\n{}", vm.console().join("\n")))?;

    // The power cut, with the cloud gone for good.
    vm.power_cut();
    drop(cloud);
    let mut vm = Vm::boot_disk(arch, &disk, &forward, true)?;
    vm.wait_line(t, |l| l.contains("edge-rt running"))?;
    let second = poll(t, "the pod's page after the power cut", || {
        http_get(http).filter(|b| *b != first)
    })
    .with_context(|| format!("console:\n{}", vm.console().join("\n")))?;
    anyhow::ensure!(second.len() == first.len(), "{first:?} then {second:?}");
    vm.power_cut();

    // The token was used once and is gone; the store key is on the boot
    // partition, not beside the data it seals.
    let boot = boot_partition_files(&disk.dir.path().join("disk.img"))?;
    anyhow::ensure!(
        boot.contains(&"store.key".to_string()) && !boot.contains(&"join.conf".to_string()),
        "boot partition's outrigger/: {boot:?}"
    );
    Ok(())
}

/// The names in `outrigger/` of the disk's first (FAT) partition, read
/// with mtools at the partition's offset.
fn boot_partition_files(disk: &std::path::Path) -> Result<Vec<String>> {
    let o = std::process::Command::new("partx")
        .args(["-g", "-o", "START", "-n", "1"])
        .arg(disk)
        .output()?;
    let start: u64 = String::from_utf8_lossy(&o.stdout).trim().parse()?;
    let o = std::process::Command::new("mdir")
        .args(["-b", "-i"])
        .arg(format!("{}@@{}", disk.display(), start * 512))
        .arg("::outrigger")
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "mdir: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(str::to_string)
        .collect())
}

#[test]
fn an_arm64_gateway_image_joins_runs_a_pod_and_survives_a_power_cut() -> Result<()> {
    gateway_image_survives_a_power_cut("arm64", false)
}

#[test]
fn an_x86_64_gateway_image_joins_runs_a_pod_and_survives_a_power_cut() -> Result<()> {
    gateway_image_survives_a_power_cut("amd64", false)
}

/// The same with systemd as init (Debian's): edge-rt.service and
/// edge-rt-join.service as the Yocto recipe installs them.
#[test]
fn an_x86_64_gateway_image_with_systemd_joins_runs_a_pod_and_survives_a_power_cut() -> Result<()> {
    gateway_image_survives_a_power_cut("amd64", true)
}
