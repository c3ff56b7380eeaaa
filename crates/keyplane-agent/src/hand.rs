//! `keyplane-agent sim`: a person at a simulated device. Programs or clears a slot
//! at the keypad, arms or disarms a panel partition with a code, presents a code at
//! a lock or door, or shows what the device holds (never a code).
//!
//! It works on the simulator's state files directly, so it runs beside a running
//! agent: the agent notices the change on its next read-back, as it would at a real
//! device. Nothing here prints or returns a code.

use chrono::Utc;
use keyplane_core::DeviceKind;
use keyplane_devices::{AccessOutcome, DeviceError, PanelOutcome, SimulatedSite};
use std::path::Path;

/// What the person does (also the `keyplane-agent sim` subcommands).
#[derive(Clone, PartialEq, Eq, clap::Subcommand)]
pub enum HandAction {
    /// Program `code` into `slot` at the keypad.
    ProgramSlot {
        /// Slot (user number on a panel).
        slot: u16,
        /// The code.
        code: String,
    },
    /// Clear `slot` at the keypad.
    ClearSlot {
        /// Slot (user number on a panel).
        slot: u16,
    },
    /// Enter `code` + ARM for `partition` at a panel.
    Arm {
        /// Partition number.
        partition: u8,
        /// The code.
        code: String,
    },
    /// Enter `code` + OFF for `partition` at a panel.
    Disarm {
        /// Partition number.
        partition: u8,
        /// The code.
        code: String,
    },
    /// Present `code` at a lock or door.
    Present {
        /// The code.
        code: String,
    },
    /// Show occupied slots, armed partitions and lockdown.
    Show,
}

/// What came of it, as the person would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandResult {
    /// Whether the device did what was asked (false: it refused, and `message` says
    /// why).
    pub done: bool,
    /// One line (`show`: several) for the person; never holds a code.
    pub message: String,
}

/// Why the command could not act at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandError {
    /// The device could not be found or its state not read.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// The action does not exist on this kind of device.
    #[error("{device} is a {kind}: {what}")]
    WrongKind {
        /// The device.
        device: String,
        /// Its kind.
        kind: DeviceKind,
        /// What it cannot do.
        what: &'static str,
    },
}

