//! `[kafka.security]`: TLS and SASL for every Kafka client cdcflow opens (consumer, producer,
//! admin, changelog restore), and secrets that never show.
//!
//! A secret comes from exactly one of three places: the environment (`password_env`), a file
//! (`password_file`, the way Kubernetes and Docker mount secrets), or the config text itself
//! (`password`, for local use). Whichever it is, the value is read once at start-up into a
//! [`Secret`], whose `Debug` and `Display` print `***`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A password or key passphrase. Printing it, in any format, shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that hands it to librdkafka.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        struct SecretVisitor;
        // Every wrong type is refused without echoing the value, as serde's default would.
        impl Visitor<'_> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret(value.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom("expected a string (the value is not shown)"))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom("expected a string (the value is not shown)"))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom("expected a string (the value is not shown)"))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom("expected a string (the value is not shown)"))
            }
        }
        deserializer.deserialize_str(SecretVisitor)
    }
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "plaintext", alias = "PLAINTEXT")]
    Plaintext,
    #[serde(rename = "ssl", alias = "SSL")]
    Ssl,
    #[serde(rename = "sasl_plaintext", alias = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(rename = "sasl_ssl", alias = "SASL_SSL")]
    SaslSsl,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Plaintext => "plaintext",
            Protocol::Ssl => "ssl",
            Protocol::SaslPlaintext => "sasl_plaintext",
            Protocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, Protocol::Ssl | Protocol::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Protocol::SaslPlaintext | Protocol::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "GSSAPI")]
    Gssapi,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Gssapi => "GSSAPI",
        }
    }
}

/// `[kafka.security]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `GSSAPI`; required with SASL.
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user (PLAIN and SCRAM).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// The environment variable holding the SASL password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the SASL password (a trailing newline is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the brokers' certificates; default: the
    /// system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_password: Option<Secret>,
    #[serde(default)]
    pub key_password_env: Option<String>,
    #[serde(default)]
    pub key_password_file: Option<PathBuf>,
    /// Check that a broker's certificate names the host connected to. Default true; turn it
    /// off only for brokers addressed by a name their certificate lacks.
    #[serde(default = "default_true")]
    pub verify_hostname: bool,
    /// GSSAPI: the brokers' Kerberos service name. Default `kafka`.
    #[serde(default)]
    pub kerberos_service_name: Option<String>,
    /// GSSAPI: this client's principal.
    #[serde(default)]
    pub kerberos_principal: Option<String>,
    /// GSSAPI: the keytab holding the principal's key.
    #[serde(default)]
    pub kerberos_keytab: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            protocol: Protocol::default(),
            sasl_mechanism: None,
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            key_password_env: None,
            key_password_file: None,
            verify_hostname: true,
            kerberos_service_name: None,
            kerberos_principal: None,
            kerberos_keytab: None,
        }
    }
}

/// The security settings with their secrets read, ready for every client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSecurity {
    pub protocol: Protocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Where the password came from, for `cdcflow check`: `env CDCFLOW_KAFKA_PASSWORD`, ...
    pub password_source: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub key_password: Option<Secret>,
    pub verify_hostname: bool,
    pub kerberos_service_name: Option<String>,
    pub kerberos_principal: Option<String>,
    pub kerberos_keytab: Option<PathBuf>,
}

impl Default for ClientSecurity {
    /// Plaintext, what a config without `[kafka.security]` resolves to.
    fn default() -> Self {
        ClientSecurity {
            protocol: Protocol::Plaintext,
            sasl_mechanism: None,
            username: None,
            password: None,
            password_source: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            verify_hostname: true,
            kerberos_service_name: None,
            kerberos_principal: None,
            kerberos_keytab: None,
        }
    }
}

/// Why the security settings cannot be used: the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityError {
    pub key: String,
    pub message: String,
}

fn error(key: &str, message: impl Into<String>) -> SecurityError {
    SecurityError {
        key: format!("kafka.security.{key}"),
        message: message.into(),
    }
}

