//! Virtual machines for tests: Debian's kernels under QEMU (TCG), booting
//! either an initramfs the harness writes itself with edge-rt as init, or a
//! gateway's disk made by `boards/qemu-common/make-disk` (BusyBox init
//! starting edge-rt, as on a board). This is how the suites reach what the
//! host cannot give them: a pure cgroup v2 kernel, another architecture, a
//! real boot, a power cut.
//!
//! Assets (made by `.ci/vm-assets`, from Debian's packages):
//! `$OUTRIGGER_VM_ASSETS` (default `/var/cache/outrigger/vm`) holds, per
//! architecture (`arm64/`, `amd64/`), the kernel (`vmlinuz`, `config`, the
//! unpacked package with its modules), `busybox` (busybox-static) and the
//! packages a gateway's root filesystem takes (iproute2, iptables). The
//! static edge-rt is `$OUTRIGGER_EDGE_RT_ARM64` / `$OUTRIGGER_EDGE_RT_AMD64`,
//! by default the release builds under this target directory (`cargo build
//! --release --target aarch64-unknown-linux-musl -p edge-rt`, and
//! `x86_64-unknown-linux-musl`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a VM of one architecture boots: Debian's kernel (and its
/// configuration), a static busybox, and the static edge-rt.
pub struct Assets {
    /// `arm64` or `amd64`, as Debian names them.
    pub arch: &'static str,
    /// `$OUTRIGGER_VM_ASSETS/<arch>`: also the packages the gateway disk
    /// is made from (`boards/qemu-common/make-disk`).
    pub dir: PathBuf,
    pub kernel: PathBuf,
    /// The kernel's configuration.
    pub config: PathBuf,
    pub busybox: PathBuf,
    pub edge_rt: PathBuf,
    /// Debian with systemd, iproute2 and iptables (amd64 only), for a
    /// gateway disk with systemd as init.
    pub systemd_rootfs: PathBuf,
}

impl Assets {
    /// Finds the assets, or says exactly how to make them.
    pub fn locate(arch: &'static str) -> Result<Assets> {
        let root = PathBuf::from(
            std::env::var_os("OUTRIGGER_VM_ASSETS").unwrap_or("/var/cache/outrigger/vm".into()),
        );
        let (triple, qemu, var) = match arch {
            "arm64" => ("aarch64", "qemu-system-aarch64", "OUTRIGGER_EDGE_RT_ARM64"),
            "amd64" => ("x86_64", "qemu-system-x86_64", "OUTRIGGER_EDGE_RT_AMD64"),
            _ => bail!("no VM assets for {arch}"),
        };
        let edge_rt = match std::env::var_os(var) {
            Some(p) => PathBuf::from(p),
            // The target directory above this binary (a test's is in
            // <target>/debug/deps, a bench's in <target>/release).
            None => {
                let rel = format!("{triple}-unknown-linux-musl/release/edge-rt");
                let exe = std::env::current_exe()?;
                exe.ancestors()
                    .map(|d| d.join(&rel))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from("target").join(&rel))
            }
        };
        let dir = root.join(arch);
        let a = Assets {
            arch,
            kernel: dir.join("vmlinuz"),
            config: dir.join("config"),
            busybox: dir.join("busybox"),
            systemd_rootfs: dir.join("debian-systemd.tar"),
            dir,
            edge_rt,
        };
        let build =
            format!("cargo build --release --target {triple}-unknown-linux-musl -p edge-rt");
        for (p, how) in [
            (&a.kernel, "run .ci/vm-assets (Debian's kernel package)"),
            (&a.config, "run .ci/vm-assets (Debian's kernel package)"),
            (&a.busybox, "run .ci/vm-assets (Debian's busybox-static)"),
            (&a.edge_rt, build.as_str()),
        ] {
            if !p.exists() {
                bail!("{} is missing: {how}", p.display());
            }
        }
        if which(qemu).is_none() {
            bail!("{qemu} is missing: run .ci/vm-assets (QEMU from bookworm-backports)");
        }
        Ok(a)
    }
}

