//! `cdcflow run` over the local broker's secured listeners: SASL_SSL with SCRAM-SHA-512 and
//! mutual TLS (tests/run-all.sh starts the broker with `CDCFLOW_KAFKA_SECURE=1`, which makes a
//! test CA, the broker's and a client's certificates, an unrelated CA and a SCRAM user), a
//! wrong password and an untrusted certificate, every compression codec, and secrets that
//! never show in logs, `cdcflow check` or `/metrics`.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kafka_support::*;

/// Where the secured listeners and their files are, from `kafka.sh secure-info`.
struct Secured {
    info: BTreeMap<String, String>,
}

impl Secured {
    fn get(&self, key: &str) -> &str {
        self.info
            .get(key)
            .unwrap_or_else(|| panic!("kafka.sh secure-info printed no `{key}`"))
    }

    fn scram_password(&self) -> String {
        std::fs::read_to_string(self.get("scram_password_file"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

fn secured() -> Secured {
    let output = Command::new(root().join("deploy/local/kafka.sh"))
        .arg("secure-info")
        .output()
        .expect("deploy/local/kafka.sh runs");
    assert!(
        output.status.success(),
        "the test broker has no secured listeners (tests/run-all.sh starts it with \
         CDCFLOW_KAFKA_SECURE=1): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let info = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    Secured { info }
}

/// A `[kafka.security]` body for the SCRAM user with the given password file and CA.
fn scram_security(secured: &Secured, password_file: &str, ca_file: &str) -> String {
    format!(
        "protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"{}\"\n\
         password_file = \"{password_file}\"\nca_file = \"{ca_file}\"",
        secured.get("scram_user"),
    )
}

/// Points a scenario's config at `bootstrap` with a `[kafka.security]` section.
fn secure(scenario: &Scenario, bootstrap: &str, security: &str) {
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    let plain = format!("bootstrap_servers = \"{}\"", kafka_support::bootstrap());
    assert!(text.contains(&plain), "{text}");
    let text = text
        .replacen(&plain, &format!("bootstrap_servers = \"{bootstrap}\""), 1)
        .replacen(
            "[http]",
            &format!("[kafka.security]\n{security}\n\n[http]"),
            1,
        );
    std::fs::write(&scenario.config, text).unwrap();
}

/// The example pipelines through `scenario`: every expected event exactly once, and the
/// service's `/metrics` page.
fn run_examples_exactly(scenario: &Scenario, log_filter: &str) -> (String, String) {
    let records = scenario.example_records();
    produce(&records);
    let expected = expected_events(&scenario.config, &records);
    let service = Service::start_logging(
        &scenario.config,
        &scenario.dir.path().join("run.log"),
        log_filter,
    );
    let actual = read_events(scenario, 8, 5);
    let (status, metrics) = service.http_get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    let log = service.log.clone();
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "cdcflow exited with {status}");
    assert_exactly(&actual, &expected);
    let (order_topic, customer_topic) = order_topics(scenario);
    assert_no_hanging_transaction(&order_topic);
    assert_no_hanging_transaction(&customer_topic);
    (std::fs::read_to_string(log).unwrap(), metrics)
}

/// Exactly-once over SASL_SSL with SCRAM-SHA-512, the password read from a file: the output
/// is exact, and the password shows nowhere, with every log target at trace level.
#[test]
fn exactly_once_over_sasl_ssl_with_scram() {
    let secured = secured();
    let scenario = Scenario::new("scram", "exactly_once", 3);
    secure(
        &scenario,
        secured.get("sasl_ssl_bootstrap"),
        &scram_security(
            &secured,
            secured.get("scram_password_file"),
            secured.get("ca_file"),
        ),
    );
    // librdkafka's own debug logs of the handshake and its configuration go to the log too.
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    let debug = text.replacen(
        "consumer = {",
        "producer = { \"debug\" = \"security,conf\" }\nconsumer = { \"debug\" = \"security,conf\",",
        1,
    );
    assert_ne!(text, debug);
    std::fs::write(&scenario.config, debug).unwrap();
    let (log, metrics) = run_examples_exactly(&scenario, "trace");
    let password = secured.scram_password();
    assert!(password.len() >= 16, "a real password is checked");
    assert!(
        log.contains("SCRAM"),
        "the trace log covers the SASL handshake: {} bytes",
        log.len()
    );
    for (place, text) in [("the trace log", &log), ("/metrics", &metrics)] {
        assert!(!text.contains(&password), "the password shows in {place}");
    }
    let check = cdcflow_check(&scenario.config);
    assert!(check.contains("password from file"), "{check}");
    assert!(
        !check.contains(&password),
        "the password shows in `cdcflow check`"
    );
}

/// The same password given inline and through the environment stays out of sight too.
#[test]
fn secrets_from_the_config_or_the_environment_never_show() {
    let secured = secured();
    let password = secured.scram_password();
    let scenario = Scenario::new("scram-env", "at_least_once", 1);
    secure(
        &scenario,
        secured.get("sasl_ssl_bootstrap"),
        &format!(
            "protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"{}\"\n\
             password = \"{password}\"\nca_file = \"{}\"",
            secured.get("scram_user"),
            secured.get("ca_file")
        ),
    );
    let check = cdcflow_check(&scenario.config);
    assert!(check.contains("password from the config"), "{check}");
    assert!(!check.contains(&password), "{check}");
    // A wrong type for the password is refused without echoing it.
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    let numeric = scenario.dir.path().join("numeric.toml");
    std::fs::write(
        &numeric,
        text.replace(&format!("password = \"{password}\""), "password = 73105987"),
    )
    .unwrap();
    let refused = cdcflow_check_failure(&numeric, &[]);
    assert!(refused.contains("kafka.security.password"), "{refused}");
    assert!(!refused.contains("73105987"), "{refused}");
    // From the environment: a missing variable names itself, a set one is used unseen.
    let from_env = scenario.dir.path().join("env.toml");
    std::fs::write(
        &from_env,
        text.replace(
            &format!("password = \"{password}\""),
            "password_env = \"CDCFLOW_TEST_SCRAM_PASSWORD\"",
        ),
    )
    .unwrap();
    let missing = cdcflow_check_failure(&from_env, &[]);
    assert!(
        missing.contains("kafka.security.password_env")
            && missing.contains("CDCFLOW_TEST_SCRAM_PASSWORD"),
        "{missing}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["check", "--config"])
        .arg(&from_env)
        .env("CDCFLOW_TEST_SCRAM_PASSWORD", &password)
        .env("CDCFLOW_LOG", "trace")
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains("password from environment variable"),
        "{shown}"
    );
    assert!(!shown.contains(&password), "{shown}");
    // The service with the inline password: it runs, and its log and metrics hide it.
    produce(&scenario.example_records());
    let service = Service::start_logging(
        &scenario.config,
        &scenario.dir.path().join("run.log"),
        "trace",
    );
    read_events(&scenario, 8, 5);
    let (_, metrics) = service.http_get("/metrics");
    let log = service.log_text();
    service.stop(Duration::from_secs(30));
    assert!(!log.contains(&password), "the password shows in the log");
    assert!(
        !metrics.contains(&password),
        "the password shows in /metrics"
    );
}

/// Exactly-once over mutual TLS: the broker requires the client certificate.
#[test]
fn exactly_once_over_mutual_tls() {
    let secured = secured();
    let scenario = Scenario::new("mtls", "exactly_once", 3);
    secure(
        &scenario,
        secured.get("ssl_bootstrap"),
        &format!(
            "protocol = \"ssl\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            secured.get("ca_file"),
            secured.get("client_cert_file"),
            secured.get("client_key_file")
        ),
    );
    run_examples_exactly(&scenario, "info,rdkafka=warn");
}

/// A wrong password stops start-up at once with a message that says what to check, and
/// never the password.
#[test]
fn a_wrong_password_stops_start_up_with_a_clear_message() {
    let secured = secured();
    let scenario = Scenario::new("badpass", "exactly_once", 1);
    let wrong = scenario.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password-9f2c\n").unwrap();
    secure(
        &scenario,
        secured.get("sasl_ssl_bootstrap"),
        &scram_security(
            &secured,
            &wrong.display().to_string(),
            secured.get("ca_file"),
        ),
    );
    let log = start_up_failure(&scenario);
    assert!(log.contains("cannot connect to Kafka"), "{log}");
    assert!(log.contains("Authentication"), "{log}");
    assert!(log.contains("kafka.security.username"), "{log}");
    assert!(!log.contains("not-the-password-9f2c"), "{log}");
}

/// A broker certificate the configured CA did not sign stops start-up with a message about
/// the certificate.
#[test]
fn an_untrusted_certificate_stops_start_up_with_a_clear_message() {
    let secured = secured();
    let untrusted = Scenario::new("untrusted", "exactly_once", 1);
    secure(
        &untrusted,
        secured.get("sasl_ssl_bootstrap"),
        &scram_security(
            &secured,
            secured.get("scram_password_file"),
            secured.get("other_ca_file"),
        ),
    );
    let log = start_up_failure(&untrusted);
    assert!(log.contains("cannot connect to Kafka"), "{log}");
    assert!(log.contains("certificate"), "{log}");
    assert!(log.contains("kafka.security.ca_file"), "{log}");
}

/// Producers with each compression codec deliver the exact output (and read it back).
#[test]
fn every_compression_codec_works() {
    for codec in ["zstd", "lz4", "snappy", "gzip"] {
        let scenario = Scenario::new(&format!("codec-{codec}"), "exactly_once", 1);
        let text = std::fs::read_to_string(&scenario.config).unwrap();
        let with_codec = text.replacen(
            "consumer = {",
            &format!("producer = {{ \"compression.type\" = \"{codec}\" }}\nconsumer = {{"),
            1,
        );
        assert_ne!(text, with_codec);
        std::fs::write(&scenario.config, with_codec).unwrap();
        run_examples_exactly(&scenario, "info,rdkafka=warn");
    }
}

/// `cdcflow --version` says what the binary's librdkafka supports.
#[test]
fn version_lists_librdkafka_features() {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("librdkafka 2."), "{text}");
    let features = text
        .lines()
        .find_map(|line| line.strip_prefix("builtin.features: "))
        .unwrap_or_else(|| panic!("no builtin.features line in {text}"));
    for feature in [
        "ssl",
        "sasl_scram",
        "sasl_plain",
        "sasl_gssapi",
        "zstd",
        "lz4",
        "snappy",
        "gzip",
    ] {
        assert!(
            features.split(',').any(|f| f == feature),
            "{feature}: {text}"
        );
    }
}

/// `cdcflow check` on a config that must pass; its stdout and stderr.
fn cdcflow_check(config: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["check", "--config"])
        .arg(config)
        .env("CDCFLOW_LOG", "trace")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    text
}

/// `cdcflow check` on a config that must fail; its stderr.
fn cdcflow_check_failure(config: &PathBuf, env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success(), "check passed: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `cdcflow run` and waits for it to stop by itself, non-zero, soon: a refused
/// connection must not turn into a retry loop. Its log.
fn start_up_failure(scenario: &Scenario) -> String {
    let mut service = scenario.start("run.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while service.is_running() {
        assert!(
            Instant::now() < deadline,
            "cdcflow still runs 60 s after start: {}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = service.child.wait().unwrap();
    assert!(
        !status.success(),
        "cdcflow exited 0: {}",
        service.log_text()
    );
    service.log_text()
}
