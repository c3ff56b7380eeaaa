//! Generated gRPC code for `keyplane.v1`, its encoded descriptor set (for reflection),
//! and [`convert`]: the one conversion between wire values and keyplane-core values,
//! shared by keyplaned and the agent. No other logic lives here.

pub mod convert;
#[doc(hidden)]
pub mod fuzz;

/// The `keyplane.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("keyplane.v1");
}

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyplane_descriptor");

// Hand-written Debug for messages holding a PIN: everything but the digits.
impl std::fmt::Debug for v1::Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("display_name", &self.display_name)
            .field("pin", &redacted(&self.pin))
            .field("pin_set", &self.pin_set)
            .field("scope", &self.scope)
            .field("slots", &self.slots)
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for v1::DesiredSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredSlot")
            .field("device", &self.device)
            .field("slot", &self.slot)
            .field("credential", &self.credential)
            .field("pin", &redacted(&self.pin))
            .finish()
    }
}

impl std::fmt::Debug for v1::ObservedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedSlot")
            .field("slot", &self.slot)
            .field("state", &self.state)
            .field("pin", &redacted(&self.pin))
            .finish()
    }
}

impl std::fmt::Debug for v1::IssueAgentTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssueAgentTokenResponse")
            .field("token", &redacted(&self.token))
            .finish()
    }
}

impl std::fmt::Debug for v1::CreateDealerTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateDealerTokenResponse")
            .field("dealer_token", &self.dealer_token)
            .field("token", &redacted(&self.token))
            .finish()
    }
}

impl std::fmt::Debug for v1::EnrollmentCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentCode")
            .field("code", &redacted(&self.code))
            .field("site", &self.site)
            .field("expire_time", &self.expire_time)
            .finish()
    }
}

impl std::fmt::Debug for v1::EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("enrollment_code", &redacted(&self.enrollment_code))
            .field("csr_der_len", &self.csr_der.len())
            .finish()
    }
}

/// PINs, tokens and codes print as `<redacted>` (empty stays empty).
fn redacted(pin: &str) -> &'static str {
    if pin.is_empty() { "" } else { "<redacted>" }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_never_shows_pins() {
        let credential = v1::Credential {
            pin: "48213".into(),
            ..Default::default()
        };
        let request = v1::CreateCredentialRequest {
            credential: Some(credential),
            ..Default::default()
        };
        let slot = v1::DesiredSlot {
            pin: "99301".into(),
            ..Default::default()
        };
        let changes = v1::DesiredChanges {
            slots: vec![slot],
            ..Default::default()
        };
        let observed = v1::ObservedSlots {
            slots: vec![v1::ObservedSlot {
                pin: "73125".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = format!("{request:?} {changes:?} {observed:?}");
        assert!(
            !text.contains("48213") && !text.contains("99301") && !text.contains("73125"),
            "{text}"
        );
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn debug_never_shows_tokens_or_codes() {
        let shown = [
            format!(
                "{:?}",
                v1::IssueAgentTokenResponse {
                    token: "kpa_secret".into()
                }
            ),
            format!(
                "{:?}",
                v1::CreateDealerTokenResponse {
                    token: "kpd_secret".into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                v1::EnrollmentCode {
                    code: "kpe_secret".into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                v1::EnrollRequest {
                    enrollment_code: "kpe_secret".into(),
                    csr_der: vec![1, 2, 3],
                }
            ),
        ];
        for text in shown {
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
}
