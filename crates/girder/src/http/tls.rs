//! TLS for the HTTP API: a certificate chain and its private key from PEM files, served with
//! rustls (ring), HTTP/1.1 only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("cannot read a PEM certificate chain from {path}: {message}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key file could not be read or holds no PEM private key.
    #[error("cannot read a PEM private key from {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong (never the key itself).
        message: String,
    },
    /// rustls refused the pair, e.g. a key that does not belong to the certificate.
    #[error("the certificate and key cannot serve TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// A server configuration for [`super::ServerConfig::tls`] from a PEM certificate chain
/// (the server's certificate first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_error = |message: String| TlsError::Certificate { path: cert_pem.to_owned(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no CERTIFICATE block in the file".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| TlsError::Key { path: key_pem.to_owned(), message: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
