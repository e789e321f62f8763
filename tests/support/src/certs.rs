//! Certificates made at test time, for TLS tests: a CA, a broker certificate it signs, a
//! client certificate it signs, a broker certificate that has expired, and a second CA that
//! signs nothing a broker shows (the "wrong CA").
//!
//! Exists so that TLS tests need no checked-in keys: every run makes its own, in a temp
//! dir removed on drop.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

use crate::SupportError;

/// The DNS name, besides `localhost` and 127.0.0.1, that the broker certificate carries
/// (for tests of a configured `server_name`).
pub const TEST_SERVER_NAME: &str = "rabbit.warren.test";

/// A directory of PEM files: `ca.pem`, `server.pem` + `server.key`, `client.pem` +
/// `client.key`, `expired.pem` + `expired.key` (a broker certificate past its date),
/// `other-ca.pem` (a CA that signed none of them).
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Makes every certificate and key (ECDSA P-256) and writes them.
    pub fn generate() -> Result<TestCerts, SupportError> {
        let dir = tempfile::Builder::new()
            .prefix("warren-test-certs-")
            .tempdir()
            .map_err(|e| SupportError::io("creating the certificates dir", e))?;
        let certs = TestCerts { dir };
        let (ca_pem, ca_key) = ca("warren test CA")?;
        certs.write("ca.pem", &ca_pem)?;
        let issuer = Issuer::new(ca_params("warren test CA")?, ca_key);

        let mut server = leaf("warren test broker", ExtendedKeyUsagePurpose::ServerAuth)?;
        server.subject_alt_names = vec![
            SanType::DnsName(dns("localhost")?),
            SanType::DnsName(dns(TEST_SERVER_NAME)?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        certs.signed("server", &server, &issuer)?;

        let mut expired = server.clone();
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        certs.signed("expired", &expired, &issuer)?;

        let client = leaf("warren test client", ExtendedKeyUsagePurpose::ClientAuth)?;
        certs.signed("client", &client, &issuer)?;

        let (other, _) = ca("another CA")?;
        certs.write("other-ca.pem", &other)?;
        Ok(certs)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One of the files, by name (e.g. `"ca.pem"`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn signed(
        &self,
        name: &str,
        params: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
    ) -> Result<(), SupportError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.signed_by(&key, issuer).map_err(cert_error)?;
        self.write(&format!("{name}.pem"), &cert.pem())?;
        self.write(&format!("{name}.key"), &key.serialize_pem())
    }

    fn write(&self, name: &str, text: &str) -> Result<(), SupportError> {
        std::fs::write(self.path(name), text)
            .map_err(|e| SupportError::io(format!("writing {name}"), e))
    }
}

/// A self-signed CA: its PEM certificate and its key.
fn ca(name: &str) -> Result<(String, KeyPair), SupportError> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = ca_params(name)?.self_signed(&key).map_err(cert_error)?;
    Ok((cert.pem(), key))
}

fn ca_params(name: &str) -> Result<CertificateParams, SupportError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn leaf(name: &str, usage: ExtendedKeyUsagePurpose) -> Result<CertificateParams, SupportError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    Ok(params)
}

fn dns(name: &str) -> Result<rcgen::string::Ia5String, SupportError> {
    name.try_into().map_err(cert_error)
}

fn cert_error(error: rcgen::Error) -> SupportError {
    SupportError::InvalidState(format!("making a test certificate: {error}"))
}