/// Performs `action` at the simulated device named `device` (resource name, state
/// file or device id; see [`SimulatedSite::find`]) kept in `sim_dir`.
pub fn act(sim_dir: &Path, device: &str, action: &HandAction) -> Result<HandResult, HandError> {
    let mut sim = SimulatedSite::new(sim_dir).find(device)?;
    let name = sim.name().to_owned();
    let model = sim.device_model();
    let kind = model.kind;
    let slot_word = if kind == DeviceKind::Panel {
        "user"
    } else {
        "slot"
    };
    let shown = |slot: u16| format!("{slot_word} {}", model.display_slot(slot));
    let wrong = |what| HandError::WrongKind {
        device: name.clone(),
        kind,
        what,
    };
    let done = |message: String| HandResult {
        done: true,
        message,
    };
    let refused = |message: String| HandResult {
        done: false,
        message,
    };
    // A refusal by the device is an outcome to show, not a failure of the command.
    let at_keypad = |r: Result<(), DeviceError>, what: &str| match r {
        Ok(()) => Ok(done(what.to_owned())),
        Err(e @ DeviceError::Io(_)) | Err(e @ DeviceError::NotFound(_)) => Err(e.into()),
        Err(e) => Ok(refused(format!("the keypad refused it: {e}"))),
    };
    match action {
        HandAction::ProgramSlot { slot, code } => at_keypad(
            sim.program_at_keypad(*slot, code),
            &format!("{} programmed at the keypad of {name}", shown(*slot)),
        ),
        HandAction::ClearSlot { slot } => at_keypad(
            sim.clear_at_keypad(*slot),
            &format!("{} cleared at the keypad of {name}", shown(*slot)),
        ),
        HandAction::Arm { partition, code } => {
            if kind != DeviceKind::Panel {
                return Err(wrong("only a panel arms; use `present` at a lock or door"));
            }
            Ok(match sim.arm_by(*partition, code)? {
                (PanelOutcome::Armed, Some(user)) => {
                    done(format!("armed partition {partition} with {}", shown(user)))
                }
                (PanelOutcome::Armed, None) => done(format!("armed partition {partition}")),
                (outcome, _) => refused(format!(
                    "arming partition {partition} refused: {}",
                    why(outcome)
                )),
            })
        }
        HandAction::Disarm { partition, code } => {
            if kind != DeviceKind::Panel {
                return Err(wrong(
                    "only a panel disarms; use `present` at a lock or door",
                ));
            }
            // A duress code reads exactly like any other here: the person at the
            // keypad (maybe forced) must see nothing; the silent alarm goes out.
            Ok(match sim.disarm_by(*partition, code)? {
                (PanelOutcome::Disarmed, Some(user)) => done(format!(
                    "disarmed partition {partition} with {}",
                    shown(user)
                )),
                (PanelOutcome::Disarmed, None) => done(format!("disarmed partition {partition}")),
                (outcome, _) => refused(format!(
                    "disarming partition {partition} refused: {}",
                    why(outcome)
                )),
            })
        }
        HandAction::Present { code } => {
            if kind == DeviceKind::Panel {
                return Err(wrong("codes are entered with `arm` or `disarm` at a panel"));
            }
            Ok(match sim.present_by(code, Utc::now())? {
                (AccessOutcome::Granted, Some(slot)) => {
                    done(format!("access granted at {name} ({})", shown(slot)))
                }
                (AccessOutcome::Granted, None) => done(format!("access granted at {name}")),
                (AccessOutcome::Denied(why), _) => refused(format!("access denied: {why}")),
            })
        }
        HandAction::Show => {
            let summary = sim.summary()?;
            let (slots, armed, lockdown) = (summary.occupied, summary.armed, summary.lockdown);
            let mut lines = vec![format!("{name}: {} ({})", model.id, model.title)];
            let occupied: Vec<String> = slots.iter().map(|s| model.display_slot(*s)).collect();
            lines.push(if occupied.is_empty() {
                format!("no {slot_word} holds a code")
            } else {
                format!("{slot_word}s holding a code: {}", occupied.join(", "))
            });
            if kind == DeviceKind::Panel {
                lines.extend(
                    armed
                        .iter()
                        .map(|(p, user)| format!("partition {p} armed by {}", shown(*user))),
                );
                if armed.is_empty() {
                    lines.push("no partition armed".to_owned());
                }
            }
            if lockdown {
                lines.push("locked down: refuses every code".to_owned());
            }
            Ok(done(lines.join("\n")))
        }
    }
}

