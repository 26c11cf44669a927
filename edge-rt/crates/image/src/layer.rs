//! Unpacking one image layer into a directory in overlayfs' own format.
//!
//! Each layer becomes a directory that can be used directly as an overlay
//! `lowerdir`: OCI whiteouts (`.wh.NAME`) become 0:0 character devices and
//! opaque markers (`.wh..wh..opq`) become the `trusted.overlay.opaque` xattr.
//! Where overlayfs is not available, [`crate::rootfs`] applies the same
//! directories to a plain copy.
//!
//! Every entry is checked before anything is written: paths and link targets
//! that leave the root, device nodes and paths through symlinks are refused.
//! The decompressed stream is hashed as it is read and checked against the
//! image config's `diff_id`.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::ImageError;

/// Overlay's whiteout marker: a character device with device number 0/0.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From the descriptor's media type; falls back to sniffing the magic bytes
    /// (registries and archives do mislabel layers).
    pub fn detect(media_type: &str, head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            return Compression::Gzip;
        }
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Compression::Zstd;
        }
        if media_type.ends_with("+zstd") {
            Compression::Zstd
        } else if media_type.ends_with("gzip") {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// Reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// What unpacking a layer produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Bytes of regular file content written.
    pub size: u64,
}

/// Unpack `blob` (a layer as stored) into `dest`, which must be an empty
/// directory. `lowers` are the already unpacked layers beneath this one,
/// topmost first: hard links to files of a lower layer are resolved there.
pub fn unpack(
    blob: &Path,
    media_type: &str,
    dest: &Path,
    lowers: &[PathBuf],
) -> Result<Unpacked, ImageError> {
    let mut file = fs::File::open(blob).map_err(|e| ImageError::io(blob, e))?;
    let mut head = [0u8; 4];
    let n = read_up_to(&mut file, &mut head).map_err(|e| ImageError::io(blob, e))?;
    io::Seek::rewind(&mut file).map_err(|e| ImageError::io(blob, e))?;
    let raw: Box<dyn Read> = match Compression::detect(media_type, &head[..n]) {
        Compression::None => Box::new(io::BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file))),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(io::BufReader::new(file)).map_err(|e| {
                ImageError::BadLayer {
                    path: String::new(),
                    reason: format!("zstd: {e}"),
                }
            })?,
        ),
    };
    let mut reader = HashingReader {
        inner: raw,
        hasher: Sha256::new(),
    };
    let size = unpack_tar(&mut reader, dest, lowers)?;
    // The tar end-of-archive padding is part of the diff_id.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| ImageError::io(blob, e))?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(reader.hasher.finalize())),
        size,
    })
}

/// Whether a blob is a tar archive (plain: "ustar" at offset 257) or a
/// compressed stream that will be unpacked as one.
pub fn looks_like_tar(blob: &Path) -> bool {
    let Ok(mut f) = fs::File::open(blob) else {
        return false;
    };
    let mut head = [0u8; 512];
    let n = read_up_to(&mut f, &mut head).unwrap_or(0);
    Compression::detect("", &head[..n]) != Compression::None
        || (n >= 262 && &head[257..262] == b"ustar")
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Normalise a path from a tar entry to components under the root, refusing
/// any that climb above it.
pub fn confined(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if !out.pop() {
                    return Err("path escapes the root".into());
                }
            }
            Component::Prefix(_) => return Err("path has a prefix".into()),
        }
    }
    Ok(out)
}

