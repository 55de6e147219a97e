//! How every part of spike reaches Redis: fred's config built from
//! `[redis]` (the URL, and TLS with the operator's CA and client
//! certificate), in one place so that `spike node`, `spike stock`, `spike
//! up` and `spike orders tail` connect alike; and the URL as messages may
//! print it, without its password.
//!
//! The PEM files are read and checked when the config file is loaded
//! ([`tls_files`]), so a bad one is an error that names the key and the
//! line, before anything connects.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fred::rustls::pki_types::pem::PemObject;
use fred::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use fred::rustls::{ClientConfig, RootCertStore};
use fred::types::config::{Config as FredConfig, TlsConfig, TlsConnector, TlsHostMapping};

/// Why a TLS file of `[redis]` was refused; the config adds the key and
/// the line.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not PEM, or holds none of what the key asks for.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused what the files hold (a CA that is no certificate, a
    /// key that does not go with its certificate).
    #[error("{path}: {message}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        message: String,
    },
    /// The system's trusted roots could not be read (they are used when
    /// there is no `tls_ca_file`).
    #[error("the system's trusted root certificates: {0}")]
    SystemRoots(String),
}

/// TLS to Redis beyond fred's defaults: a CA file (trusted instead of the
/// system's roots), a client certificate, or both. Built once, at load;
/// compared and printed by its files.
#[derive(Clone)]
pub struct RedisTls {
    /// `tls_ca_file`: the only roots trusted, when set.
    pub ca_file: Option<PathBuf>,
    /// `tls_cert_file` and `tls_key_file`: the certificate this client
    /// shows a Redis that asks for one (`tls-auth-clients yes`).
    pub client_files: Option<(PathBuf, PathBuf)>,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_file", &self.ca_file)
            .field("client_files", &self.client_files)
            .finish_non_exhaustive()
    }
}

impl PartialEq for RedisTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file && self.client_files == other.client_files
    }
}

impl Eq for RedisTls {}

/// A client certificate chain and its key, as read from their files.
pub struct ClientIdentity {
    /// `tls_cert_file`.
    pub cert_file: PathBuf,
    /// The chain, the client's own certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// `tls_key_file`.
    pub key_file: PathBuf,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file, at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::Pem {
            path: path.to_path_buf(),
            message: format!("not a PEM file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::Pem {
            path: path.to_path_buf(),
            message: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The roots of a CA file: every certificate in it, each one a trust
/// anchor rustls accepts.
pub fn read_ca(path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsFileError::Refused {
            path: path.to_path_buf(),
            message: format!("not a CA certificate rustls can trust: {e}"),
        })?;
    }
    Ok(roots)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsFileError::Pem {
        path: path.to_path_buf(),
        message: match e {
            fred::rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()
            }
            e => format!("not a PEM private key: {e}"),
        },
    })
}

/// The system's trusted roots, as fred uses them for a `rediss://` URL
/// alone.
fn system_roots() -> Result<RootCertStore, TlsFileError> {
    let found = fred::rustls_native_certs::load_native_certs();
    if let Some(e) = found.errors.first() {
        return Err(TlsFileError::SystemRoots(e.to_string()));
    }
    let mut roots = RootCertStore::empty();
    // One odd certificate in the system's store must not stop the others.
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    Ok(roots)
}

