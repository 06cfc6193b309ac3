//! What this binary's librdkafka can do (`builtin.features`), and the start-up check that a
//! config asks for nothing it lacks: a TLS listener, a SASL mechanism or a compression codec
//! the library was built without fails at start-up with its name, not at the first connection.

use rdkafka::ClientConfig;

use super::error::ServiceError;
use crate::config::KafkaConfig;

/// librdkafka's version and features, as linked into this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLibrary {
    pub version: String,
    pub features: Vec<String>,
}

impl ClientLibrary {
    pub fn linked() -> ClientLibrary {
        let (_, version) = rdkafka::util::get_rdkafka_version();
        let features = ClientConfig::new()
            .create_native_config()
            .and_then(|native| native.get("builtin.features"))
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|feature| !feature.is_empty())
            .map(str::to_owned)
            .collect();
        ClientLibrary { version, features }
    }

    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|built| built == feature)
    }

    /// The first feature `kafka` needs that this library lacks.
    pub fn check(&self, kafka: &KafkaConfig) -> Result<(), ServiceError> {
        match required_features(kafka)
            .into_iter()
            .find(|(feature, _)| !self.has(feature))
        {
            None => Ok(()),
            Some((feature, needed_by)) => Err(ServiceError::MissingFeature {
                feature: feature.to_owned(),
                needed_by,
                version: self.version.clone(),
                features: self.features.join(","),
            }),
        }
    }
}

/// Every `builtin.features` entry `kafka` needs, with the setting that needs it.
pub fn required_features(kafka: &KafkaConfig) -> Vec<(&'static str, String)> {
    let mut features = kafka.client_security.required_features();
    for key in ["compression.type", "compression.codec"] {
        let Some(codec) = kafka.producer.get(key) else {
            continue;
        };
        let feature = match codec.as_str() {
            "gzip" => "gzip",
            "snappy" => "snappy",
            "lz4" => "lz4",
            "zstd" => "zstd",
            _ => continue,
        };
        features.push((feature, format!("kafka.producer.\"{key}\" = \"{codec}\"")));
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn kafka(section: &str) -> KafkaConfig {
        let text = format!("[kafka]\n{section}\n[[pipeline]]\nname = \"p\"\ntopics = [\"t\"]\n");
        Config::parse(&text, "test", Vec::new()).unwrap().kafka
    }

    #[test]
    fn a_feature_the_library_lacks_is_named_with_the_setting_that_needs_it() {
        let library = ClientLibrary {
            version: "2.12.1".to_owned(),
            features: vec!["gzip".to_owned(), "snappy".to_owned()],
        };
        assert!(library.check(&kafka("")).is_ok());
        let zstd = kafka("producer = { \"compression.type\" = \"zstd\" }");
        let message = library.check(&zstd).unwrap_err().to_string();
        assert!(message.contains("`zstd`"), "{message}");
        assert!(
            message.contains("kafka.producer.\"compression.type\" = \"zstd\""),
            "{message}"
        );
        assert!(message.contains("gzip,snappy"), "{message}");
    }

    /// The build this test runs in has every feature the README promises.
    #[test]
    fn this_build_has_tls_sasl_and_every_codec() {
        let library = ClientLibrary::linked();
        for feature in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_gssapi",
            "gzip",
            "snappy",
            "lz4",
            "zstd",
        ] {
            assert!(
                library.has(feature),
                "{feature} missing from {:?}",
                library.features
            );
        }
    }
}
