//! Which accelerators this machine has: device nodes under `/dev`, told
//! apart by what sysfs says of them (a render node's PCI vendor or its
//! driver), named by the resource names the vendors' device plugins use, so
//! manifests written for those plugins work here (the table is in the
//! README). Plus the devices the operator names in the configuration.
//! Pure reading: no state; [`scan`] is run at start and on every change
//! under `/dev`.

use std::path::{Path, PathBuf};

use super::AcceleratorConfig;

/// One schedulable device (or group of nodes that go together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accelerator {
    /// The resource it counts toward (`nvidia.com/gpu`).
    pub resource: String,
    /// Its id within the resource, stable across reboots (a GPU's index, a
    /// node's name under /dev).
    pub id: String,
    /// Host paths of the nodes a container holding it gets.
    pub nodes: Vec<PathBuf>,
    /// How many containers may hold it at once (1: exclusive).
    pub shares: u32,
    /// Environment the vendor's stack reads.
    pub env: Vec<(String, String)>,
}

/// The resource names of the built-in detectors (the README's table), so
/// a pod asking for one on a node without it waits for it rather than
/// running without it.
pub const BUILTIN_RESOURCES: &[&str] = &[
    NVIDIA,
    "gpu.intel.com/i915",
    "gpu.intel.com/xe",
    AMD,
    MALI,
    VIVANTE,
    NXP_NPU,
    ROCKCHIP_NPU,
    CORAL,
    HAILO,
];

const NVIDIA: &str = "nvidia.com/gpu";
const AMD: &str = "amd.com/gpu";
const MALI: &str = "arm.com/mali";
const VIVANTE: &str = "vivante.com/gpu";
const NXP_NPU: &str = "nxp.com/npu";
const ROCKCHIP_NPU: &str = "rockchip.com/npu";
const CORAL: &str = "coral.ai/tpu";
const HAILO: &str = "hailo.ai/npu";

/// Every accelerator under `cfg.dev_dir`, sorted by (resource, id).
pub fn scan(cfg: &AcceleratorConfig) -> Vec<Accelerator> {
    let mut out = Vec::new();
    if cfg.detect {
        let dev = &cfg.dev_dir;
        nvidia(dev, &mut out);
        drm(dev, &cfg.sys_dir, &mut out);
        for (pattern, resource) in [
            ("galcore", NXP_NPU),
            ("rknpu", ROCKCHIP_NPU),
            ("mali[0-9]*", MALI),
            ("apex_[0-9]*", CORAL),
            ("hailo[0-9]*", HAILO),
            // hailort's driver for Hailo-10H and 15 names its nodes so.
            ("h1x-[0-9]*", HAILO),
        ] {
            for p in matching(dev, pattern) {
                out.push(one(resource, dev, p));
            }
        }
        // The mainline Rockchip NPU driver ("rocket") is a DRM accel node.
        for p in matching(&dev.join("accel"), "accel[0-9]*") {
            let name = file_name(&p);
            if driver(&cfg.sys_dir.join("class/accel").join(&name)).as_deref() == Some("rocket") {
                out.push(one(ROCKCHIP_NPU, dev, p));
            }
        }
    }
    for c in &cfg.device {
        for p in matching_glob(&cfg.dev_dir, &c.glob) {
            let mut a = one(&c.resource, &cfg.dev_dir, p);
            a.shares = c.count.max(1);
            out.push(a);
        }
    }
    for a in &mut out {
        if let Some(to) = cfg.rename.get(&a.resource) {
            a.resource = to.clone();
        }
    }
    out.sort_by(|a, b| (&a.resource, &a.id).cmp(&(&b.resource, &b.id)));
    out.dedup_by(|a, b| a.resource == b.resource && a.id == b.id);
    out
}

/// A device of one node, its id the node's path under /dev.
fn one(resource: &str, dev: &Path, node: PathBuf) -> Accelerator {
    Accelerator {
        resource: resource.into(),
        id: node
            .strip_prefix(dev)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| node.display().to_string()),
        nodes: vec![node],
        shares: 1,
        env: Vec::new(),
    }
}

