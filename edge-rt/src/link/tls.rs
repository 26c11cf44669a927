//! TLS settings of the link: trust by pin while joining, then mutual TLS
//! with the node certificate against the pinned CA.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use super::LinkError;

/// Signature schemes the link accepts.
static SIGNATURES: rustls::crypto::WebPkiSupportedAlgorithms = {
    use rustls::SignatureScheme as S;
    use webpki::aws_lc_rs::{ECDSA_P256_SHA256, ECDSA_P384_SHA384, ED25519};
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[ECDSA_P256_SHA256, ECDSA_P384_SHA384, ED25519],
        mapping: &[
            (S::ECDSA_NISTP256_SHA256, &[ECDSA_P256_SHA256]),
            (S::ECDSA_NISTP384_SHA384, &[ECDSA_P384_SHA384]),
            (S::ED25519, &[ED25519]),
        ],
    }
};

/// What the link offers: only what cloud-gw and edge-rt both use (TLS 1.3
/// AEADs, X25519), so the hello every reconnect sends stays small.
fn provider() -> Arc<CryptoProvider> {
    use rustls::{CipherSuite, NamedGroup};
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        )
    });
    p.kx_groups.retain(|g| g.name() == NamedGroup::X25519);
    // cloud-gw's keys are ECDSA (rcgen's default): no RSA schemes offered.
    p.signature_verification_algorithms = SIGNATURES;
    Arc::new(p)
}

/// Trusts a server whose chain carries a CA with this SHA-256, and whose
/// certificate that CA signed; remembers the CA.
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
    pub found: Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCa {
    pub fn new(pin: &str) -> PinnedCa {
        PinnedCa {
            pin: pin.to_ascii_lowercase(),
            provider: provider(),
            found: Mutex::new(None),
        }
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "cloud-gw's CA does not match the token's pin (wrong server, or a token for another cluster)".into(),
                )
            })?
            .clone()
            .into_owned();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Join-time TLS: no client certificate, the server trusted by pin.
pub fn join_config(verifier: Arc<PinnedCa>) -> Result<rustls::ClientConfig, LinkError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Link TLS: the node certificate, and only the pinned CA trusted.
pub fn link_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ClientConfig, LinkError> {
    let tls = |e: &dyn std::fmt::Display| LinkError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca_pem).map_err(|e| tls(&e))?;
    roots.add(ca).map_err(|e| tls(&e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls(&e))?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls(&e))
}
