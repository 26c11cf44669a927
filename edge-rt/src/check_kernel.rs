//! `edge-rt check-kernel [FILE]`: which kernel options edge-rt needs are
//! missing from a kernel's configuration (`/proc/config.gz`, a
//! `/boot/config-*` file, or a fragment), by feature, as `k3s check-config`
//! and moby's `check-config.sh` do for theirs.
//!
//! The table here is the one list: the kernel fragment the images apply
//! (`boards/common/outrigger.cfg`) is tested to set every option in it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// How an option is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    BuiltIn,
    Module,
    /// Set to a value (a number, a string).
    Value,
    Missing,
}

impl State {
    fn on(self) -> bool {
        self != State::Missing
    }
}

/// A kernel configuration: options by name (without `CONFIG_`).
#[derive(Debug, Default, Clone)]
pub struct Config {
    options: BTreeMap<String, State>,
}

impl Config {
    /// `CONFIG_X=y|m|value` lines; `# CONFIG_X is not set` and anything
    /// else are ignored (an option not set is missing).
    pub fn parse(text: &str) -> Config {
        let mut options = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("CONFIG_") else {
                continue;
            };
            let Some((name, value)) = rest.split_once('=') else {
                continue;
            };
            let state = match value.trim() {
                "y" => State::BuiltIn,
                "m" => State::Module,
                "n" | "" => State::Missing,
                _ => State::Value,
            };
            options.insert(name.trim().to_string(), state);
        }
        Config { options }
    }

    pub fn get(&self, name: &str) -> State {
        self.options.get(name).copied().unwrap_or(State::Missing)
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }
}

/// What one needs: one option, or any of several (`A|B`).
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub any_of: &'static [&'static str],
    pub why: &'static str,
}

/// A feature and the options it needs.
#[derive(Debug)]
pub struct Feature {
    pub name: &'static str,
    /// Missing options fail the check (else they are only reported).
    pub required: bool,
    pub about: &'static str,
    pub needs: &'static [Need],
}

const fn one(o: &'static [&'static str], why: &'static str) -> Need {
    Need { any_of: o, why }
}