/// A gateway's disk made by `boards/qemu-common/make-disk` (boot, root and
/// data partitions; the kernel and its initramfs beside it).
pub struct GatewayDisk {
    pub dir: tempfile::TempDir,
    /// The root filesystem's size, as make-disk counts it (without the
    /// boot and data partitions' files).
    pub rootfs_bytes: u64,
}

impl GatewayDisk {
    /// `join`: the join.conf to provision; `preload`: image archives;
    /// `systemd`: a systemd root filesystem (tar) to use instead of
    /// BusyBox init (`--init systemd`).
    pub fn make(
        a: &Assets,
        join: Option<&Path>,
        preload: &[&Path],
        systemd: Option<&Path>,
    ) -> Result<GatewayDisk> {
        let dir = tempfile::tempdir()?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/qemu-common/make-disk");
        let mut cmd = Command::new(&script);
        cmd.args(["--arch", a.arch])
            .arg("--edge-rt")
            .arg(&a.edge_rt)
            .arg("--out")
            .arg(dir.path())
            .arg("--assets")
            .arg(a.dir.parent().context("assets without a parent")?);
        if let Some(j) = join {
            cmd.arg("--join").arg(j);
        }
        for p in preload {
            cmd.arg("--preload").arg(p);
        }
        if let Some(r) = systemd {
            cmd.args(["--init", "systemd", "--rootfs"]).arg(r);
        }
        let o = cmd.output().context("running make-disk")?;
        let out = String::from_utf8_lossy(&o.stdout);
        anyhow::ensure!(
            o.status.success(),
            "make-disk: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let rootfs_bytes = out
            .split("root filesystem: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("make-disk printed no size: {out}"))?;
        Ok(GatewayDisk { dir, rootfs_bytes })
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.exists())
    })
}

/// An initramfs in the kernel's `newc` cpio format, written by hand: the
/// format is a fixed ASCII header per entry, and writing it here lets the
/// harness add device nodes (`/dev/console`) without root or a cpio tool.
#[derive(Default)]
pub struct Initramfs {
    buf: Vec<u8>,
    ino: u32,
}

impl Initramfs {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A directory and, first, its missing parents.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        let mut at = String::new();
        for part in path.trim_matches('/').split('/') {
            at.push('/');
            at.push_str(part);
            self.entry(&at, 0o040755, &[], (0, 0));
        }
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8], perm: u32) -> &mut Self {
        self.entry(path, 0o100000 | perm, data, (0, 0));
        self
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(path, 0o020600, &[], (major, minor));
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        // The kernel reads the archive in 512-byte blocks.
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// A running QEMU machine whose serial console is collected line by line.
pub struct Vm {
    child: Child,
    console: Arc<Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
    /// When QEMU was started: what boot times count from.
    pub started: Instant,
}

/// QEMU for `arch` (Debian's name), two CPUs and 1 GiB, the first serial
/// line as its standard output, no display, off rather than rebooting.
fn qemu(arch: &str) -> Command {
    let mut c = match arch {
        "amd64" => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "q35", "-vga", "none"]);
            c
        }
        _ => {
            let mut c = Command::new("qemu-system-aarch64");
            c.args(["-M", "virt", "-cpu", "cortex-a72"]);
            c
        }
    };
    c.args(["-smp", "2", "-m", "1024"])
        .args(["-display", "none", "-monitor", "none"])
        .args(["-serial", "stdio", "-no-reboot"]);
    c
}

