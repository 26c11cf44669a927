//! Serial lines and Modbus slaves for the device suites: a `socat` PTY pair
//! is the line (edge-rt opens one end as its serial port), and `pymodbus`
//! serves slaves on the other (`tests/modbus/slave.py`, driven by JSON
//! lines). A line can be cut (the PTY disappears, as a USB adapter pulled
//! out) and restored under the same path.
//!
//! PTYs refuse parity settings on this kernel (tcsetattr: EINVAL), so the
//! devices here use `parity: None`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A PTY pair: `edge` is the device edge-rt opens, `far` the slaves' end.
pub struct Line {
    pub edge: PathBuf,
    pub far: PathBuf,
    socat: Option<Child>,
}

fn wait_path(p: &Path) -> Result<()> {
    let t0 = Instant::now();
    while !p.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{} did not appear", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Line {
    pub fn new(dir: &Path, name: &str) -> Result<Line> {
        let mut l = Line {
            edge: dir.join(format!("{name}-edge")),
            far: dir.join(format!("{name}-far")),
            socat: None,
        };
        l.restore()?;
        Ok(l)
    }

    /// The PTYs go away, as when the adapter is pulled out.
    pub fn cut(&mut self) {
        if let Some(mut c) = self.socat.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.edge);
        let _ = std::fs::remove_file(&self.far);
    }

    /// New PTYs under the same paths.
    pub fn restore(&mut self) -> Result<()> {
        self.cut();
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.edge.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.far.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("socat (Debian's socat package)")?;
        self.socat = Some(child);
        wait_path(&self.edge)?;
        wait_path(&self.far)?;
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.cut();
    }
}

/// pymodbus serving slave ids on a line's far end.
pub struct Slaves {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Slaves {
    pub fn start(line: &Line, ids: &[u8]) -> Result<Slaves> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/modbus/slave.py");
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--port")
            .arg(&line.far)
            .arg("--slaves")
            .arg(ids.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 with pymodbus")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut s = Slaves {
            child,
            stdin,
            stdout,
        };
        s.read()
            .context("pymodbus did not start (pip install pymodbus==3.9.2)")?;
        Ok(s)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("from slave.py: {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("slave.py: {e}");
        }
        Ok(v["ok"].clone())
    }

    fn ask(&mut self, req: Value) -> Result<Value> {
        writeln!(self.stdin, "{req}")?;
        self.stdin.flush()?;
        self.read()
    }

    pub fn set(&mut self, slave: u8, table: &str, address: u16, values: &[u16]) -> Result<()> {
        self.ask(json!({"op": "set", "slave": slave, "table": table, "address": address, "values": values}))?;
        Ok(())
    }

    pub fn get(&mut self, slave: u8, table: &str, address: u16, count: u16) -> Result<Vec<u16>> {
        let v = self.ask(json!({"op": "get", "slave": slave, "table": table, "address": address, "count": count}))?;
        Ok(serde_json::from_value(v)?)
    }

    /// The slave stops answering (as one switched off), or answers again.
    pub fn mute(&mut self, slave: u8, muted: bool) -> Result<()> {
        let op = if muted { "mute" } else { "unmute" };
        self.ask(json!({"op": op, "slave": slave}))?;
        Ok(())
    }

    /// Answers with a bad CRC ("crc"), another slave's address ("slave"),
    /// or as they should be ("off").
    pub fn corrupt(&mut self, mode: &str) -> Result<()> {
        self.ask(json!({"op": "corrupt", "mode": mode}))?;
        Ok(())
    }

    /// Write requests the slave has had.
    pub fn writes(&mut self, slave: u8) -> Result<u64> {
        let v = self.ask(json!({"op": "writes", "slave": slave}))?;
        Ok(serde_json::from_value(v)?)
    }
}

impl Drop for Slaves {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A float32 as two registers, high word first.
pub fn float32_words(v: f32) -> [u16; 2] {
    let b = v.to_bits();
    [(b >> 16) as u16, b as u16]
}
