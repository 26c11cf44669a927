//! Virtual machines for tests: a Debian kernel under QEMU (TCG) booting an
//! initramfs the harness writes itself, with edge-rt as init. This is how
//! the suites reach what the host cannot give them: a pure cgroup v2 kernel,
//! another architecture, a real boot.
//!
//! Assets (made by `.ci/vm-assets`, from Debian's packages):
//! `$OUTRIGGER_VM_ASSETS` (default `/var/cache/outrigger/vm`) holds
//! `vmlinuz-arm64` and `config-arm64` (linux-image-arm64) and `busybox-arm64`
//! (busybox-static:arm64). The static edge-rt for aarch64 is
//! `$OUTRIGGER_EDGE_RT_ARM64`, by default the release build under this
//! target directory (`cargo build --release --target
//! aarch64-unknown-linux-musl -p edge-rt`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Arm64Assets {
    pub kernel: PathBuf,
    /// The kernel's configuration.
    pub config: PathBuf,
    pub busybox: PathBuf,
    pub edge_rt: PathBuf,
}

impl Arm64Assets {
    /// Finds the assets, or says exactly how to make them.
    pub fn locate() -> Result<Arm64Assets> {
        let dir = PathBuf::from(
            std::env::var_os("OUTRIGGER_VM_ASSETS").unwrap_or("/var/cache/outrigger/vm".into()),
        );
        let edge_rt = match std::env::var_os("OUTRIGGER_EDGE_RT_ARM64") {
            Some(p) => PathBuf::from(p),
            // <target>/debug/deps/<test binary>
            None => std::env::current_exe()?
                .ancestors()
                .nth(3)
                .context("no target directory above the test binary")?
                .join("aarch64-unknown-linux-musl/release/edge-rt"),
        };
        let a = Arm64Assets {
            kernel: dir.join("vmlinuz-arm64"),
            config: dir.join("config-arm64"),
            busybox: dir.join("busybox-arm64"),
            edge_rt,
        };
        for (p, how) in [
            (&a.kernel, "run .ci/vm-assets (Debian's linux-image-arm64)"),
            (&a.config, "run .ci/vm-assets (Debian's linux-image-arm64)"),
            (
                &a.busybox,
                "run .ci/vm-assets (Debian's busybox-static:arm64)",
            ),
            (
                &a.edge_rt,
                "cargo build --release --target aarch64-unknown-linux-musl -p edge-rt",
            ),
        ] {
            if !p.exists() {
                bail!("{} is missing: {how}", p.display());
            }
        }
        if which("qemu-system-aarch64").is_none() {
            bail!("qemu-system-aarch64 is missing: run .ci/vm-assets (qemu-system-arm from bookworm-backports)");
        }
        Ok(a)
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
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Boot `kernel` with `initramfs` on an emulated arm64 `virt` machine.
    pub fn boot_arm64(kernel: &Path, initramfs: Vec<u8>, cmdline: &str) -> Result<Vm> {
        let dir = tempfile::tempdir()?;
        let initrd = dir.path().join("initrd.cpio");
        std::fs::File::create(&initrd)?.write_all(&initramfs)?;
        let mut child = Command::new("qemu-system-aarch64")
            .args([
                "-M",
                "virt",
                "-cpu",
                "cortex-a72",
                "-smp",
                "2",
                "-m",
                "1024",
            ])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            // No network: the default NIC would also need iPXE's option ROM.
            .args(["-nic", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-aarch64")?;
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
        })
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
