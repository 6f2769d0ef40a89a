//! TLS settings shared by the connections ferry makes (MQTT brokers, HTTP sinks):
//! which certificate authorities to trust, and the client certificate to present.
//!
//! Without a `tls` table a connection trusts the public web roots compiled in
//! (`webpki-roots`, so a minimal image needs no CA bundle) and presents no client
//! certificate. `ca_file` replaces those roots with a private CA's, for a broker or
//! an ingress with an internal certificate; `cert_file` and `key_file` add a client
//! certificate for brokers and clouds that authenticate devices by certificate
//! (mutual TLS). Verification is always on: there is no switch to turn it off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// `tls = { ca_file, cert_file, key_file }`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the certificate authorities to trust instead of the public web
    /// roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (and its chain), for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    /// A secret: never logged.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("key_file {path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("cert_file and key_file go together: give both or neither")]
    HalfIdentity,
}

impl TlsConfig {
    /// The one mistake that needs no file: a certificate without its key or the
    /// other way round.
    pub fn check(&self) -> Result<(), TlsError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) | (None, Some(_)) => Err(TlsError::HalfIdentity),
            _ => Ok(()),
        }
    }

    /// Every file it names, with what it is, for `ferry check`.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("ca_file", self.ca_file.as_deref()),
            ("cert_file", self.cert_file.as_deref()),
            ("key_file", self.key_file.as_deref()),
        ]
        .into_iter()
        .filter_map(|(what, path)| Some((what, path?)))
    }

    /// A rustls client config from these settings; relative paths are resolved
    /// with `resolve`. Reads the files now: call it at start-up, so a missing or
    /// broken file stops the agent with a clear error instead of failing every
    /// connection.
    pub fn client_config(
        &self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<rustls::ClientConfig, TlsError> {
        self.check()?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                let path = resolve(path);
                for cert in certificates("ca_file", &path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        what: "ca_file",
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (resolve(cert), resolve(key));
                let chain = certificates("cert_file", &cert)?;
                let bytes = read("key_file", &key)?;
                let key_der = PrivateKeyDer::from_pem_slice(&bytes)
                    .map_err(|_| TlsError::NoKey { path: key.clone() })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::Invalid {
                        what: "cert_file",
                        path: cert,
                        message: e.to_string(),
                    })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The rustls config for a connection with optional `tls` settings: the public web
/// roots and no client certificate when there are none.
pub fn client_config(
    tls: Option<&TlsConfig>,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    tls.cloned()
        .unwrap_or_default()
        .client_config(resolve)
        .map(Arc::new)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_without_its_key_is_refused_before_any_file_is_read() {
        let half = TlsConfig {
            cert_file: Some("client.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(half.check(), Err(TlsError::HalfIdentity)));
        assert!(matches!(
            half.client_config(|p| p.to_path_buf()),
            Err(TlsError::HalfIdentity)
        ));
    }

    #[test]
    fn without_settings_the_public_roots_are_trusted_and_no_certificate_is_sent() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = client_config(None, |p| p.to_path_buf());
        assert!(config.is_ok_and(|c| !c.client_auth_cert_resolver.has_certs()));
    }

    #[test]
    fn a_file_without_a_certificate_or_key_says_which_file() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let ca = TlsConfig {
            ca_file: Some(junk.clone()),
            ..TlsConfig::default()
        };
        let err = ca
            .client_config(|p| p.to_path_buf())
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "ca_file {} holds no PEM certificate",
                junk.display()
            ))
        );
        let missing = TlsConfig {
            ca_file: Some(dir.path().join("nope.pem")),
            ..TlsConfig::default()
        };
        let err = missing.client_config(|p| p.to_path_buf()).err();
        assert!(matches!(
            err,
            Some(TlsError::Read {
                what: "ca_file",
                ..
            })
        ));
    }
}
