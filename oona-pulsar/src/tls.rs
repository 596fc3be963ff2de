//! TLS settings for `pulsar+ssl://` consumer connections.

use std::sync::Arc;

use oona_core::{Error, ErrorKind, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::NAME;

/// The web PKI roots plus the CAs of `ca_file` (PEM), with the `ring`
/// provider (no OpenSSL, no aws-lc).
pub(crate) fn client_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in read_pem(path)? {
            roots.add(cert).map_err(|e| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `tls_ca_file`: {path}: {e}"),
                )
                .with_transport(NAME)
            })?;
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            Error::new(ErrorKind::Internal, format!("TLS setup: {e}")).with_transport(NAME)
        })
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The certificates of a PEM file.
pub(crate) fn read_pem(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::ConfigInvalid,
            format!("query parameter `tls_ca_file`: {path}: {why}"),
        )
        .with_transport(NAME)
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}
