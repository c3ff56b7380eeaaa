//! PIN policy. A [`Pin`] never shows its digits in `Debug` or `Display`, so it cannot
//! leak into a log line, a trace, an error or a panic message by accident.

use crate::model::DeviceModel;
use std::fmt;

/// Longest PIN any supported device accepts; longer input is refused before anything else.
pub const MAX_PIN_LENGTH: usize = 12;

/// The factory-default installer code of VISTA-style panels, never a user code.
pub const INSTALLER_DEFAULT: &str = "4140";

/// A user code: digits only. Its digits are reachable only through [`Pin::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(String);

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin(<{} digits redacted>)", self.0.len())
    }
}

/// Why a PIN was refused. Messages say which rule, never the digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// No PIN given.
    #[error("pin is required")]
    Empty,
    /// Something other than 0-9.
    #[error("pin must contain digits 0-9 only")]
    NotDigits,
    /// Longer than any device accepts.
    #[error("pin is longer than {MAX_PIN_LENGTH} digits")]
    TooLong,
    /// Easy to guess: one repeated digit, a straight run, or the installer default.
    #[error("pin is too easy to guess ({0}); choose another code")]
    Guessable(&'static str),
    /// Length outside a scoped device's range.
    #[error("a {len}-digit pin does not fit device {device} ({model}): it accepts {range}")]
    Length {
        /// The device, as its resource name or display name.
        device: String,
        /// The device model id.
        model: &'static str,
        /// Length of the refused PIN.
        len: usize,
        /// What the device accepts, e.g. `4 digits`.
        range: String,
    },
}

impl Pin {
    /// Parses a PIN: non-empty, digits only, at most [`MAX_PIN_LENGTH`].
    pub fn parse(raw: &str) -> Result<Pin, PinError> {
        if raw.is_empty() {
            return Err(PinError::Empty);
        }
        if !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PinError::NotDigits);
        }
        if raw.len() > MAX_PIN_LENGTH {
            return Err(PinError::TooLong);
        }
        Ok(Pin(raw.to_owned()))
    }

    /// Refuses codes anyone would try first: one digit repeated (`0000`), a straight
    /// run up or down (`1234`, `4321`), and the panel's installer default `4140`.
    pub fn check_not_guessable(&self) -> Result<(), PinError> {
        let digits: Vec<i16> = self.0.bytes().map(|b| i16::from(b - b'0')).collect();
        let steps: Vec<i16> = digits.windows(2).map(|w| w[1] - w[0]).collect();
        if steps.iter().all(|s| *s == 0) {
            return Err(PinError::Guessable("one digit repeated"));
        }
        if steps.iter().all(|s| *s == 1) || steps.iter().all(|s| *s == -1) {
            return Err(PinError::Guessable("a straight run of digits"));
        }
        if self.0 == INSTALLER_DEFAULT {
            return Err(PinError::Guessable("the installer's factory default"));
        }
        Ok(())
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a parsed PIN has at least one digit.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The digits, for sealing, hashing and sending to the device; never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks the PIN fits `model`; `device` names the device in the refusal.
    pub fn check_fits(&self, device: &str, model: &DeviceModel) -> Result<(), PinError> {
        if model.accepts_length(self.len()) {
            Ok(())
        } else {
            Err(PinError::Length {
                device: device.to_owned(),
                model: model.id,
                len: self.len(),
                range: model.length_range(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<usize, PinError>)] = &[
            ("4821", Ok(4)),
            ("00000000", Ok(8)),
            ("", Err(PinError::Empty)),
            ("48a1", Err(PinError::NotDigits)),
            ("48 1", Err(PinError::NotDigits)),
            ("-482", Err(PinError::NotDigits)),
            ("４８２１", Err(PinError::NotDigits)),
            ("1234567890123", Err(PinError::TooLong)),
        ];
        for (raw, want) in cases {
            assert_eq!(Pin::parse(raw).map(|p| p.len()), *want, "{raw:?}");
        }
    }

    #[test]
    fn fits_device_ranges() {
        let panel = DeviceModel::find("vista-128bpt").expect("panel");
        let lock = DeviceModel::find("zwave-lock-30").expect("lock");
        let cases: &[(&str, &DeviceModel, bool)] = &[
            ("4821", panel, true),
            ("48210", panel, false),
            ("482", lock, false),
            ("48210000", lock, true),
            ("482100001", lock, false),
        ];
        for (raw, model, ok) in cases {
            let pin = Pin::parse(raw).expect("valid pin");
            assert_eq!(
                pin.check_fits("front door", model).is_ok(),
                *ok,
                "{raw} {}",
                model.id
            );
        }
        let err = Pin::parse("123456789")
            .expect("valid")
            .check_fits("front door", lock)
            .expect_err("too long");
        let msg = err.to_string();
        assert!(
            msg.contains("front door") && msg.contains("4..8 digits"),
            "{msg}"
        );
        assert!(!msg.contains("123456789"), "{msg}");
    }

    #[test]
    fn guessable_table() {
        let cases: &[(&str, bool)] = &[
            ("4821", true),
            ("0000", false),
            ("99999999", false),
            ("1234", false),
            ("4321", false),
            ("0123", false),
            ("6789", false),
            ("98765", false),
            ("4140", false),
            ("41400", true),
            ("1357", true),
            ("1233", true),
            ("9012", true),
            ("1", false),
        ];
        for (raw, ok) in cases {
            let pin = Pin::parse(raw).expect("digits");
            let result = pin.check_not_guessable();
            assert_eq!(result.is_ok(), *ok, "{raw}");
            if let Err(e) = result {
                assert!(!e.to_string().contains(raw), "{e}");
            }
        }
    }

    #[test]
    fn digits_never_shown() {
        let pin = Pin::parse("9930").expect("valid");
        assert!(!format!("{pin:?}").contains("9930"));
        assert_eq!(pin.expose(), "9930");
    }
}