impl SecurityConfig {
    /// Checks the settings and reads the secrets from where they are kept. `env` looks up an
    /// environment variable.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ClientSecurity, SecurityError> {
        let password_set =
            self.password.is_some() || self.password_env.is_some() || self.password_file.is_some();
        let protocol = self.protocol;
        if protocol.uses_sasl() {
            let mechanism = self.sasl_mechanism.ok_or_else(|| {
                error(
                    "sasl_mechanism",
                    format!(
                        "protocol `{}` needs a SASL mechanism: set sasl_mechanism to PLAIN, \
                         SCRAM-SHA-256, SCRAM-SHA-512 or GSSAPI",
                        protocol.as_str()
                    ),
                )
            })?;
            if mechanism == SaslMechanism::Gssapi {
                if self.kerberos_principal.is_none() {
                    return Err(error(
                        "kerberos_principal",
                        "GSSAPI needs this client's Kerberos principal (and kerberos_keytab)",
                    ));
                }
            } else {
                if self.username.is_none() {
                    return Err(error(
                        "username",
                        format!("{} needs a username", mechanism.as_str()),
                    ));
                }
                if !password_set {
                    return Err(error(
                        "password_env",
                        format!(
                            "{} needs a password: set password_env (an environment variable) \
                             or password_file (a file), or password inline",
                            mechanism.as_str()
                        ),
                    ));
                }
            }
        } else {
            for (key, set) in [
                ("sasl_mechanism", self.sasl_mechanism.is_some()),
                ("username", self.username.is_some()),
                ("password", password_set),
            ] {
                if set {
                    return Err(error(
                        key,
                        format!(
                            "protocol `{}` does not use SASL: set protocol to sasl_ssl (or \
                             sasl_plaintext), or delete {key}",
                            protocol.as_str()
                        ),
                    ));
                }
            }
        }
        let tls_files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        for (key, file) in tls_files {
            let Some(file) = file else { continue };
            if !protocol.uses_tls() {
                return Err(error(
                    key,
                    format!(
                        "protocol `{}` does not use TLS: set protocol to ssl or sasl_ssl, or \
                         delete {key}",
                        protocol.as_str()
                    ),
                ));
            }
            if !file.is_file() {
                return Err(error(
                    key,
                    format!("`{}` is not a readable file", file.display()),
                ));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(error(
                if self.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                },
                "mutual TLS needs both cert_file and key_file",
            ));
        }
        let password = read_secret(
            "password",
            self.password.as_ref(),
            self.password_env.as_deref(),
            self.password_file.as_deref(),
            &env,
        )?;
        let key_password = read_secret(
            "key_password",
            self.key_password.as_ref(),
            self.key_password_env.as_deref(),
            self.key_password_file.as_deref(),
            &env,
        )?;
        if key_password.is_some() && self.key_file.is_none() {
            return Err(error(
                "key_password",
                "a key password needs key_file: set key_file or delete the key password",
            ));
        }
        Ok(ClientSecurity {
            protocol,
            sasl_mechanism: self.sasl_mechanism.filter(|_| protocol.uses_sasl()),
            username: self.username.clone(),
            password_source: password.as_ref().map(|(_, source)| source.clone()),
            password: password.map(|(secret, _)| secret),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            key_password: key_password.map(|(secret, _)| secret),
            verify_hostname: self.verify_hostname,
            kerberos_service_name: self.kerberos_service_name.clone(),
            kerberos_principal: self.kerberos_principal.clone(),
            kerberos_keytab: self.kerberos_keytab.clone(),
        })
    }
}

