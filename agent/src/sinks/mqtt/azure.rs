//! Azure IoT Hub over MQTT 3.1.1: the names the hub expects and the SAS token a
//! device signs with its key.
//!
//! - client id: the device id;
//! - username: `{hub}.azure-devices.net/{device_id}/?api-version=2021-04-12`;
//! - password: `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}`,
//!   where the resource is `{hub}.azure-devices.net/devices/{device_id}`
//!   URL-encoded and the signature is the URL-encoded base64 of
//!   HMAC-SHA256(base64-decoded device key, "{resource}\n{expiry}");
//! - topic: `devices/{device_id}/messages/events/` followed by the message's
//!   properties, URL-encoded (`$.ct` content type, `$.ce` content encoding).
//!
//! The hub closes a connection when its token expires; the publisher reconnects
//! with a fresh token before that (see `publisher`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use std::path::PathBuf;

use super::binding::STRUCTURED;

/// The API version IoT Hub documents for MQTT device clients.
pub const API_VERSION: &str = "2021-04-12";

/// `azure_iot_hub = { hub, device_id, key_file }`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureIotHub {
    /// The hub's name: `{hub}.azure-devices.net`.
    pub hub: String,
    /// The device's id in the hub's registry; also the MQTT client id.
    pub device_id: String,
    /// File holding the device's primary (or secondary) symmetric key, base64, as
    /// the portal shows it. A secret: never logged. Leave it out when the device
    /// authenticates with an X.509 certificate (`tls = { cert_file, key_file }`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl AzureIotHub {
    /// `{hub}.azure-devices.net`
    pub fn host(&self) -> String {
        format!("{}.azure-devices.net", self.hub)
    }

    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={API_VERSION}",
            self.host(),
            self.device_id
        )
    }

    /// The device-to-cloud topic, with the CloudEvents structured content type
    /// and UTF-8 as the message's system properties.
    pub fn topic(&self) -> String {
        format!(
            "devices/{}/messages/events/$.ct={}&$.ce=utf-8",
            self.device_id,
            encode(STRUCTURED)
        )
    }

    /// `{hub}.azure-devices.net/devices/{device_id}`: what the token grants.
    pub fn resource(&self) -> String {
        format!("{}/devices/{}", self.host(), self.device_id)
    }

    /// Problems with the names, for config validation.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        let hub_ok = !self.hub.is_empty()
            && self
                .hub
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !hub_ok {
            out.push(format!(
                "hub {:?} must be the hub's name (letters, digits, -), not its host name",
                self.hub
            ));
        }
        // IoT Hub device ids: up to 128 ASCII letters, digits and `-.%_*?!(),:=@$'`.
        let id_ok = (1..=128).contains(&self.device_id.len())
            && self
                .device_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.%_*?!(),:=@$'".contains(&b));
        if !id_ok {
            out.push(format!(
                "device_id {:?} is not a valid IoT Hub device id",
                self.device_id
            ));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SasError {
    /// The key's text is deliberately not in the message.
    #[error("the device key is not valid base64")]
    KeyNotBase64,
}

/// A SAS token for `resource` (not yet encoded) valid until `expiry` (Unix
/// seconds), signed with the base64 device `key`.
pub fn sas_token(resource: &str, key: &str, expiry: u64) -> Result<String, SasError> {
    let key = STANDARD
        .decode(key.trim())
        .map_err(|_| SasError::KeyNotBase64)?;
    let sr = encode(resource);
    let to_sign = format!("{sr}\n{expiry}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let signature = STANDARD.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        encode(&signature)
    ))
}

/// URL-encoding as IoT Hub's SDKs do it (`/` is `%2F`, `+` is `%2B`, `=` is `%3D`).
fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> AzureIotHub {
        AzureIotHub {
            hub: "iot-hub-for-test".into(),
            device_id: "iot-device-for-test".into(),
            key_file: Some("device.key".into()),
        }
    }

    #[test]
    fn the_sas_token_matches_the_published_example_of_the_azure_cli_iot_extension() {
        // From the Azure IoT CLI extension's unit tests (azure-iot-cli-extension,
        // TestSasTokenAuth.test_generate_sas_token, device-scoped token without a
        // policy name); also checked with Python's hmac/base64/urllib.parse.quote_plus.
        let token = sas_token(
            "iot-hub-for-test.azure-devices.net/devices/iot-device-for-test",
            "+XLy+MVZ+aTeOnVzN2kLeB16O+kSxmz6g3rS6fAf6rw=",
            1471940363,
        )
        .unwrap();
        assert_eq!(
            token,
            "SharedAccessSignature sr=iot-hub-for-test.azure-devices.net%2Fdevices%2Fiot-device-for-test\
             &sig=SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4%3D&se=1471940363"
        );
        assert_eq!(
            hub().resource(),
            "iot-hub-for-test.azure-devices.net/devices/iot-device-for-test"
        );
    }

    #[test]
    fn a_key_that_is_not_base64_is_refused_without_showing_it() {
        let err = sas_token("r", "not base64 secret!", 1).unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn the_username_and_topic_are_the_hubs() {
        let h = hub();
        assert_eq!(
            h.username(),
            "iot-hub-for-test.azure-devices.net/iot-device-for-test/?api-version=2021-04-12"
        );
        assert_eq!(
            h.topic(),
            "devices/iot-device-for-test/messages/events/$.ct=application%2Fcloudevents%2Bjson&$.ce=utf-8"
        );
    }

    #[test]
    fn a_host_name_given_as_the_hub_name_is_refused() {
        let h = AzureIotHub {
            hub: "myhub.azure-devices.net".into(),
            ..hub()
        };
        assert_eq!(h.check().len(), 1);
        let h = AzureIotHub {
            device_id: "a/b".into(),
            ..hub()
        };
        assert_eq!(h.check().len(), 1);
        assert!(hub().check().is_empty());
    }
}
