//! File operations for async code, on the blocking pool inside the fork
//! guard (what `tokio::fs` does, without the guard, is refused by clippy).

use std::io;
use std::path::{Path, PathBuf};

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    super::blocking(f).await.map_err(io::Error::other)?
}

pub async fn metadata(path: impl AsRef<Path>) -> io::Result<std::fs::Metadata> {
    let p: PathBuf = path.as_ref().to_path_buf();
    run(move || std::fs::metadata(p)).await
}

pub async fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    let p: PathBuf = path.as_ref().to_path_buf();
    run(move || std::fs::read_to_string(p)).await
}

pub async fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    let p: PathBuf = path.as_ref().to_path_buf();
    run(move || std::fs::remove_file(p)).await
}

/// Up to `max` bytes of `path` from `offset` (fewer at its end).
pub async fn read_at(path: impl AsRef<Path>, offset: u64, max: usize) -> io::Result<Vec<u8>> {
    let p: PathBuf = path.as_ref().to_path_buf();
    run(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(p)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(max.min(1 << 20));
        f.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    })
    .await
}

/// A file for async writes: each write runs on the blocking pool inside
/// the guard (tokio's own file would run it there without).
pub struct File(Option<std::fs::File>);

impl File {
    pub async fn open(path: impl AsRef<Path>, options: std::fs::OpenOptions) -> io::Result<File> {
        let p: PathBuf = path.as_ref().to_path_buf();
        Ok(File(Some(run(move || options.open(p)).await?)))
    }

    pub async fn write_all(&mut self, data: impl AsRef<[u8]> + Send + 'static) -> io::Result<()> {
        let mut f = self
            .0
            .take()
            .ok_or_else(|| io::Error::other("an earlier write on this file was lost"))?;
        let (f, r) = super::blocking(move || {
            use std::io::Write;
            let r = f.write_all(data.as_ref());
            (f, r)
        })
        .await
        .map_err(io::Error::other)?;
        self.0 = Some(f);
        r
    }
}
