//! edge-rt on a real kernel of another architecture: the static aarch64
//! build boots as init of an emulated arm64 machine (Debian's kernel, pure
//! cgroup v2 as on Raspberry Pi OS and most current gateway images), mounts
//! what init must, and runs pods whose limits land in cgroup v2.

use std::time::Duration;

use anyhow::Result;
use outrigger_tests::fixtures::{self, ImageSpec};
use outrigger_tests::vm::{Arm64Assets, Initramfs, Vm};

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

/// No pod network: the initramfs carries no iproute2 or iptables.
const CONFIG: &str = "[runtime]\npids_limit = 16\n[network]\nenabled = false\n";

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
    let assets = Arm64Assets::locate()?;
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    let spec = ImageSpec::busybox_for(&assets.busybox, "arm64")?;
    fixtures::add_to_layout(&layout, "latest", &spec)?;
    let archive = work.path().join("busybox.tar");
    fixtures::archive(&layout, &archive)?;

    let mut initrd = Initramfs::default();
    initrd
        .dir("/dev")
        .char_dev("/dev/console", 5, 1)
        .dir("/bin")
        .file("/init", INIT.as_bytes(), 0o755)
        .file("/bin/busybox", &std::fs::read(&assets.busybox)?, 0o755)
        .file("/bin/edge-rt", &std::fs::read(&assets.edge_rt)?, 0o755)
        .dir("/etc/edge-rt/pods")
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
    Ok(())
}

/// `edge-rt check-kernel` on the VM's kernel (Debian's arm64 one, which
/// boots edge-rt as init above): every option edge-rt needs is there;
/// and on a configuration lacking some, it says which, by feature, and
/// fails.
#[test]
fn check_kernel_reads_the_vm_kernels_configuration() -> Result<()> {
    let assets = Arm64Assets::locate()?;
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
