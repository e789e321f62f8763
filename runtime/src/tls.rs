//! TLS for `amqps://` brokers: the operator's `[tls]` files, checked once when the
//! configuration is loaded (read, PEM parsed, the key matched to its certificate) and
//! turned into one rustls client configuration that every connection shares, and the
//! connect step that wraps a broker's TCP stream in it.
//!
//! Trust: the CA bundle of `tls.ca_file` when it is given (and then only it, as with
//! Erlang's `cacertfile` or a Java trust store), else the system's root certificates. A
//! client certificate (`tls.cert_file` + `tls.key_file`) is offered when the broker asks
//! for one (mTLS). The name a broker's certificate must carry is its `server_name` when
//! configured, else the host of its URI.
//!
//! Owns: [`Tls`], [`TlsFiles`], [`TlsError`], [`connect`]. Must not touch: connection
//! lifecycles (the connection actor's), URIs (`uri`), where the settings are written
//! (`config`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector, TLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// The files of `[tls]`, as paths already resolved against the config file's directory.
///
/// It exists so that the configuration names what to read and [`Tls::load`] reads it,
/// once, reporting each file's problem on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain offered to brokers that ask for a client certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// Which `[tls]` key a [`TlsError`] is about, so the configuration can point at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsKey {
    CaFile,
    CertFile,
    KeyFile,
}

/// Why the TLS settings cannot be used.
///
/// It exists to give each mistake with certificates a sentence naming the file, so that
/// the service refuses to start with it (exit 2) rather than failing every handshake.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A file that cannot be read at all.
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        reason: String,
    },
    /// A file that should hold PEM certificates holds none (or broken ones).
    #[error("{} holds no usable PEM certificate (-----BEGIN CERTIFICATE-----){}", path.display(), detail(reason))]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// The PEM reader's complaint, if it had one.
        reason: Option<String>,
    },
    /// A key file that holds no private key rustls can read.
    #[error("{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1){}", path.display(), detail(reason))]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What was wrong with it, if known.
        reason: Option<String>,
    },
    /// The private key is not the one of the certificate.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// A CA bundle whose certificates rustls cannot use as roots.
    #[error("{}: {reason}", path.display())]
    BadRoots {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No CA file and no readable system root certificates.
    #[error(
        "no trusted root certificates: the system store is empty or unreadable ({reason}); set tls.ca_file"
    )]
    NoSystemRoots {
        /// What loading the system store said.
        reason: String,
    },
    /// rustls refused its own default protocol versions (a build without TLS 1.2/1.3).
    #[error("the TLS library cannot be set up: {reason}")]
    Provider {
        /// What rustls said.
        reason: String,
    },
}

fn detail(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default()
}

/// The checked TLS client settings, ready to connect: shared by every `amqps://`
/// connection of the node (so rustls can resume sessions).
///
/// It exists so that certificates are read and checked once, when the configuration is
/// loaded, and a connection only hands its stream to rustls.
#[derive(Clone)]
pub struct Tls {
    connector: RustlsConnector,
    /// The same settings for connections warren opens itself (AMQP 1.0).
    config: Arc<ClientConfig>,
    files: TlsFiles,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for Tls {}

impl Tls {
    /// Reads and checks `files`; says which key is wrong when one is.
    pub fn load(files: TlsFiles) -> Result<Tls, (TlsKey, TlsError)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &files.ca_file {
            Some(path) => {
                let certs = certificates(path).map_err(|error| (TlsKey::CaFile, error))?;
                let mut roots = RootCertStore::empty();
                let (added, ignored) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    let reason = format!("none of its {ignored} certificates is a usable CA");
                    return Err((
                        TlsKey::CaFile,
                        TlsError::BadRoots {
                            path: path.clone(),
                            reason,
                        },
                    ));
                }
                roots
            }
            None => system_roots().map_err(|error| (TlsKey::CaFile, error))?,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| {
                let reason = error.to_string();
                (TlsKey::CaFile, TlsError::Provider { reason })
            })?
            .with_root_certificates(roots);
        let config = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert).map_err(|error| (TlsKey::CertFile, error))?;
                let private = private_key(key).map_err(|error| (TlsKey::KeyFile, error))?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|error| (TlsKey::KeyFile, key_problem(error, key, cert)))?
            }
            // Half an identity is refused by the configuration before it gets here.
            _ => builder.with_no_client_auth(),
        };
        let config = Arc::new(config);
        Ok(Tls {
            connector: RustlsConnector::from(config.clone()),
            config,
            files,
        })
    }

    /// The rustls client settings, for a TLS stream warren opens itself (AMQP 1.0).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The files these settings were read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Whether `name` can be checked against a certificate (a DNS name or an IP address).
pub fn valid_server_name(name: &str) -> bool {
    ServerName::try_from(name).is_ok()
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            reason: None,
        }),
        Err(error) => Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            reason: Some(error.to_string()),
        }),
    }
}

/// The first private key of a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| TlsError::NoKey {
        path: path.to_path_buf(),
        reason: Some(error.to_string()),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Unreadable {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })
}

/// What rustls refusing a certificate and key means for the operator.
fn key_problem(error: rustls::Error, key: &Path, cert: &Path) -> TlsError {
    match error {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            key: key.to_path_buf(),
            cert: cert.to_path_buf(),
        },
        other => TlsError::NoKey {
            path: key.to_path_buf(),
            reason: Some(other.to_string()),
        },
    }
}

/// The system's root certificates (the default trust).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let reason = loaded
            .errors
            .first()
            .map_or_else(|| "no certificates found".to_string(), |e| e.to_string());
        return Err(TlsError::NoSystemRoots { reason });
    }
    Ok(roots)
}

/// Opens a connection to an `amqps://` broker: TCP, then the TLS handshake with
/// `tls` checking the broker's certificate for `server_name`, then AMQP.
pub async fn connect(
    uri: AMQPUri,
    tls: &Tls,
    server_name: &str,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    let connector = tls.connector.clone();
    let server_name = server_name.to_string();
    Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            // TCP as lapin opens it, then our own handshake.
            let mut plain = uri.clone();
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain
                .connect_with_config_async(TLSConfig::default(), &runtime)
                .await?;
            stream
                .into_rustls(&connector, &server_name)
                .await
                .map_err(|error| handshake_error(error, &uri, &server_name))
                .map_err(lapin::Error::from)
        },
        properties,
    )
    .await
}

/// A failed handshake, said with where it went, what name was checked and, for the
/// usual mistakes, what to change.
fn handshake_error(error: io::Error, uri: &AMQPUri, server_name: &str) -> io::Error {
    use rustls::{AlertDescription, CertificateError};
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let hint = match rustls_error {
        Some(rustls::Error::InvalidCertificate(certificate)) => match certificate {
            CertificateError::UnknownIssuer => {
                " (the broker's certificate is not signed by a trusted CA: check tls.ca_file)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                " (the broker's certificate does not carry this name: set the broker's server_name)"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                " (the broker's certificate has expired)"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                " (the broker's certificate is not valid yet: check the clocks)"
            }
            _ => "",
        },
        Some(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure,
        )) => " (the broker may require a client certificate: set tls.cert_file and tls.key_file)",
        _ => "",
    };
    io::Error::new(
        error.kind(),
        format!(
            "TLS handshake with {}:{} (server name {server_name}) failed: {error}{hint}",
            uri.authority.host, uri.authority.port
        ),
    )
}
