//! Build a small busybox image (from Debian's busybox-static) as an OCI
//! archive or layout, for edge-rt to import: the quick start and the tests
//! use it, so no registry or internet is needed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use outrigger_tests::fixtures::{self, ImageSpec};

#[derive(Parser)]
struct Args {
    /// Output: an archive (.tar) or, with --layout, a directory.
    out: PathBuf,
    /// Tag in the archive's index; the importer names the image after the file.
    #[arg(long, default_value = "latest")]
    tag: String,
    /// Write an OCI layout directory instead of an archive.
    #[arg(long)]
    layout: bool,
    /// A static busybox for another architecture (e.g. from Debian's
    /// `busybox-static:arm64`), for an image of that architecture.
    #[arg(long, requires = "arch")]
    busybox: Option<PathBuf>,
    /// The OCI architecture of `--busybox` (amd64, arm64, arm).
    #[arg(long, requires = "busybox")]
    arch: Option<String>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let spec = match (&a.busybox, &a.arch) {
        (Some(b), Some(arch)) => ImageSpec::busybox_for(b, arch)?,
        _ => ImageSpec::busybox()?,
    };
    if a.layout {
        fixtures::add_to_layout(&a.out, &a.tag, &spec)?;
    } else {
        let tmp = tempfile::tempdir()?;
        fixtures::add_to_layout(tmp.path(), &a.tag, &spec)?;
        fixtures::archive(tmp.path(), &a.out)?;
    }
    println!("{}", a.out.display());
    Ok(())
}
