//! Peer identities: a key pair and a self-signed certificate per host, recognised by the
//! SHA-256 fingerprint of the certificate (pinning, as `ssh` pins host keys).
//!
//! Both sides present a certificate (mutual TLS) and each accepts exactly the fingerprint it
//! was configured with, so an unauthenticated peer is refused during the TLS handshake, before
//! a single frame is read.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::TransportError;

/// File names inside an identity directory.
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// The SHA-256 of a certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }

    /// Parses 64 hex digits, optionally with `:` separators and a `sha256:` prefix.
    pub fn parse(text: &str) -> Result<Self, TransportError> {
        let text = text.trim();
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|e| {
            TransportError::BadIdentity(format!(
                "fingerprint {text:?} is not 64 hex digits (sha256): {e}"
            ))
        })?;
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A host's certificate and private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl Identity {
    /// Makes a new ECDSA P-256 key and a self-signed certificate for it.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| TransportError::BadIdentity(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![name.to_string()])
            .map_err(|e| TransportError::BadIdentity(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| TransportError::BadIdentity(e.to_string()))?;
        Ok(Self {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `cert.pem` and `key.pem` (mode 0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), TransportError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io =
            |what, path: PathBuf| move |source| TransportError::Identity { what, path, source };
        std::fs::create_dir_all(dir).map_err(io("create directory", dir.to_path_buf()))?;
        let cert_path = dir.join(CERT_FILE);
        std::fs::write(&cert_path, &self.cert_pem).map_err(io("write", cert_path.clone()))?;
        let key_path = dir.join(KEY_FILE);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io("create", key_path.clone()))?;
        file.write_all(self.key_pem.as_bytes())
            .map_err(io("write", key_path.clone()))?;
        Ok(())
    }

    /// Reads `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TransportError::Identity {
                what: "read",
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let bad = |path: &Path, e: rustls::pki_types::pem::Error| {
            TransportError::BadIdentity(format!("{}: {e}", path.display()))
        };
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(&cert_path, e))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&key_path, e))?;
        Ok(Self {
            cert,
            key,
            cert_pem,
            key_pem,
        })
    }

    /// This identity's fingerprint, which the peer must be configured with.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    pub(crate) fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Accepts exactly one certificate, by fingerprint, and checks the handshake signature with
/// it. Used on both sides: as the client's server verifier and the server's client verifier.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub(crate) fn new(expected: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        Self { expected, provider }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let actual = Fingerprint::of(cert);
        if actual == self.expected {
            Ok(())
        } else {
            tracing::warn!(%actual, expected = %self.expected, "refusing peer: certificate fingerprint is not the configured one");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::generate("tern").unwrap();
        identity.save(dir.path()).unwrap();
        let loaded = Identity::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), identity.fingerprint());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn fingerprint_parses_its_own_display_and_colon_form() {
        let fp = Identity::generate("x").unwrap().fingerprint();
        assert_eq!(Fingerprint::parse(&fp.to_string()).unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), fp);
        assert!(Fingerprint::parse("abc").is_err());
    }
}