impl RedisTls {
    /// The rustls client config for `ca` (the system's roots without it)
    /// and `client`. An error of the client identity is about its key file.
    pub fn new(
        ca: Option<(PathBuf, RootCertStore)>,
        client: Option<ClientIdentity>,
    ) -> Result<RedisTls, TlsFileError> {
        let (ca_file, roots) = match ca {
            Some((path, roots)) => (Some(path), roots),
            None => (None, system_roots()?),
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let (config, client_files) = match client {
            None => (builder.with_no_client_auth(), None),
            Some(id) => {
                let config = builder
                    .with_client_auth_cert(id.chain, id.key)
                    .map_err(|e| TlsFileError::Refused {
                        path: id.key_file.clone(),
                        message: format!(
                            "not usable with the certificate of {}: {e}",
                            id.cert_file.display()
                        ),
                    })?;
                (config, Some((id.cert_file, id.key_file)))
            }
        };
        Ok(RedisTls {
            ca_file,
            client_files,
            config: Arc::new(config),
        })
    }
}

/// A `tls_*` setting refused at load: the key and the bytes of the file to
/// point at (the config turns them into its `FILE:LINE: key:` error), and
/// why.
#[derive(Debug)]
pub struct TlsRefusal {
    /// The dotted key (`redis.tls_ca_file`).
    pub key: &'static str,
    /// Where in the config file.
    pub span: Range<usize>,
    /// What is wrong, naming the PEM file.
    pub message: String,
}

/// The `tls_*` settings of `[redis]` (`tls_ca_file`, `tls_cert_file`,
/// `tls_key_file`, each its value and span), read and checked at load:
/// each is refused when the URL (`url`: whether TLS, and its span) is not
/// TLS (the file would be ignored, and the link left in plaintext), when
/// its file cannot be read or parsed, or when a certificate comes without
/// its key. Relative paths are from `dir`, the config file's folder. None
/// set: `None`, and a TLS URL trusts the system's roots through fred.
pub fn tls_files(
    dir: Option<&Path>,
    url: (bool, Range<usize>),
    [ca, cert, key]: [Option<(&str, Range<usize>)>; 3],
) -> Result<Option<RedisTls>, TlsRefusal> {
    const CA: &str = "redis.tls_ca_file";
    const CERT: &str = "redis.tls_cert_file";
    const KEY: &str = "redis.tls_key_file";
    let refuse = |key: &'static str, span: &Range<usize>, message: String| TlsRefusal {
        key,
        span: span.clone(),
        message,
    };
    for (name, setting) in [(CA, &ca), (CERT, &cert), (KEY, &key)] {
        let Some((value, span)) = setting else {
            continue;
        };
        if !url.0 {
            return Err(refuse(
                name,
                span,
                "needs a TLS URL (rediss://, rediss-cluster:// or rediss-sentinel://): with this URL the connection is plaintext and the file would be ignored".into(),
            ));
        }
        if value.trim().is_empty() {
            return Err(refuse(name, span, "must name a PEM file".into()));
        }
    }
    let path = |value: &str| {
        let p = Path::new(value.trim());
        match dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    };
    let ca = match &ca {
        Some((value, span)) => {
            let file = path(value);
            let roots = read_ca(&file).map_err(|e| refuse(CA, span, e.to_string()))?;
            Some((file, roots))
        }
        None => None,
    };
    let client = match (&cert, &key) {
        (None, None) => None,
        (Some((_, span)), None) => {
            return Err(refuse(
                CERT,
                span,
                "needs `tls_key_file`, the certificate's private key".into(),
            ));
        }
        (None, Some((_, span))) => {
            return Err(refuse(
                KEY,
                span,
                "needs `tls_cert_file`, the certificate of this key".into(),
            ));
        }
        (Some((cert, cert_span)), Some((key, key_span))) => {
            let (cert_file, key_file) = (path(cert), path(key));
            let chain =
                read_certs(&cert_file).map_err(|e| refuse(CERT, cert_span, e.to_string()))?;
            let key = read_key(&key_file).map_err(|e| refuse(KEY, key_span, e.to_string()))?;
            Some((
                key_span.clone(),
                ClientIdentity {
                    cert_file,
                    chain,
                    key_file,
                    key,
                },
            ))
        }
    };
    if ca.is_none() && client.is_none() {
        return Ok(None);
    }
    let (key_span, client) = match client {
        Some((span, id)) => (Some(span), Some(id)),
        None => (None, None),
    };
    RedisTls::new(ca, client).map(Some).map_err(|e| {
        // The system's roots are the URL's doing; anything else here is
        // the client identity, whose key did not fit.
        let (key, span) = match (&e, key_span) {
            (TlsFileError::SystemRoots(_), _) | (_, None) => ("redis.url", url.1.clone()),
            (_, Some(span)) => (KEY, span),
        };
        TlsRefusal {
            key,
            span,
            message: e.to_string(),
        }
    })
}

/// fred's config for `[redis]` (`url` and `tls`, the `tls_*` files): the
/// URL's (a `rediss` scheme alone trusts the system's roots), with the
/// files when the section has them. Every fred client of spike starts
/// from this. Given the two fields, not the section, so that this module
/// imports nothing of `config` (which imports it).
pub fn fred_config(url: &str, tls: Option<&RedisTls>) -> Result<FredConfig, fred::error::Error> {
    let mut config = FredConfig::from_url(url)?;
    if let Some(tls) = tls {
        config.tls = Some(TlsConfig {
            connector: TlsConnector::from((*tls.config).clone()),
            hostnames: TlsHostMapping::None,
        });
    }
    Ok(config)
}

/// `url` with its password (and a sentinel password in its query) shown
/// as `***`, for logs and error messages.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            // A lone user info is a user name to fred, but some clients
            // read it as the password: hidden either way.
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("sentinelPassword") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redacted("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("rediss://spike:pa:ss@cache.example:6380"),
            "rediss://spike:***@cache.example:6380"
        );
        assert_eq!(
            redacted("redis://:secret@127.0.0.1"),
            "redis://:***@127.0.0.1"
        );
        assert_eq!(
            redacted("redis://secret@127.0.0.1"),
            "redis://***@127.0.0.1"
        );
        assert_eq!(
            redacted(
                "redis-sentinel://u:p@127.0.0.1:26379/0?sentinelServiceName=s&sentinelPassword=x&node=h:1"
            ),
            "redis-sentinel://u:***@127.0.0.1:26379/0?sentinelServiceName=s&sentinelPassword=***&node=h:1"
        );
    }

    #[test]
    fn files_that_are_not_pem_say_so() {
        let dir = std::env::temp_dir().join(format!("spike-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let e = read_certs(&junk).expect_err("junk");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = read_key(&junk).expect_err("junk");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
        let e = read_ca(&dir.join("absent.pem")).expect_err("absent");
        assert!(e.to_string().contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