/// Everything edge-rt uses of the kernel.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "containers",
        required: true,
        about: "namespaces, cgroups and the filesystems every container gets",
        needs: &[
            one(&["NAMESPACES"], "namespaces"),
            one(&["UTS_NS"], "a pod's hostname"),
            one(&["IPC_NS"], "a pod's IPC"),
            one(&["PID_NS"], "a container's own PID 1"),
            one(&["NET_NS"], "a pod's network"),
            one(&["CGROUPS"], "resource limits and accounting"),
            one(&["CGROUP_PIDS"], "pids limits"),
            one(&["CGROUP_CPUACCT"], "CPU use (kubectl top)"),
            one(&["CGROUP_SCHED"], "CPU shares and quotas"),
            one(&["FAIR_GROUP_SCHED"], "CPU shares"),
            one(&["CFS_BANDWIDTH"], "CPU limits"),
            one(&["MEMCG"], "memory limits and use"),
            one(&["CGROUP_DEVICE"], "device access rules (cgroup v1)"),
            one(&["CGROUP_FREEZER"], "pausing containers (cgroup v1)"),
            one(&["CPUSETS"], "CPU sets"),
            one(&["POSIX_MQUEUE"], "/dev/mqueue in containers"),
            one(&["TMPFS"], "/dev, /run and projected volumes"),
            one(&["DEVTMPFS"], "/dev on the node"),
            one(&["UNIX98_PTYS"], "terminals for kubectl exec -t"),
            one(&["INOTIFY_USER"], "the manifest directory, watched"),
            one(&["EPOLL"], "async I/O"),
            one(&["EVENTFD"], "async wakeups"),
            one(&["KEYS"], "a session keyring per container"),
        ],
    },
    Feature {
        name: "cgroup v2",
        required: true,
        about: "the unified hierarchy, whose device rules are eBPF programs",
        needs: &[
            one(&["BPF_SYSCALL"], "device rules are eBPF programs on v2"),
            one(&["CGROUP_BPF"], "attaching them to cgroups"),
        ],
    },
    Feature {
        name: "overlay",
        required: false,
        about: "containers' root filesystems as overlays; without it they are copied",
        needs: &[one(&["OVERLAY_FS"], "image layers shared, not copied")],
    },
    Feature {
        name: "seccomp",
        required: true,
        about: "the default seccomp profile, RuntimeDefault",
        needs: &[
            one(&["SECCOMP"], "seccomp"),
            one(&["SECCOMP_FILTER"], "BPF filters"),
        ],
    },
    Feature {
        name: "pod network",
        required: true,
        about:
            "veth pairs on a bridge, masquerade and hostPorts; iptables, legacy or over nftables",
        needs: &[
            one(&["VETH"], "a pod's interface"),
            one(&["BRIDGE"], "the pod bridge"),
            one(&["NETFILTER"], "netfilter"),
            one(&["NETFILTER_ADVANCED"], "the matches below"),
            one(&["NF_CONNTRACK"], "connection tracking for NAT"),
            one(&["NF_NAT"], "NAT"),
            one(
                &["IP_NF_IPTABLES", "NFT_COMPAT"],
                "iptables, legacy or over nftables",
            ),
            one(
                &["IP_NF_NAT", "NFT_NAT"],
                "the nat table, DNAT for hostPorts",
            ),
            one(&["IP_NF_FILTER", "NF_TABLES_IPV4"], "the filter table"),
            one(
                &[
                    "IP_NF_TARGET_MASQUERADE",
                    "NETFILTER_XT_TARGET_MASQUERADE",
                    "NFT_MASQ",
                ],
                "pods' traffic out",
            ),
            one(
                &["NETFILTER_XT_MATCH_ADDRTYPE", "NFT_FIB_IPV4"],
                "hostPorts to local addresses",
            ),
            one(
                &["NETFILTER_XT_MATCH_COMMENT", "NF_TABLES"],
                "edge-rt's rules named",
            ),
            one(
                &["NETFILTER_XT_MATCH_CONNTRACK", "NFT_CT"],
                "established connections",
            ),
        ],
    },
    Feature {
        name: "gateway image",
        required: false,
        about: "the images' partitions: provisioning on a FAT boot partition, data on ext4",
        needs: &[
            one(&["EXT4_FS"], "root and data partitions"),
            one(&["VFAT_FS"], "the boot partition (join token, store key)"),
            one(&["NLS_CODEPAGE_437"], "FAT's default code page"),
            one(
                &["NLS_ISO8859_1", "NLS_ASCII"],
                "FAT's default character set",
            ),
        ],
    },
    Feature {
        name: "serial adapters",
        required: false,
        about: "USB RS-485/RS-232 adapters for Modbus RTU devices",
        needs: &[
            one(&["USB_SERIAL"], "USB serial adapters"),
            one(&["USB_SERIAL_FTDI_SIO"], "FTDI"),
            one(&["USB_SERIAL_CP210X"], "Silicon Labs CP210x"),
            one(&["USB_SERIAL_CH341"], "WCH CH340/CH341"),
            one(&["USB_SERIAL_PL2303"], "Prolific PL2303"),
            one(&["USB_ACM"], "CDC ACM devices"),
        ],
    },
    Feature {
        name: "user namespaces",
        required: false,
        about: "pods with hostUsers: false",
        needs: &[one(&["USER_NS"], "user namespaces")],
    },
];

/// One need's outcome: the option that satisfied it, how it is set.
#[derive(Debug, Clone)]
pub struct Found {
    pub need: Need,
    pub option: &'static str,
    pub state: State,
}

/// A feature's outcome.
#[derive(Debug)]
pub struct Checked {
    pub feature: &'static Feature,
    pub found: Vec<Found>,
}

impl Checked {
    pub fn missing(&self) -> impl Iterator<Item = &Found> {
        self.found.iter().filter(|f| !f.state.on())
    }
}

/// Every feature against `cfg`.
pub fn check(cfg: &Config) -> Vec<Checked> {
    FEATURES
        .iter()
        .map(|feature| Checked {
            feature,
            found: feature
                .needs
                .iter()
                .map(|need| {
                    let hit = need
                        .any_of
                        .iter()
                        .map(|o| (*o, cfg.get(o)))
                        .find(|(_, s)| s.on());
                    let (option, state) = hit.unwrap_or((need.any_of[0], State::Missing));
                    Found {
                        need: *need,
                        option,
                        state,
                    }
                })
                .collect(),
        })
        .collect()
}

