//! Certificate verifiers that add SPIFFE identity checks to webpki's chain checks.
//!
//! rustls verifies a chain to the trust bundle and then a DNS name or IP address; mesh peers
//! are named by the SPIFFE ID in their URI SAN instead. Both verifiers here delegate the
//! chain, validity period and signature checks to rustls' webpki verifiers unchanged, then
//! read the one SPIFFE ID and check it against the allowed identities. A refusal is an
//! `rustls::Error` carrying an [`IdentityError`], so the handshake-failure metric can name
//! its reason (see [`super::failure_reason`]).

use super::spiffe::{spiffe_id_of, IdentityError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// Which identities a verifier accepts.
#[derive(Debug, Clone)]
pub enum Allowed {
    /// Any SPIFFE ID the trust bundle vouches for.
    Any,
    /// Exactly these SPIFFE IDs.
    Only(Arc<[String]>),
}

impl Allowed {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let id = spiffe_id_of(cert).map_err(refusal)?;
        match self {
            Allowed::Any => Ok(()),
            Allowed::Only(ids) if ids.iter().any(|a| a == id.as_str()) => Ok(()),
            Allowed::Only(_) => Err(refusal(IdentityError::NotAllowed(id.to_string()))),
        }
    }
}

fn refusal(e: IdentityError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Server side: a client must present a certificate that chains to the bundle and carries
/// an allowed SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Allowed,
}

impl SpiffeClientVerifier {
    /// `inner` is the webpki verifier built from the trust bundle.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, allowed: Allowed) -> Self {
        Self { inner, allowed }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allowed.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the upstream must present a certificate that chains to the bundle and
/// carries one of the cluster's allowed SPIFFE IDs. The server name (SNI or the endpoint's
/// IP) is not what identifies a mesh peer, so webpki's name mismatch is not an error here;
/// webpki checks the name last, after the chain, validity and signatures have passed.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    allowed: Allowed,
}

impl SpiffeServerVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, allowed: Allowed) -> Self {
        Self { inner, allowed }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        self.allowed.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