/// A secret from the one place it is kept, with that place in words.
fn read_secret(
    key: &str,
    inline: Option<&Secret>,
    env_name: Option<&str>,
    file: Option<&Path>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<(Secret, String)>, SecurityError> {
    let places = [inline.is_some(), env_name.is_some(), file.is_some()];
    if places.iter().filter(|set| **set).count() > 1 {
        return Err(error(
            key,
            format!("set only one of {key}, {key}_env and {key}_file"),
        ));
    }
    if let Some(secret) = inline {
        return Ok(Some((secret.clone(), "the config".to_owned())));
    }
    if let Some(name) = env_name {
        return match env(name) {
            Some(value) if !value.is_empty() => Ok(Some((
                Secret(value),
                format!("environment variable {name}"),
            ))),
            _ => Err(error(
                &format!("{key}_env"),
                format!("environment variable `{name}` is not set or empty; export it"),
            )),
        };
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|io| {
            error(
                &format!("{key}_file"),
                format!("cannot read `{}`: {io}", path.display()),
            )
        })?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(error(
                &format!("{key}_file"),
                format!("`{}` is empty", path.display()),
            ));
        }
        return Ok(Some((
            Secret(value.to_owned()),
            format!("file {}", path.display()),
        )));
    }
    Ok(None)
}

impl ClientSecurity {
    /// The librdkafka properties of these settings, secrets included: for the client
    /// configs only, never for printing.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = vec![("security.protocol", self.protocol.as_str().to_owned())];
        if let Some(mechanism) = self.sasl_mechanism {
            properties.push(("sasl.mechanism", mechanism.as_str().to_owned()));
        }
        if let Some(username) = &self.username {
            properties.push(("sasl.username", username.clone()));
        }
        if let Some(password) = &self.password {
            properties.push(("sasl.password", password.expose().to_owned()));
        }
        for (property, file) in [
            ("ssl.ca.location", &self.ca_file),
            ("ssl.certificate.location", &self.cert_file),
            ("ssl.key.location", &self.key_file),
            ("sasl.kerberos.keytab", &self.kerberos_keytab),
        ] {
            if let Some(file) = file {
                properties.push((property, file.display().to_string()));
            }
        }
        if let Some(password) = &self.key_password {
            properties.push(("ssl.key.password", password.expose().to_owned()));
        }
        if self.protocol.uses_tls() {
            properties.push((
                "ssl.endpoint.identification.algorithm",
                if self.verify_hostname {
                    "https"
                } else {
                    "none"
                }
                .to_owned(),
            ));
        }
        if let Some(name) = &self.kerberos_service_name {
            properties.push(("sasl.kerberos.service.name", name.clone()));
        }
        if let Some(principal) = &self.kerberos_principal {
            properties.push(("sasl.kerberos.principal", principal.clone()));
        }
        properties
    }

    /// The `builtin.features` of librdkafka these settings need, each with what needs it.
    pub fn required_features(&self) -> Vec<(&'static str, String)> {
        let mut features = Vec::new();
        if self.protocol.uses_tls() {
            features.push((
                "ssl",
                format!("kafka.security.protocol = \"{}\"", self.protocol.as_str()),
            ));
        }
        let mechanism_feature = match self.sasl_mechanism {
            Some(SaslMechanism::Plain) => Some("sasl_plain"),
            Some(SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512) => Some("sasl_scram"),
            Some(SaslMechanism::Gssapi) => Some("sasl_gssapi"),
            None => None,
        };
        if let (Some(feature), Some(mechanism)) = (mechanism_feature, self.sasl_mechanism) {
            features.push((
                feature,
                format!("kafka.security.sasl_mechanism = \"{}\"", mechanism.as_str()),
            ));
        }
        features
    }

    /// What `cdcflow check` shows: every setting, each secret only as where it comes from.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("protocol {}", self.protocol.as_str())];
        if let Some(mechanism) = self.sasl_mechanism {
            parts.push(format!("SASL {}", mechanism.as_str()));
        }
        if let Some(username) = &self.username {
            parts.push(format!("user `{username}`"));
        }
        if let Some(source) = &self.password_source {
            parts.push(format!("password from {source}"));
        }
        if let Some(file) = &self.ca_file {
            parts.push(format!("CA {}", file.display()));
        }
        if let Some(file) = &self.cert_file {
            parts.push(format!("client certificate {}", file.display()));
        }
        if self.protocol.uses_tls() && !self.verify_hostname {
            parts.push("hostname not verified".to_owned());
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests;
