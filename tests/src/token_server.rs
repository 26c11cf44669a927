//! A registry token server for tests: the "Docker Registry v2 token
//! authentication" flow that Docker Hub, GHCR, Harbor and Quay use.
//!
//! The registry answers 401 with `WWW-Authenticate: Bearer realm=...,
//! service=..., scope=...`; the client asks the realm (with basic
//! credentials, or none) for a token; the realm returns a JWT signed by a key
//! whose certificate the registry trusts (`auth.token.rootcertbundle`). This
//! server is a real peer of Debian's `docker-registry` for that flow: it
//! checks the credentials, grants the scopes asked for, and signs RS256 JWTs
//! with `openssl dgst` (a key and certificate the harness makes with the test
//! CA), carrying the signer's certificate in the `x5c` header as
//! distribution 2.8 expects.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

use crate::registry::openssl;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const SERVICE: &str = "outrigger-test-registry";
pub const ISSUER: &str = "outrigger-test-token-issuer";

pub struct TokenServer {
    pub realm: String,
    /// Certificate the registry must trust for token signatures.
    pub signer_cert: PathBuf,
    /// Tokens issued so far (the tests check the flow really ran).
    pub issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: String,
}

struct Signer {
    key: PathBuf,
    x5c: String,
    user: String,
    password: String,
}

impl TokenServer {
    /// Start on a free 127.0.0.1 port, serving HTTPS with `server.crt` and
    /// `server.key` from `cert_dir` (the registry's own certificate, made by
    /// `registry::make_certs`), signing with a fresh RSA key certified by
    /// `ca.crt` there.
    pub fn start(cert_dir: &Path, user: &str, password: &str) -> Result<TokenServer> {
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "signer.key",
                "-out",
                "signer.csr",
                "-subj",
                "/CN=outrigger-token-signer",
            ],
            cert_dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "signer.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "signer.crt",
                "-days",
                "2",
            ],
            cert_dir,
        )?;
        let signer_pem = fs::read(cert_dir.join("signer.crt"))?;
        let signer_der = CertificateDer::from_pem_slice(&signer_pem)
            .map_err(|e| anyhow::anyhow!("signer certificate: {e}"))?;
        let signer = Arc::new(Signer {
            key: cert_dir.join("signer.key"),
            x5c: STANDARD.encode(signer_der.as_ref()),
            user: user.to_string(),
            password: password.to_string(),
        });

        let certs = CertificateDer::pem_file_iter(cert_dir.join("server.crt"))
            .map_err(|e| anyhow::anyhow!("server certificate: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("server certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_file(cert_dir.join("server.key"))
            .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
        );

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        {
            let (stop, issued) = (stop.clone(), issued.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (tls, signer, issued) = (tls.clone(), signer.clone(), issued.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = serve(conn, tls, &signer, &issued) {
                            eprintln!("token server: {e:#}");
                        }
                    });
                }
            });
        }
        Ok(TokenServer {
            realm: format!("https://{addr}/token"),
            signer_cert: cert_dir.join("signer.crt"),
            issued,
            stop,
            addr,
        })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
    }
}

fn serve(
    conn: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    signer: &Signer,
    issued: &AtomicUsize,
) -> Result<()> {
    let session = rustls::ServerConnection::new(tls)?;
    let mut stream = rustls::StreamOwned::new(session, conn);
    let mut reader = BufReader::new(&mut stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    drop(reader);
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match token_response(target, authorization.as_deref(), signer) {
        Ok(body) => {
            issued.fetch_add(1, Ordering::Relaxed);
            ("200 OK", body)
        }
        Err(e) => (
            "401 Unauthorized",
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": e.to_string()}]})
                .to_string(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    stream.conn.send_close_notify();
    let _ = stream.flush();
    Ok(())
}

/// Checks the request and returns the token response body.
fn token_response(target: &str, authorization: Option<&str>, signer: &Signer) -> Result<String> {
    let Some(("/token", query)) = target.split_once('?') else {
        bail!("not a token request: {target}");
    };
    let expected = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", signer.user, signer.password))
    );
    if authorization != Some(expected.as_str()) {
        bail!("wrong or missing credentials");
    }
    let mut access = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "service" && v != SERVICE {
            bail!("unknown service {v}");
        }
        if k == "scope" {
            // Several scopes may come space-separated in one parameter.
            for scope in v.split(' ') {
                let parts: Vec<&str> = scope.split(':').collect();
                if let [kind, name, actions] = parts[..] {
                    access.push(serde_json::json!({
                        "type": kind, "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }));
                }
            }
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [signer.x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": signer.user, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", std::process::id()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("input"), &signing_input)?;
    let key = signer.key.to_string_lossy().into_owned();
    let sig = openssl(&["dgst", "-sha256", "-sign", &key, "input"], dir.path())?;
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
    Ok(serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string())
}