/// NVIDIA: a discrete GPU per /dev/nvidiaN with the driver's control nodes
/// (as the NVIDIA device plugin passes them), or a Jetson's integrated GPU
/// (nvmap and the nvhost nodes, as the container toolkit's CSV mode
/// mounts them) as one device with id "tegra", as that plugin names it.
fn nvidia(dev: &Path, out: &mut Vec<Accelerator>) {
    let control: Vec<PathBuf> = [
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia-modeset",
    ]
    .iter()
    .map(|n| dev.join(n))
    .filter(|p| is_device(p))
    .collect();
    let mut gpus: Vec<(u32, PathBuf)> = matching(dev, "nvidia[0-9]*")
        .into_iter()
        .filter_map(|p| Some((file_name(&p).strip_prefix("nvidia")?.parse().ok()?, p)))
        .collect();
    gpus.sort();
    for (index, p) in &gpus {
        let mut nodes = vec![p.clone()];
        nodes.extend(control.iter().cloned());
        out.push(Accelerator {
            resource: NVIDIA.into(),
            id: index.to_string(),
            nodes,
            shares: 1,
            env: vec![("NVIDIA_VISIBLE_DEVICES".into(), index.to_string())],
        });
    }
    if gpus.is_empty() && is_device(&dev.join("nvmap")) {
        let mut nodes = vec![dev.join("nvmap")];
        for pattern in ["nvhost-*", "nvgpu/igpu0/*", "host1x-fence", "nvsciipc"] {
            nodes.extend(matching_glob(dev, pattern));
        }
        nodes.extend(control);
        out.push(Accelerator {
            resource: NVIDIA.into(),
            id: "tegra".into(),
            nodes,
            shares: 1,
            env: vec![("NVIDIA_VISIBLE_DEVICES".into(), "all".into())],
        });
    }
}

/// DRM render nodes, by the PCI vendor of their device (Intel, AMD) or
/// their driver (Arm Mali, Vivante, Rockchip's NPU). Each gets its render
/// node and the card node of the same device, as Intel's and AMD's
/// plugins give them; AMD's compute stack needs /dev/kfd too.
fn drm(dev: &Path, sys: &Path, out: &mut Vec<Accelerator>) {
    for render in matching(&dev.join("dri"), "renderD[0-9]*") {
        let name = file_name(&render);
        let class = sys.join("class/drm").join(&name);
        let vendor = std::fs::read_to_string(class.join("device/vendor"))
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let drv = driver(&class).unwrap_or_default();
        let resource = match (vendor.as_str(), drv.as_str()) {
            ("0x8086", "xe") => "gpu.intel.com/xe",
            ("0x8086", _) => "gpu.intel.com/i915",
            ("0x1002", _) => AMD,
            // NVIDIA's render nodes come with its own device above.
            ("0x10de", _) => continue,
            (_, "panfrost" | "panthor" | "lima" | "mali") => MALI,
            (_, "etnaviv") => VIVANTE,
            (_, "rknpu") => ROCKCHIP_NPU,
            _ => continue,
        };
        let mut nodes = vec![render.clone()];
        // The card node of the same device: sysfs lists the device's DRM
        // minors under device/drm.
        if let Ok(rd) = std::fs::read_dir(class.join("device/drm")) {
            let mut cards: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("card") && !n.contains('-'))
                .map(|n| dev.join("dri").join(n))
                .filter(|p| is_device(p))
                .collect();
            cards.sort();
            nodes.extend(cards);
        }
        if resource == AMD && is_device(&dev.join("kfd")) {
            nodes.push(dev.join("kfd"));
        }
        out.push(Accelerator {
            resource: resource.into(),
            id: format!("dri/{name}"),
            nodes,
            shares: 1,
            env: Vec::new(),
        });
    }
}

