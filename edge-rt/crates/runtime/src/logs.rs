//! Container logs in the CRI format the kubelet writes and `kubectl logs`
//! reads: `<RFC3339Nano> <stream> <P|F> <content>`, one file per container,
//! rotated by size.
//!
//! A line longer than the read buffer is split into partial (`P`) records and
//! closed by a full (`F`) one, as CRI runtimes do.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The longest record content: longer lines are split with `P` tags.
pub const MAX_RECORD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends records to one container's log file and rotates it.
pub struct LogFile {
    path: PathBuf,
    file: fs::File,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl LogFile {
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1024),
            max_files: max_files.max(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one record. `full` is false for a piece of a longer line.
    pub fn record(&mut self, stream: Stream, full: bool, content: &[u8]) -> io::Result<()> {
        let ts = format!("{:.9}", jiff::Timestamp::now());
        let tag = if full { "F" } else { "P" };
        let mut line = Vec::with_capacity(ts.len() + content.len() + 12);
        line.extend_from_slice(ts.as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.as_str().as_bytes());
        line.push(b' ');
        line.extend_from_slice(tag.as_bytes());
        line.push(b' ');
        line.extend_from_slice(content);
        line.push(b'\n');
        if self.size + line.len() as u64 > self.max_size && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// `log` -> `log.1` -> `log.2` ...; the oldest beyond `max_files` goes.
    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: u32| rotated(&self.path, i);
        if self.max_files > 1 {
            let _ = fs::remove_file(name(self.max_files - 1));
            for i in (1..self.max_files - 1).rev() {
                let _ = fs::rename(name(i), name(i + 1));
            }
            fs::rename(&self.path, name(1))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        self.file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The `i`th rotated copy of a log file (`0.log.1` is the newest).
pub fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(format!(".{i}"));
    p.into()
}

/// A container's log file and its rotated copies that exist, oldest first.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..64)
        .map(|i| rotated(path, i))
        .take_while(|p| p.exists())
        .collect();
    v.reverse();
    if path.exists() {
        v.push(path.to_path_buf());
    }
    v
}

/// Splits a byte stream into CRI records: complete lines as `F`, and a
/// buffer filled with no newline as `P`.
pub struct LineSplitter {
    buf: heapless::Vec<u8, MAX_RECORD>,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter {
            buf: heapless::Vec::new(),
        }
    }
}

impl LineSplitter {
    /// Feed bytes; `emit(full, content)` is called for every record.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut emit: impl FnMut(bool, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        while !data.is_empty() {
            if let Some(nl) = data.iter().position(|b| *b == b'\n') {
                let (line, rest) = data.split_at(nl);
                let room = MAX_RECORD - self.buf.len();
                if line.len() <= room {
                    let _ = self.buf.extend_from_slice(line);
                    emit(true, &self.buf)?;
                    self.buf.clear();
                    data = &rest[1..];
                } else {
                    let _ = self.buf.extend_from_slice(&line[..room]);
                    emit(false, &self.buf)?;
                    self.buf.clear();
                    data = &data[room..];
                }
            } else {
                let room = MAX_RECORD - self.buf.len();
                let take = data.len().min(room);
                let _ = self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() == MAX_RECORD {
                    emit(false, &self.buf)?;
                    self.buf.clear();
                }
            }
        }
        Ok(())
    }

    /// At end of stream: what is left is a last line without a newline.
    pub fn finish(
        &mut self,
        mut emit: impl FnMut(bool, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if !self.buf.is_empty() {
            emit(true, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// One parsed record of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub time: String,
    pub stream: String,
    pub full: bool,
    pub content: String,
}

pub fn parse_line(line: &str) -> Option<Record> {
    let mut it = line.splitn(4, ' ');
    let time = it.next()?.to_string();
    let stream = it.next()?.to_string();
    let tag = it.next()?;
    let content = it.next().unwrap_or("").to_string();
    if time.parse::<jiff::Timestamp>().is_err() || !matches!(tag, "P" | "F") {
        return None;
    }
    Some(Record {
        time,
        stream,
        full: tag == "F",
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_long_lines() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.feed(b"a\nbc", |f, c| {
            out.push((f, c.to_vec()));
            Ok(())
        })
        .unwrap();
        s.feed(b"d\n", |f, c| {
            out.push((f, c.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(out, vec![(true, b"a".to_vec()), (true, b"bcd".to_vec())]);
        let long = vec![b'x'; MAX_RECORD + 10];
        out.clear();
        s.feed(&long, |f, c| {
            out.push((f, c.to_vec()));
            Ok(())
        })
        .unwrap();
        s.finish(|f, c| {
            out.push((f, c.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(out.len(), 2);
        assert!(!out[0].0 && out[0].1.len() == MAX_RECORD);
        assert!(out[1].0 && out[1].1.len() == 10);
    }

    #[test]
    fn writes_parseable_records_and_rotates() {
        let d = std::env::temp_dir().join(format!("edge-rt-logtest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let p = d.join("c.log");
        let mut l = LogFile::open(&p, 2048, 3).unwrap();
        for i in 0..100 {
            l.record(Stream::Stdout, true, format!("line {i}").as_bytes())
                .unwrap();
        }
        let text = fs::read_to_string(&p).unwrap();
        let last = text.lines().last().unwrap();
        let r = parse_line(last).unwrap();
        assert_eq!(
            (r.stream.as_str(), r.full, r.content.as_str()),
            ("stdout", true, "line 99")
        );
        assert!(
            d.join("c.log.1").exists() && d.join("c.log.2").exists() && !d.join("c.log.3").exists()
        );
        assert!(fs::metadata(&p).unwrap().len() <= 2048);
        let _ = fs::remove_dir_all(&d);
    }
}