/// The report as `edge-rt check-kernel` prints it, and whether every
/// required option is there.
pub fn report(source: &str, results: &[Checked]) -> (String, bool) {
    let mut out = format!("kernel configuration: {source}\n");
    let mut ok = true;
    for c in results {
        let missing = c.missing().count();
        let verdict = match (missing, c.feature.required) {
            (0, _) => "ok",
            (_, true) => "MISSING",
            (_, false) => "incomplete, optional",
        };
        let _ = writeln!(
            out,
            "\n{}: {}: {}",
            c.feature.name, verdict, c.feature.about
        );
        for f in &c.found {
            let name = if f.state.on() || f.need.any_of.len() == 1 {
                format!("CONFIG_{}", f.option)
            } else {
                f.need
                    .any_of
                    .iter()
                    .map(|o| format!("CONFIG_{o}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            };
            let state = match f.state {
                State::BuiltIn => "enabled",
                State::Module => "module",
                State::Value => "set",
                State::Missing => "missing",
            };
            let _ = writeln!(out, "  {name:<58} {state:<8} {}", f.need.why);
        }
        if missing > 0 && c.feature.required {
            ok = false;
        }
    }
    let _ = writeln!(
        out,
        "\n{}",
        if ok {
            "every required option is there (modules must be loadable)"
        } else {
            "required options are missing: edge-rt will not run pods as asked"
        }
    );
    (out, ok)
}

/// Where the running kernel's configuration is.
pub fn running_config() -> Option<PathBuf> {
    let proc = PathBuf::from("/proc/config.gz");
    if proc.exists() {
        return Some(proc);
    }
    let release = nix::sys::utsname::uname().ok()?;
    let boot = PathBuf::from(format!(
        "/boot/config-{}",
        release.release().to_string_lossy()
    ));
    boot.exists().then_some(boot)
}

/// A configuration file, gzipped or not.
pub fn read(path: &Path) -> std::io::Result<Config> {
    let bytes = std::fs::read(path)?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut s)?;
        s
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(Config::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_kconfig_writes_them() {
        let c = Config::parse(
            "# comment\nCONFIG_A=y\nCONFIG_B=m\nCONFIG_C=\"x\"\n# CONFIG_D is not set\nCONFIG_E=n\nnonsense\n",
        );
        assert_eq!(c.get("A"), State::BuiltIn);
        assert_eq!(c.get("B"), State::Module);
        assert_eq!(c.get("C"), State::Value);
        assert_eq!(c.get("D"), State::Missing);
        assert_eq!(c.get("E"), State::Missing);
        assert_eq!(c.get("Z"), State::Missing);
    }

    #[test]
    fn alternatives_and_required_features() {
        // Everything, with nftables' iptables.
        let mut all = String::new();
        for f in FEATURES {
            for n in f.needs {
                let o = n.any_of.last().unwrap_or(&"");
                all.push_str(&format!("CONFIG_{o}=m\n"));
            }
        }
        let (text, ok) = report("test", &check(&Config::parse(&all)));
        assert!(ok, "{text}");
        assert!(!text.contains("missing"), "{text}");
        // Without overlay (optional): still fine; without veth: not.
        let (_, ok) = report(
            "t",
            &check(&Config::parse(&all.replace("CONFIG_OVERLAY_FS=m\n", ""))),
        );
        assert!(ok);
        let (text, ok) = report(
            "t",
            &check(&Config::parse(&all.replace("CONFIG_VETH=m\n", ""))),
        );
        assert!(
            !ok && text.contains("pod network: MISSING") && text.contains("CONFIG_VETH"),
            "{text}"
        );
        // An alternative missing names both.
        let no_nat = all.replace("CONFIG_NFT_NAT=m\n", "");
        let (text, _) = report("t", &check(&Config::parse(&no_nat)));
        assert!(
            text.contains("CONFIG_IP_NF_NAT or CONFIG_NFT_NAT"),
            "{text}"
        );
    }

    #[test]
    fn the_images_fragment_sets_every_option() {
        let fragment = include_str!("../../boards/common/outrigger.cfg");
        let (text, ok) = report(
            "boards/common/outrigger.cfg",
            &check(&Config::parse(fragment)),
        );
        assert!(ok && !text.contains("missing"), "{text}");
    }

    #[test]
    fn gzipped_files_read_as_plain_ones() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.gz");
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(b"CONFIG_VETH=y\n").unwrap();
        std::fs::write(&p, z.finish().unwrap()).unwrap();
        assert_eq!(read(&p).unwrap().get("VETH"), State::BuiltIn);
    }
}