/// The driver bound to a class device's parent (`device/driver`'s name).
fn driver(class_dev: &Path) -> Option<String> {
    let l = std::fs::read_link(class_dev.join("device/driver")).ok()?;
    Some(file_name(&l))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A character or block device (not a regular file a test or a broken
/// udev rule left).
pub fn is_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p)
        .map(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Device nodes in `dir` (not below) whose name matches `pattern`.
fn matching(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| glob_match(pattern, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .filter(|p| is_device(p))
        .collect();
    v.sort();
    v
}

/// Device nodes matching a glob of path components, relative to `dev` (or
/// absolute, under it): `nvgpu/igpu0/*`, `video[0-9]*`.
pub fn matching_glob(dev: &Path, pattern: &str) -> Vec<PathBuf> {
    let rel = Path::new(pattern)
        .strip_prefix(dev)
        .unwrap_or(Path::new(pattern));
    let rel = rel.strip_prefix("/dev").unwrap_or(rel);
    let mut dirs = vec![dev.to_path_buf()];
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let mut next = Vec::new();
        for d in &dirs {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.flatten() {
                if glob_match(part, &e.file_name().to_string_lossy()) {
                    next.push(e.path());
                }
            }
        }
        if last {
            next.retain(|p| is_device(p));
        }
        next.sort();
        dirs = next;
    }
    dirs
}

/// Shell-style matching of one name: `*`, `?` and `[...]` sets with
/// ranges (what device names need; no brace or `**`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn set(p: &[char], c: char) -> Option<(bool, usize)> {
        // p starts after '['; returns (matched, length up to and with ']').
        let mut i = 0;
        let negate = matches!(p.first(), Some('!' | '^'));
        if negate {
            i += 1;
        }
        let mut hit = false;
        let mut first = true;
        while i < p.len() {
            if p[i] == ']' && !first {
                return Some((hit != negate, i + 1));
            }
            first = false;
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                hit |= p[i] <= c && c <= p[i + 2];
                i += 3;
            } else {
                hit |= p[i] == c;
                i += 1;
            }
        }
        None
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match (n.first(), set(&p[1..], n.first().copied().unwrap_or('\0'))) {
                (Some(_), Some((true, len))) => go(&p[1 + len..], &n[1..]),
                (_, Some((false, _))) | (None, _) => false,
                // An unclosed '[' is a literal.
                (Some(c), None) => *c == '[' && go(&p[1..], &n[1..]),
            },
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_device_names() {
        assert!(glob_match("nvidia[0-9]*", "nvidia0"));
        assert!(glob_match("nvidia[0-9]*", "nvidia12"));
        assert!(!glob_match("nvidia[0-9]*", "nvidiactl"));
        assert!(!glob_match("nvidia[0-9]*", "nvidia-uvm"));
        assert!(glob_match("renderD*", "renderD128"));
        assert!(glob_match("apex_?", "apex_0"));
        assert!(!glob_match("apex_?", "apex_10"));
        assert!(glob_match("tty[!S]*", "ttyUSB0"));
        assert!(!glob_match("tty[!S]*", "ttyS0"));
        assert!(glob_match("a[", "a["));
        assert!(!glob_match("galcore", "galcore0"));
    }

    /// A fake /dev and /sys as the configuration can point edge-rt at:
    /// device nodes made with mknod (the test runs as root, as CI does).
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Fake {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("dev/dri")).unwrap();
            Fake { dir }
        }
        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
        fn sys(&self) -> PathBuf {
            self.dir.path().join("sys")
        }
        fn node(&self, rel: &str, major: u64, minor: u64) {
            use nix::sys::stat::{makedev, mknod, Mode, SFlag};
            let p = self.dev().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            mknod(
                &p,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(major, minor),
            )
            .expect("mknod (run the tests as root)");
        }
        /// A DRM render node whose device has this PCI vendor and driver,
        /// and a card node.
        fn drm(&self, render: &str, card: &str, vendor: &str, driver: &str) {
            let minor: u64 = render.trim_start_matches("renderD").parse().unwrap();
            self.node(&format!("dri/{render}"), 226, minor);
            self.node(&format!("dri/{card}"), 226, minor - 128);
            let d = self.sys().join(format!("devices/pci0000:00/{render}"));
            std::fs::create_dir_all(d.join("drm").join(card)).unwrap();
            std::fs::create_dir_all(d.join("drm").join(render)).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            let drv = self.sys().join("bus/pci/drivers").join(driver);
            std::fs::create_dir_all(&drv).unwrap();
            std::os::unix::fs::symlink(&drv, d.join("driver")).unwrap();
            let class = self.sys().join("class/drm").join(render);
            std::fs::create_dir_all(&class).unwrap();
            std::os::unix::fs::symlink(&d, class.join("device")).unwrap();
        }
        fn cfg(&self) -> AcceleratorConfig {
            AcceleratorConfig {
                dev_dir: self.dev(),
                sys_dir: self.sys(),
                ..Default::default()
            }
        }
    }

    #[test]
    fn vendors_are_told_apart_by_sysfs_and_named_as_their_plugins_name_them() {
        let f = Fake::new();
        f.node("nvidia0", 195, 0);
        f.node("nvidia1", 195, 1);
        f.node("nvidiactl", 195, 255);
        f.node("nvidia-uvm", 508, 0);
        f.drm("renderD128", "card0", "0x8086", "i915");
        f.drm("renderD129", "card1", "0x1002", "amdgpu");
        f.node("kfd", 510, 0);
        f.drm("renderD130", "card2", "0x0000", "panfrost");
        f.drm("renderD131", "card3", "0x10de", "nvidia");
        f.node("galcore", 199, 0);
        f.node("apex_0", 120, 0);
        f.node("hailo0", 511, 0);
        // A regular file named like a device is not one.
        std::fs::write(f.dev().join("hailo1"), b"").unwrap();
        let found = scan(&f.cfg());
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|a| (a.resource.as_str(), a.id.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("amd.com/gpu", "dri/renderD129"),
                ("arm.com/mali", "dri/renderD130"),
                ("coral.ai/tpu", "apex_0"),
                ("gpu.intel.com/i915", "dri/renderD128"),
                ("hailo.ai/npu", "hailo0"),
                ("nvidia.com/gpu", "0"),
                ("nvidia.com/gpu", "1"),
                ("nxp.com/npu", "galcore"),
            ]
        );
        let gpu1 = &found[6];
        let d = f.dev();
        assert_eq!(
            gpu1.nodes,
            [d.join("nvidia1"), d.join("nvidiactl"), d.join("nvidia-uvm")]
        );
        assert_eq!(
            gpu1.env,
            [("NVIDIA_VISIBLE_DEVICES".to_string(), "1".to_string())]
        );
        let amd = &found[0];
        assert_eq!(
            amd.nodes,
            [d.join("dri/renderD129"), d.join("dri/card1"), d.join("kfd")]
        );
    }

    #[test]
    fn a_jetson_is_one_gpu_of_its_nodes() {
        let f = Fake::new();
        f.node("nvmap", 10, 60);
        f.node("nvhost-ctrl-gpu", 500, 1);
        f.node("nvhost-as-gpu", 500, 2);
        f.node("nvgpu/igpu0/ctrl", 501, 0);
        let found = scan(&f.cfg());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "tegra");
        assert_eq!(found[0].nodes.len(), 4);
    }

    #[test]
    fn configured_devices_renames_and_detection_off() {
        let f = Fake::new();
        f.node("video0", 81, 0);
        f.node("video1", 81, 1);
        f.node("galcore", 199, 0);
        let mut cfg = f.cfg();
        cfg.device.push(super::super::ConfiguredDevice {
            resource: "example.com/camera".into(),
            glob: "video*".into(),
            count: 2,
        });
        cfg.rename
            .insert("nxp.com/npu".into(), "example.com/imx-npu".into());
        let found = scan(&cfg);
        let names: Vec<(&str, &str, u32)> = found
            .iter()
            .map(|a| (a.resource.as_str(), a.id.as_str(), a.shares))
            .collect();
        assert_eq!(
            names,
            [
                ("example.com/camera", "video0", 2),
                ("example.com/camera", "video1", 2),
                ("example.com/imx-npu", "galcore", 1),
            ]
        );
        cfg.detect = false;
        assert_eq!(scan(&cfg).len(), 2);
    }
}