/// Refuse a write under `root` whose parents include a symlink: following it
/// could land outside the layer.
fn check_parents(root: &Path, rel: &Path) -> Result<(), String> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "path goes through symlink {}",
                        c.as_os_str().to_string_lossy()
                    ))
                }
                Ok(m) if !m.is_dir() => {
                    return Err("a parent of the path is not a directory".into());
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn bad(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::BadLayer {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Unpack a tar stream into `dest`. Returns the bytes of file content written.
pub fn unpack_tar(reader: impl Read, dest: &Path, lowers: &[PathBuf]) -> Result<u64, ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut written = 0u64;
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    let entries = archive.entries().map_err(|e| ImageError::io(dest, e))?;
    for entry in entries {
        // Off the runtime thread this runs inside the fork guard (see
        // `sys`); each entry lets a waiting container creation through.
        outrigger_sys::fork_guard::yield_now();
        let mut entry = entry.map_err(|e| bad(dest, format!("tar: {e}")))?;
        let raw_path = entry
            .path()
            .map_err(|e| bad(dest, format!("tar path: {e}")))?
            .into_owned();
        let rel = confined(&raw_path).map_err(|r| bad(&raw_path, r))?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        check_parents(dest, &rel).map_err(|r| bad(&raw_path, r))?;
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(dest.join(&parent))
            .map_err(|e| ImageError::io(dest.join(&parent), e))?;

        // Whiteouts.
        if name == OPAQUE_MARKER.as_bytes() {
            set_xattr(&dest.join(&parent), OPAQUE_XATTR, b"y")
                .map_err(|e| ImageError::io(dest.join(&parent), e))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let target = dest.join(&parent).join(std::ffi::OsStr::from_bytes(hidden));
            remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(|e| ImageError::io(&target, e.into()))?;
            continue;
        }

        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(bad(
                    &raw_path,
                    "device nodes are not allowed in image layers",
                ));
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad(&raw_path, format!("link name: {e}")))?
                    .ok_or_else(|| bad(&raw_path, "symlink without target"))?
                    .into_owned();
                // Absolute targets resolve inside the container's root at run time;
                // relative ones must not climb out of it from where the link sits.
                if link.is_relative() {
                    confined(&parent.join(&link)).map_err(|_| {
                        bad(
                            &raw_path,
                            format!("symlink target {} escapes the root", link.display()),
                        )
                    })?;
                }
                remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
                symlink(&link, &target).map_err(|e| ImageError::io(&target, e))?;
                chown_entry(&target, entry.header(), true)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad(&raw_path, format!("link name: {e}")))?
                    .ok_or_else(|| bad(&raw_path, "hard link without target"))?
                    .into_owned();
                let link_rel = confined(&link).map_err(|_| {
                    bad(
                        &raw_path,
                        format!("hard link target {} escapes the root", link.display()),
                    )
                })?;
                check_parents(dest, &link_rel).map_err(|r| bad(&raw_path, r))?;
                remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
                let here = dest.join(&link_rel);
                if fs::symlink_metadata(&here).is_ok() {
                    fs::hard_link(&here, &target).map_err(|e| ImageError::io(&target, e))?;
                } else {
                    // A link to a file of a lower layer: overlay cannot link across
                    // layers, so copy it up.
                    let lower = lowers
                        .iter()
                        .map(|l| l.join(&link_rel))
                        .find(|p| {
                            fs::symlink_metadata(p)
                                .map(|m| m.is_file())
                                .unwrap_or(false)
                        })
                        .ok_or_else(|| {
                            bad(
                                &raw_path,
                                format!("hard link target {} not found", link.display()),
                            )
                        })?;
                    written += fs::copy(&lower, &target).map_err(|e| ImageError::io(&target, e))?;
                }
            }
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
                        fs::create_dir(&target).map_err(|e| ImageError::io(&target, e))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(|e| ImageError::io(&target, e))?,
                }
                // Modes and times of directories are set last: files written into
                // them would change the mtime, and a read-only mode would stop us.
                dirs.push((target, entry.header().clone()));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
                let mut out = fs::File::create(&target).map_err(|e| ImageError::io(&target, e))?;
                written +=
                    io::copy(&mut entry, &mut out).map_err(|e| ImageError::io(&target, e))?;
                drop(out);
                apply_meta(&target, entry.header())?;
            }
            tar::EntryType::Fifo => {
                remove_any(&target).map_err(|e| ImageError::io(&target, e))?;
                nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o644))
                    .map_err(|e| ImageError::io(&target, e.into()))?;
                apply_meta(&target, entry.header())?;
            }
            // pax and GNU long-name headers are consumed by the tar crate itself.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(bad(
                    &raw_path,
                    format!("unsupported tar entry type {other:?}"),
                ));
            }
        }
    }
    for (dir, header) in dirs.iter().rev() {
        apply_meta(dir, header)?;
    }
    Ok(written)
}

fn apply_meta(path: &Path, header: &tar::Header) -> Result<(), ImageError> {
    chown_entry(path, header, false)?;
    let mode = header.mode().map_err(|e| bad(path, format!("mode: {e}")))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| ImageError::io(path, e))?;
    if let Ok(mtime) = header.mtime() {
        let t = filetime_from(mtime);
        let _ = nix::sys::stat::utimensat(
            None,
            path,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    Ok(())
}

fn filetime_from(secs: u64) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(secs.min(i64::MAX as u64) as i64, 0)
}

fn chown_entry(path: &Path, header: &tar::Header, nofollow: bool) -> Result<(), ImageError> {
    let uid = header.uid().map_err(|e| bad(path, format!("uid: {e}")))?;
    let gid = header.gid().map_err(|e| bad(path, format!("gid: {e}")))?;
    let res = if nofollow {
        std::os::unix::fs::lchown(path, Some(uid as u32), Some(gid as u32))
    } else {
        std::os::unix::fs::chown(path, Some(uid as u32), Some(gid as u32))
    };
    res.map_err(|e| ImageError::io(path, e))
}

/// Remove whatever is at `path` (file, link or whole directory) if anything is.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are valid NUL-terminated C strings and value is a live slice.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings; buf is writable for its whole length.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc >= 0 {
        return Ok(Some(buf[..rc as usize].to_vec()));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
        _ => Err(err),
    }
}

/// Whether `meta` is an overlay whiteout (a 0/0 character device).
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_paths() {
        assert_eq!(
            confined(Path::new("./a/b/../c")).unwrap(),
            PathBuf::from("a/c")
        );
        assert_eq!(
            confined(Path::new("/etc/passwd")).unwrap(),
            PathBuf::from("etc/passwd")
        );
        assert!(confined(Path::new("../etc/passwd")).is_err());
        assert!(confined(Path::new("a/../../b")).is_err());
    }

    #[test]
    fn compression_sniffing_wins_over_media_type() {
        assert_eq!(
            Compression::detect("application/vnd.oci.image.layer.v1.tar", &[0x1f, 0x8b]),
            Compression::Gzip
        );
        assert_eq!(
            Compression::detect("x+gzip", &[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(
            Compression::detect("application/vnd.oci.image.layer.v1.tar", b"abc"),
            Compression::None
        );
    }
}
