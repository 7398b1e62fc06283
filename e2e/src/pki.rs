//! Throwaway PKI for one local control plane: a CA, the API server's serving
//! certificate (127.0.0.1/localhost plus any addresses the caller adds: the
//! underlay address nodes dial, the `kubernetes` Service IP), an admin client
//! certificate in `system:masters`, the service-account signing key, and
//! client certificates on demand (kubelets as `system:node:<name>`, the
//! scheduler, kube-proxy, the API server's kubelet client).

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub sa_key_pem: String,
    pub sa_pub_pem: String,
}

/// A client certificate and its key, PEM.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// `extra_sans`: more names or IP addresses for the serving certificate.
    pub fn generate(extra_sans: &[String]) -> Result<Pki> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "carve-e2e-ca");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let serving_key = KeyPair::generate()?;
        let mut sans: Vec<String> =
            ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
                .map(String::from)
                .into();
        sans.push("kubernetes.default.svc.cluster.local".into());
        sans.extend(extra_sans.iter().cloned());
        let mut serving = CertificateParams::new(sans)?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let sa_key = KeyPair::generate()?;
        let mut pki = Pki {
            ca_pem: ca.pem(),
            ca,
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            admin_cert_pem: String::new(),
            admin_key_pem: String::new(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        };
        let admin = pki.client_cert("carve-admin", Some("system:masters"))?;
        pki.admin_cert_pem = admin.cert_pem;
        pki.admin_key_pem = admin.key_pem;
        Ok(pki)
    }

    /// A client certificate for user `cn`, in `group` when given (rcgen keeps
    /// one attribute per type, so one group), signed by the CA.
    pub fn client_cert(&self, cn: &str, group: Option<&str>) -> Result<ClientCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(group) = group {
            params.distinguished_name.push(DnType::OrganizationName, group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