fn why(outcome: PanelOutcome) -> &'static str {
    match outcome {
        PanelOutcome::Refused(why) => why,
        PanelOutcome::Armed => "already armed",
        PanelOutcome::Disarmed => "already disarmed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::TempDir;
    use keyplane_core::DeviceModel;
    use keyplane_core::authority::Level;
    use keyplane_devices::{DeviceDriver, EventKind, SimulatedDevice};

    const LOCK: &str = "sites/s1/devices/front-door";
    const PANEL: &str = "sites/s1/devices/panel";

    fn block<F: std::future::Future>(f: F) -> F::Output {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("simulator future was pending"),
        }
    }

    fn open(dir: &Path, name: &str, model: &str) -> SimulatedDevice {
        SimulatedDevice::open(dir, name, DeviceModel::find(model).expect("model")).expect("open")
    }

    fn program(slot: u16, code: &str) -> HandAction {
        HandAction::ProgramSlot {
            slot,
            code: code.into(),
        }
    }

    #[test]
    fn a_person_at_the_devices() {
        let dir = TempDir::new();
        let lock = open(&dir.0, LOCK, "zwave-lock-30");
        let mut panel = open(&dir.0, PANEL, "vista-128bpt");
        block(panel.set_panel_user(2, "4821", &[(1, Level::Master)], false)).expect("user 002");
        block(panel.set_panel_user(5, "5555", &[(1, Level::Duress)], false)).expect("user 005");
        let arm = |code: &str| HandAction::Arm {
            partition: 1,
            code: code.into(),
        };
        let disarm = |code: &str| HandAction::Disarm {
            partition: 1,
            code: code.into(),
        };
        let present = |code: &str| HandAction::Present { code: code.into() };
        let cases: Vec<(&str, HandAction, bool, String)> = vec![
            (
                LOCK,
                program(7, "3141"),
                true,
                format!("slot 7 programmed at the keypad of {LOCK}"),
            ),
            (
                "front-door",
                program(8, "3141"),
                false,
                "the keypad refused it: slot 8: the device already holds this code in slot 7"
                    .into(),
            ),
            (
                "front-door",
                program(31, "2718"),
                false,
                "the keypad refused it: slot 31 does not exist; the device has slots 1..30".into(),
            ),
            (
                LOCK,
                present("3141"),
                true,
                format!("access granted at {LOCK} (slot 7)"),
            ),
            (
                LOCK,
                present("2718"),
                false,
                "access denied: unknown code".into(),
            ),
            (
                "panel",
                program(10, "4703"),
                true,
                format!("user 010 programmed at the keypad of {PANEL}"),
            ),
            (
                "panel",
                arm("4821"),
                true,
                "armed partition 1 with user 002".into(),
            ),
            (
                "panel",
                arm("4821"),
                false,
                "arming partition 1 refused: partition already armed".into(),
            ),
            (
                "panel",
                disarm("4703"),
                false,
                "disarming partition 1 refused: code not valid in this partition".into(),
            ),
            // Duress disarms like any code, and says nothing about it.
            (
                "panel",
                disarm("5555"),
                true,
                "disarmed partition 1 with user 005".into(),
            ),
            (
                LOCK,
                HandAction::ClearSlot { slot: 7 },
                true,
                format!("slot 7 cleared at the keypad of {LOCK}"),
            ),
            (
                LOCK,
                present("3141"),
                false,
                "access denied: unknown code".into(),
            ),
        ];
        for (device, action, ok, want) in cases {
            let got = act(&dir.0, device, &action).expect(&want);
            assert_eq!(got.message, want);
            assert_eq!(got.done, ok, "{want}");
            for pin in ["3141", "2718", "4821", "5555", "4703"] {
                assert!(!got.message.contains(pin), "{}", got.message);
            }
        }
        assert_eq!(lock.slots().len(), 0);
        assert_eq!(
            lock.keypad_writes(),
            2,
            "program + clear, refusals excluded"
        );
        assert_eq!(panel.code_in(10).as_deref(), Some("4703"));
        assert!(
            panel.events().iter().any(|e| e.kind == EventKind::Duress),
            "the silent alarm went out"
        );
        let shown = act(&dir.0, "panel", &HandAction::Show).expect("show");
        assert_eq!(
            shown.message,
            format!(
                "{PANEL}: vista-128bpt (VISTA-128BPT-style alarm panel)\n\
                 users holding a code: 002, 005, 010\nno partition armed"
            )
        );
    }

    #[test]
    fn what_a_device_cannot_do_and_devices_that_do_not_exist_are_errors() {
        let dir = TempDir::new();
        open(&dir.0, LOCK, "zwave-lock-30");
        open(&dir.0, PANEL, "vista-128bpt");
        let arm = HandAction::Arm {
            partition: 1,
            code: "1234".into(),
        };
        let present = HandAction::Present {
            code: "1234".into(),
        };
        for (device, action, want) in [
            ("front-door", &arm, "is a lock: only a panel arms"),
            (
                "panel",
                &present,
                "is a panel: codes are entered with `arm`",
            ),
            ("back-door", &present, "no simulated device \"back-door\""),
        ] {
            let e = act(&dir.0, device, action).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("1234"), "{e}");
        }
    }
}