impl Vm {
    /// Boot `kernel` with `initramfs` on an emulated arm64 `virt` machine.
    pub fn boot_arm64(kernel: &Path, initramfs: Vec<u8>, cmdline: &str) -> Result<Vm> {
        let dir = tempfile::tempdir()?;
        let initrd = dir.path().join("initrd.cpio");
        std::fs::File::create(&initrd)?.write_all(&initramfs)?;
        let mut cmd = qemu("arm64");
        // No network: the default NIC would also need iPXE's option ROM.
        cmd.args(["-nic", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", cmdline]);
        Vm::spawn(cmd, Some(dir))
    }

    /// Boot a gateway's disk as its `run-qemu` would: the disk on virtio,
    /// QEMU's user network (the host is 10.0.2.2 to the guest) with
    /// `forward`ed ports (host port on 127.0.0.1, guest port), and with
    /// `offline` the guest cut from the host and everything beyond (the
    /// forwarded ports still reach it).
    pub fn boot_disk(
        arch: &str,
        disk: &GatewayDisk,
        forward: &[(u16, u16)],
        offline: bool,
    ) -> Result<Vm> {
        let d = disk.dir.path();
        let cmdline = std::fs::read_to_string(d.join("cmdline"))?;
        let mut net = String::from("user,id=net");
        if offline {
            net.push_str(",restrict=on");
        }
        for (host, guest) in forward {
            net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut cmd = qemu(arch);
        cmd.arg("-kernel")
            .arg(d.join("vmlinuz"))
            .arg("-initrd")
            .arg(d.join("initrd.img"))
            .args(["-append", cmdline.trim()])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,format=raw,id=disk",
                d.join("disk.img").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk"])
            .args(["-netdev", &net])
            .args(["-device", "virtio-net-pci,netdev=net,romfile="])
            .args(["-device", "virtio-rng-pci"]);
        Vm::spawn(cmd, None)
    }

    fn spawn(mut cmd: Command, dir: Option<tempfile::TempDir>) -> Result<Vm> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting QEMU")?;
        let console = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut line = Vec::new();
                while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    let text = strip_ansi(&String::from_utf8_lossy(&line));
                    if let Ok(mut c) = console.lock() {
                        c.push(text.trim_end().to_string());
                    }
                    line.clear();
                }
            });
        }
        Ok(Vm {
            child,
            console,
            _dir: dir,
            started,
        })
    }

    /// Pulls the plug: QEMU killed, nothing flushed that the guest had not.
    pub fn power_cut(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> Vec<String> {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits until a console line satisfies `pred`, and returns it.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.console().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "the VM stopped ({status}) first; console:\n{}",
                    self.console().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?}; console:\n{}",
                    self.console().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `f` gives, tried every 200 ms for up to `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no {what} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The body of `GET /` on 127.0.0.1:`port`, if it answers 200.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    // busybox httpd answers HTTP/1.1 whatever was asked.
    (head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"))
        .then(|| body.trim().to_string())
        .filter(|b| !b.is_empty())
}

/// A pod serving the boot id of the kernel it runs on (so a test tells
/// which boot runs it) on hostPort 8080, from the preloaded busybox image;
/// `placement` is a line of its spec (nodeName or nodeSelector).
pub fn boot_id_pod(placement: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  {placement}
  containers:
  - name: web
    image: busybox:latest
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && cat /proc/sys/kernel/random/boot_id >/www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{{containerPort: 8080, hostPort: 8080}}]
"#
    )
}

/// The join.conf a factory writes on the boot partition, for a guest
/// reaching `cloud` (on 127.0.0.1) at 10.0.2.2; `extra`: more lines.
pub fn join_conf(cloud: &crate::cloud::Cloud, node: &str, extra: &str) -> Result<String> {
    Ok(format!(
        "SERVER=wss://10.0.2.2:{}\nTOKEN={}\nNODE_NAME={node}\n{extra}",
        cloud.addr.port(),
        cloud.token("30m")?
    ))
}

/// The busybox image of `a`'s architecture as an archive in `dir`, for
/// make-disk's --preload.
pub fn busybox_archive(a: &Assets, dir: &Path) -> Result<PathBuf> {
    use crate::fixtures;
    let layout = dir.join("layout");
    let spec = fixtures::ImageSpec::busybox_for(&a.busybox, a.arch)?;
    fixtures::add_to_layout(&layout, "latest", &spec)?;
    let archive = dir.join("busybox.tar");
    fixtures::archive(&layout, &archive)?;
    Ok(archive)
}

/// Drops terminal colour sequences (edge-rt colours its logs on a tty, and
/// the serial console is one).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
