//! Personal access plans (seed 001): a PIN is required before a plan can be
//! configured, and Clear exists only for a plan that was configured. A cleared plan
//! stays configured with no access points, so it grants nothing on locks and panels.

/// Why a personal access plan cannot be configured or cleared now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersonalPlanError {
    /// The user has no PIN yet.
    #[error("user {user} has no PIN: add a PIN first, then configure the personal access plan")]
    NoPin {
        /// Resource name of the user.
        user: String,
    },
    /// Clear was asked of a plan never configured.
    #[error(
        "the personal access plan of user {user} is not configured, so there is nothing to clear: configure it with UpdatePersonalAccessPlan first"
    )]
    NotConfigured {
        /// Resource name of the user.
        user: String,
    },
}

/// May `user`'s plan be configured? Only once they have a PIN.
pub fn check_configure(user: &str, has_pin: bool) -> Result<(), PersonalPlanError> {
    if has_pin {
        Ok(())
    } else {
        Err(PersonalPlanError::NoPin { user: user.into() })
    }
}

/// May `user`'s plan be cleared? Only a configured one: clearing an unconfigured
/// plan would configure it with nothing, and cut off every code added later.
pub fn check_clear(user: &str, configured: bool, has_pin: bool) -> Result<(), PersonalPlanError> {
    if configured {
        return Ok(());
    }
    check_configure(user, has_pin)?;
    Err(PersonalPlanError::NotConfigured { user: user.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_and_clear_table() {
        // (configured, has a PIN, may configure, may clear, clear refusal mentions)
        let cases = [
            (false, false, false, false, "add a PIN first"),
            (false, true, true, false, "not configured"),
            (true, true, true, true, ""),
            // The PIN was deleted after the plan was configured: it can still be cleared.
            (true, false, false, true, ""),
        ];
        for (configured, pin, may_configure, may_clear, needle) in cases {
            let what = format!("configured {configured}, PIN {pin}");
            assert_eq!(check_configure("u", pin).is_ok(), may_configure, "{what}");
            match check_clear("u", configured, pin) {
                Ok(()) => assert!(may_clear, "{what}: clear allowed"),
                Err(e) => {
                    assert!(!may_clear, "{what}: clear refused");
                    assert!(e.to_string().contains(needle), "{what}: {e}");
                }
            }
        }
    }
}
