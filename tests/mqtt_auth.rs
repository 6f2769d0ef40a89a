//! A broker that wants a username and password: the agent logs in with the password
//! read from a file and never writes the password to its logs; with a wrong password
//! it says so once, keeps retrying, and still stops cleanly.

mod support;

use serde_json::json;
use support::*;

const USER: &str = "ferry-gw";
const PASSWORD: &str = "correct-horse-battery-staple";

/// The test config with `username` and `password_file` added to the MQTT source.
fn config_with_login(config: &TestConfig, password_file: &std::path::Path) -> String {
    config.toml().replacen(
        "device = \"{topic.1}\"\n",
        &format!(
            "device = \"{{topic.1}}\"\nusername = {USER:?}\npassword_file = {:?}\n",
            password_file.display().to_string()
        ),
        1,
    )
}

#[test]
fn the_agent_logs_in_with_a_password_from_a_file_and_never_logs_it() {
    let broker = Mosquitto::start_with_password(USER, PASSWORD);
    let receiver = Receiver::start();
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("mqtt-password");
    // A trailing newline, as editors and `echo` leave it, must not become part of it.
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let config = TestConfig::new("gw-auth", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config_with_login(&config, &password_file), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    broker.publish(
        "sensors/meter-1/telemetry",
        json!({"kwh": 12.5, "seq": 1}).to_string(),
        1,
    );
    let readings = agent.eventually("the reading to arrive", |_| {
        let r = receiver.readings();
        if r.is_empty() {
            Err("nothing delivered yet".to_string())
        } else {
            Ok(r)
        }
    });
    assert_eq!(readings[0].subject.as_deref(), Some("meter-1"));
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
    assert!(
        !agent.stderr().contains(PASSWORD),
        "the password must never appear in the logs"
    );
}

#[test]
fn a_wrong_password_is_reported_once_and_the_agent_keeps_running() {
    let broker = Mosquitto::start_with_password(USER, PASSWORD);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("mqtt-password");
    std::fs::write(&password_file, "not-the-password").unwrap();
    let config = TestConfig::new("gw-badauth", &broker);
    let mut agent = Agent::start(&config_with_login(&config, &password_file), &[]);

    agent.eventually("a warning that the broker refused the login", |a| {
        if a.stderr_contains("cannot connect to the broker") {
            Ok(())
        } else {
            Err("no warning yet".to_string())
        }
    });
    // Let the reconnect loop retry a few times (backoff 100ms..1s).
    agent.eventually("the agent to retry the login three times", |_| {
        let refusals = broker.log().matches("not authorised").count();
        if refusals >= 3 {
            Ok(())
        } else {
            Err(format!("{refusals} refused logins in the broker's log"))
        }
    });
    let warnings = agent
        .stderr()
        .matches("cannot connect to the broker")
        .count();
    assert_eq!(warnings, 1, "one warning per outage, not one per retry");
    assert!(
        !agent.stderr().contains("not-the-password"),
        "the password must never appear in the logs"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
