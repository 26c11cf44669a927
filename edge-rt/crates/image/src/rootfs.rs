//! A container's root filesystem from an image's layers: an overlay mount
//! where the kernel allows it, a private copy otherwise.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::layer::{get_xattr, is_whiteout, remove_any, OPAQUE_XATTR};

/// How root filesystems are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootfsMode {
    /// Overlay if the kernel has it, else copy.
    #[default]
    Auto,
    Overlay,
    Copy,
}

pub fn overlay_available() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.trim_end().ends_with("overlay")))
        .unwrap_or(false)
}

/// Build `target` from `lowers` (topmost first). `scratch` holds the
/// container's writable layer. Returns whether an overlay was mounted.
pub fn prepare(
    mode: RootfsMode,
    lowers: &[PathBuf],
    scratch: &Path,
    target: &Path,
) -> io::Result<bool> {
    fs::create_dir_all(target)?;
    let use_overlay = match mode {
        RootfsMode::Overlay => true,
        RootfsMode::Copy => false,
        RootfsMode::Auto => overlay_available(),
    };
    if use_overlay {
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        let lower = if lowers.is_empty() {
            let empty = scratch.join("empty");
            fs::create_dir_all(&empty)?;
            empty.display().to_string()
        } else {
            lowers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        match mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        ) {
            Ok(()) => return Ok(true),
            Err(e) if mode == RootfsMode::Auto => {
                tracing::warn!(error = %e, "overlay mount failed; copying the image instead");
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "overlay mount on {}: {e}",
                    target.display()
                )))
            }
        }
    }
    for l in lowers.iter().rev() {
        apply_layer(l, target)?;
    }
    Ok(false)
}

/// Undo [`prepare`]: unmount (if mounted) and remove everything.
pub fn release(scratch: &Path, target: &Path) -> io::Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(io::Error::other(format!(
                "unmount {}: {e}",
                target.display()
            )))
        }
    }
    remove_any(target)?;
    remove_any(scratch)
}

/// Apply one overlay-format layer directory onto a plain directory tree:
/// whiteouts delete, opaque directories replace.
pub fn apply_layer(layer: &Path, target: &Path) -> io::Result<()> {
    let _guard = outrigger_sys::fork_guard::read();
    copy_tree(layer, target)
}

fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let s = entry.path();
        let d = dst.join(entry.file_name());
        let m = fs::symlink_metadata(&s)?;
        if is_whiteout(&m) {
            remove_any(&d)?;
            continue;
        }
        let ft = m.file_type();
        if ft.is_dir() {
            let opaque = get_xattr(&s, OPAQUE_XATTR)?.is_some_and(|v| v == b"y");
            match fs::symlink_metadata(&d) {
                Ok(dm) if dm.is_dir() && !opaque => {}
                Ok(_) => {
                    remove_any(&d)?;
                    fs::create_dir(&d)?;
                }
                Err(_) => fs::create_dir(&d)?,
            }
            copy_tree(&s, &d)?;
            std::os::unix::fs::chown(&d, Some(m.uid()), Some(m.gid()))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        } else if ft.is_symlink() {
            remove_any(&d)?;
            symlink(fs::read_link(&s)?, &d)?;
            std::os::unix::fs::lchown(&d, Some(m.uid()), Some(m.gid()))?;
        } else if ft.is_file() {
            remove_any(&d)?;
            fs::copy(&s, &d)?;
            std::os::unix::fs::chown(&d, Some(m.uid()), Some(m.gid()))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        } else {
            // FIFOs: recreate.
            remove_any(&d)?;
            nix::unistd::mkfifo(
                &d,
                nix::sys::stat::Mode::from_bits_truncate(m.mode() & 0o777),
            )
            .map_err(io::Error::from)?;
        }
    }
    Ok(())
}
