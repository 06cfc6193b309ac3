//! `[kafka.security]`: resolution, consistency checks, required features, and secrets that
//! never print.
use super::*;

const SENTINEL: &str = "sentinel-p4ssw0rd";

fn parse(text: &str) -> SecurityConfig {
    toml::from_str(text).unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn secrets_never_print() {
    let secret = Secret::new(SENTINEL);
    assert_eq!(format!("{secret}"), "***");
    assert!(!format!("{secret:?}").contains(SENTINEL));
    let config = parse(&format!(
        "protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\n\
         password = \"{SENTINEL}\"\n"
    ));
    let resolved = config.resolve(no_env).unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{resolved:?}"),
        resolved.summary(),
    ] {
        assert!(!shown.contains(SENTINEL), "{shown}");
    }
    assert!(
        resolved
            .properties()
            .contains(&("sasl.password", SENTINEL.to_owned()))
    );
}

/// Neither a wrong type nor a syntax error on a secret's line echoes the secret.
#[test]
fn config_errors_never_echo_a_secret() {
    const PIPELINE: &str = "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n";
    for (section, shown) in [
        ("[kafka.security]\npassword = 73105987\n", "73105987"),
        (
            "[kafka.security]\npassword = \"s3cr3t-unterminated\n",
            "s3cr3t",
        ),
        (
            "[kafka.security]\npassword = \"s3cr3t\" trailing\n",
            "s3cr3t",
        ),
    ] {
        let text = format!("{section}{PIPELINE}");
        let error = crate::config::Config::parse(&text, "test", Vec::new()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("line 2") || message.contains("kafka.security.password"),
            "{message}"
        );
        assert!(!message.contains(shown), "{message}");
    }
}

#[test]
fn secrets_come_from_the_environment_or_a_file() {
    let config = parse(
        "protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\nusername = \"u\"\n\
         password_env = \"KAFKA_PASSWORD\"\n",
    );
    let resolved = config
        .resolve(|name| (name == "KAFKA_PASSWORD").then(|| SENTINEL.to_owned()))
        .unwrap();
    assert_eq!(resolved.password, Some(Secret::new(SENTINEL)));
    assert_eq!(
        resolved.summary(),
        "protocol sasl_ssl, SASL PLAIN, user `u`, password from environment variable \
         KAFKA_PASSWORD"
    );
    let missing = config.resolve(no_env).unwrap_err();
    assert_eq!(missing.key, "kafka.security.password_env");
    assert!(missing.message.contains("KAFKA_PASSWORD"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{SENTINEL}\n")).unwrap();
    let config = parse(&format!(
        "protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n\
         username = \"u\"\npassword_file = \"{}\"\n",
        file.display()
    ));
    assert_eq!(
        config.resolve(no_env).unwrap().password,
        Some(Secret::new(SENTINEL))
    );
}

#[test]
fn inconsistent_settings_name_the_key_and_the_fix() {
    let cases = [
        (
            "protocol = \"sasl_ssl\"\nusername = \"u\"\npassword = \"p\"\n",
            "kafka.security.sasl_mechanism",
        ),
        (
            "protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\npassword = \"p\"\n",
            "kafka.security.username",
        ),
        (
            "protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nusername = \"u\"\n",
            "kafka.security.password_env",
        ),
        (
            "protocol = \"ssl\"\nusername = \"u\"\n",
            "kafka.security.username",
        ),
        (
            "sasl_mechanism = \"PLAIN\"\n",
            "kafka.security.sasl_mechanism",
        ),
        (
            "protocol = \"ssl\"\nca_file = \"/nonexistent/ca.pem\"\n",
            "kafka.security.ca_file",
        ),
        ("ca_file = \"Cargo.toml\"\n", "kafka.security.ca_file"),
        (
            "protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nusername = \"u\"\n\
             password = \"p\"\npassword_env = \"P\"\n",
            "kafka.security.password",
        ),
        (
            "protocol = \"ssl\"\ncert_file = \"Cargo.toml\"\n",
            "kafka.security.key_file",
        ),
    ];
    for (text, key) in cases {
        let error = parse(text).resolve(no_env).unwrap_err();
        assert_eq!(error.key, key, "{text}: {}", error.message);
    }
}

#[test]
fn tls_and_scram_need_their_librdkafka_features() {
    let config = parse(
        "protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\n\
         password = \"p\"\n",
    );
    let features: Vec<&str> = config
        .resolve(no_env)
        .unwrap()
        .required_features()
        .into_iter()
        .map(|(feature, _)| feature)
        .collect();
    assert_eq!(features, ["ssl", "sasl_scram"]);
    assert!(
        parse("")
            .resolve(no_env)
            .unwrap()
            .required_features()
            .is_empty()
    );
}
