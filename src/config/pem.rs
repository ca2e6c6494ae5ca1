//! The admin endpoint's TLS files, read from PEM: the server certificate
//! chain and key, and an optional CA for client certificates. Validation
//! loads them once (so `check` reports a bad file with its key path); the
//! admin endpoint loads them again when they change.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::AdminTls;

/// Why the TLS files could not be used, and which config key names the
/// file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// `tls_cert`, `tls_key` or `client_ca`.
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "admin.{}: {}", self.key, self.message)
    }
}

impl std::error::Error for TlsError {}

fn err(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        key,
        message: message.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Reads and checks the files and builds the server's TLS config.
pub fn load(files: &AdminTls) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("tls_cert", &files.cert)?;
    let pem = zeroize::Zeroizing::new(read("tls_key", &files.key)?);
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        err(
            "tls_key",
            format!("{}: no usable private key in PEM form ({e})", files.key.display()),
        )
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls_cert", e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("client_ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| err("client_ca", format!("{}: {e}", ca.display())))?;
            }
            // Clients without a certificate may still read (probes and
            // scrapers rarely carry one); only verified ones may mutate.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| err("client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        err(
            "tls_key",
            format!(
                "{} and {} do not make a usable certificate and key: {e}",
                files.cert.display(),
                files.key.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
