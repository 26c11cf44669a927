//! A real OCI registry for tests: Debian's `docker-registry` (CNCF
//! distribution) on 127.0.0.1, with its own config, a test CA and
//! optionally basic auth (htpasswd, bcrypt) or bearer-token auth (with the
//! token server of `token_server`).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Registry {
    child: Child,
    pub addr: String,
    /// Directory holding `ca.crt` (skopeo's --dest-cert-dir).
    pub ca_dir: PathBuf,
    /// The CA certificate, PEM.
    pub ca_pem: PathBuf,
    pub creds: Option<(String, String)>,
    /// The token realm, when the registry uses bearer-token auth.
    pub token_server: Option<crate::token_server::TokenServer>,
    _dir: tempfile::TempDir,
}

/// How the registry authenticates clients.
pub enum Auth<'a> {
    Anonymous,
    /// htpasswd basic auth.
    Basic(&'a str, &'a str),
    /// Bearer tokens from a token server that checks these credentials.
    Token(&'a str, &'a str),
}

/// Run openssl in `cwd`; its standard output.
pub fn openssl(args: &[&str], cwd: &Path) -> Result<Vec<u8>> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// A CA and a server certificate for 127.0.0.1 and localhost.
pub fn make_certs(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=outrigger-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&a, dir)?;
    let mut b = vec!["req"];
    b.extend(ec);
    b.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&b, dir)?;
    fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    )
    .map(|_| ())
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Registry {
    /// Start a TLS registry, with basic auth when `creds` is given.
    pub fn start(creds: Option<(&str, &str)>) -> Result<Registry> {
        match creds {
            Some((u, p)) => Self::start_with(Auth::Basic(u, p)),
            None => Self::start_with(Auth::Anonymous),
        }
    }

    pub fn start_with(how: Auth) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        make_certs(d)?;
        let ca_dir = d.join("ca");
        fs::create_dir_all(&ca_dir)?;
        fs::copy(d.join("ca.crt"), ca_dir.join("ca.crt"))?;
        let port = free_port()?;
        let mut auth = String::new();
        let mut token_server = None;
        let creds = match how {
            Auth::Anonymous => None,
            Auth::Basic(u, p) => {
                let hash = bcrypt::hash(p, 5)?;
                fs::write(d.join("htpasswd"), format!("{u}:{hash}\n"))?;
                auth = format!(
                    "auth:\n  htpasswd:\n    realm: outrigger-test\n    path: {}\n",
                    d.join("htpasswd").display()
                );
                Some((u, p))
            }
            Auth::Token(u, p) => {
                use crate::token_server::{TokenServer, ISSUER, SERVICE};
                let ts = TokenServer::start(d, u, p)?;
                auth = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    ts.realm,
                    d.join("ca.crt").display()
                );
                token_server = Some(ts);
                Some((u, p))
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n{auth}",
            d.join("data").display(),
            d.join("server.crt").display(),
            d.join("server.key").display(),
        );
        fs::write(d.join("config.yml"), config)?;
        let log = fs::File::create(d.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian's docker-registry package)")?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not listen on {addr}: {}",
                    fs::read_to_string(d.join("registry.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry {
            child,
            addr,
            ca_pem: ca_dir.join("ca.crt"),
            ca_dir,
            creds: creds.map(|(u, p)| (u.to_string(), p.to_string())),
            token_server,
            _dir: dir,
        })
    }

    /// The registry's storage directory.
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Push tag `tag` of `layout` as `repo:tag`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> Result<String> {
        let dest = format!("{}/{repo}:{tag}", self.addr);
        let creds = self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        crate::fixtures::push(layout, tag, &dest, creds, Some(&self.ca_dir))?;
        Ok(dest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
