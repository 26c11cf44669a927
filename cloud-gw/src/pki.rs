//! The link's PKI: a CA, the gateway's serving certificate, and node
//! certificates issued from the nodes' CSRs. A node certificate names its
//! node in the subject's common name (organisation `outrigger:nodes`); the
//! name comes from the authenticated join or the certificate being renewed,
//! never from what the CSR asks for: only the CSR's public key is used.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::keeper::{Keeper, KeeperError};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
/// The organisation of every node certificate.
pub const NODE_ORG: &str = "outrigger:nodes";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Keeper(#[from] KeeperError),
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no CA yet: run `cloud-gw init` first")]
    NoCa,
    #[error("a CA exists already; `--force` replaces it, and then every node must join again")]
    Exists,
    #[error("{0} is not valid PEM")]
    Pem(&'static str),
    #[error("bad CSR: {0}")]
    Csr(String),
    #[error("{0:?} is not a valid node name (a DNS label or subdomain)")]
    NodeName(String),
}

pub struct Pki {
    pub ca_cert_pem: String,
    ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

fn text(keeper: &dyn Keeper, name: &'static str) -> Result<Option<String>, PkiError> {
    Ok(keeper
        .get(name)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn validity(params: &mut CertificateParams, for_: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past, as clocks on gateways drift: five minutes, or
    // a tenth of a short lifetime (renewal is due at two thirds of it).
    let back = (for_.as_secs() / 10).min(300) as i64;
    params.not_before = now - time::Duration::seconds(back);
    params.not_after = now + time::Duration::seconds(for_.as_secs() as i64);
}

/// A DNS subdomain, as Kubernetes wants node names.
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Pki {
    /// Create the CA and a serving certificate for `sans` (DNS names or IP
    /// addresses the edges reach cloud-gw by).
    pub fn init(keeper: &dyn Keeper, sans: &[String], force: bool) -> Result<Pki, PkiError> {
        if keeper.get(CA_CERT)?.is_some() && !force {
            return Err(PkiError::Exists);
        }
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "outrigger link CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca, Duration::from_secs(10 * 365 * 86400));
        let ca_cert = ca.self_signed(&ca_key)?;
        let pki = Pki {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            server_cert_pem: String::new(),
            server_key_pem: String::new(),
        };
        let (cert, key) = pki.issue_server(sans)?;
        keeper.put(CA_KEY, pki.ca_key_pem.as_bytes())?;
        keeper.put(CA_CERT, pki.ca_cert_pem.as_bytes())?;
        keeper.put(SERVER_KEY, key.as_bytes())?;
        keeper.put(SERVER_CERT, cert.as_bytes())?;
        Pki::load(keeper)
    }

    pub fn load(keeper: &dyn Keeper) -> Result<Pki, PkiError> {
        Ok(Pki {
            ca_cert_pem: text(keeper, CA_CERT)?.ok_or(PkiError::NoCa)?,
            ca_key_pem: text(keeper, CA_KEY)?.ok_or(PkiError::NoCa)?,
            server_cert_pem: text(keeper, SERVER_CERT)?.ok_or(PkiError::NoCa)?,
            server_key_pem: text(keeper, SERVER_KEY)?.ok_or(PkiError::NoCa)?,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.ca_key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.ca_cert_pem, key)?)
    }

    fn issue_server(&self, sans: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(sans.to_vec())?;
        p.distinguished_name.push(DnType::CommonName, "cloud-gw");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, Duration::from_secs(2 * 365 * 86400));
        let cert = p.signed_by(&key, &self.issuer()?)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The CA certificate's DER.
    pub fn ca_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        CertificateDer::from_pem_slice(self.ca_cert_pem.as_bytes())
            .map_err(|_| PkiError::Pem(CA_CERT))
    }

    /// What a join token pins: the SHA-256 of the CA certificate (DER), hex.
    pub fn ca_pin(&self) -> Result<String, PkiError> {
        Ok(pin_of(&self.ca_der()?))
    }

    /// A node certificate for `node`, for the public key of `csr_pem`.
    pub fn issue_node(
        &self,
        node: &str,
        csr_pem: &str,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        if !valid_node_name(node) {
            return Err(PkiError::NodeName(node.into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, node);
        p.distinguished_name
            .push(DnType::OrganizationName, NODE_ORG);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, valid_for);
        let cert = p.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

pub fn pin_of(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::DirKeeper;

    #[test]
    fn init_issues_and_node_names_come_from_us_not_the_csr() {
        let d = tempfile::tempdir().unwrap();
        let k = DirKeeper::new(d.path());
        let pki = Pki::init(&k, &["127.0.0.1".into(), "cloud-gw.local".into()], false).unwrap();
        assert!(matches!(Pki::init(&k, &[], false), Err(PkiError::Exists)));
        assert_eq!(pki.ca_pin().unwrap().len(), 64);
        // A CSR asking for another name gets the one we give.
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil".to_string()]).unwrap();
        req.distinguished_name
            .push(DnType::CommonName, "someone-else");
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let pem = pki
            .issue_node("gw-1", &csr, Duration::from_secs(3600))
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["gw-1"]);
        assert!(pki
            .issue_node("Bad_Name", &csr, Duration::from_secs(1))
            .is_err());
        assert!(pki
            .issue_node("gw-1", "not a csr", Duration::from_secs(1))
            .is_err());
    }
}
