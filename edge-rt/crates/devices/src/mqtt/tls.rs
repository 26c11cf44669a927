//! TLS to an external broker (a plant's mosquitto, a cloud broker): rustls
//! with aws-lc, as everywhere in edge-rt; the broker's certificate checked
//! against the configured CA (or the system's roots) for the broker's
//! configured name; a client certificate if one is configured.
//!
//! The hub connects to the address it resolved itself (see [`super::hub`]),
//! so rumqttc hands rustls that address as the server name. The verifier
//! here checks the certificate against the name the operator configured
//! instead, so a broker named `broker.plant` is checked as `broker.plant`.
//! The price: no SNI is sent for a broker named by host (rustls sends none
//! for an address); a broker behind a proxy that routes by SNI needs its
//! address in the certificate and in `mqtt_broker`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0:?} is not a host name or address for TLS")]
    Name(String),
    #[error("CA certificates: {0}")]
    Ca(String),
    #[error("no CA certificates: none in the file and none in the system's store")]
    NoRoots,
    #[error("client certificate: {0}")]
    Client(String),
    #[error("TLS settings: {0}")]
    Config(#[from] rustls::Error),
}

/// A client configuration for a broker named `name`. `ca_pem`: the CAs to
/// trust (PEM, one or more); none: the system's (`/etc/ssl/certs`).
/// `client`: (certificate chain, key), both PEM.
pub fn client_config(
    name: &str,
    ca_pem: Option<&[u8]>,
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let name = ServerName::try_from(name.to_string()).map_err(|_| TlsError::Name(name.into()))?;
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| TlsError::Ca(e.to_string()))?;
                roots.add(c).map_err(|e| TlsError::Ca(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // One bad certificate in the system's store is not ours to fail on.
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Ca(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Named { inner, name }));
    let config = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Client(e.to_string()))?;
            if chain.is_empty() {
                return Err(TlsError::Client("no certificate in the file".into()));
            }
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Client(e.to_string()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// WebPKI verification, for the configured name rather than the one the
/// connection was made with.
#[derive(Debug)]
struct Named {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for Named {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_as: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_clear_errors() {
        let e = client_config("broker", Some(b"not a pem"), None).unwrap_err();
        assert!(matches!(e, TlsError::NoRoots | TlsError::Ca(_)), "{e}");
        let e = client_config("bad name!", None, None).unwrap_err();
        assert!(matches!(e, TlsError::Name(_)), "{e}");
    }
}
